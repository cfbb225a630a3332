"""How far apart two merged models are on a set of matrices: relative Frobenius differences.

Two figures, each as one aggregate over all tensors, ‖Σ diff‖ / ‖Σ ref‖ (norms of the
concatenation), and as the maximum over tensors:
  * weights: ‖W_ours − W_ref‖ / ‖W_ref‖ — what the 1e-4 relative parity target is stated on;
  * update:  ‖W_ours − W_ref‖ / ‖W_ref − W_prev‖ — the same difference measured against this
    step's change of the weights, about 50× stricter on these models since the base dominates W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from nufilt_core.checkpoint import Checkpoint


@dataclass
class Difference:
    tensors: int
    weights: float  # aggregate ‖ours − ref‖ / ‖ref‖
    weights_max: float
    weights_worst: str  # the tensor with the largest per-tensor weight difference
    update: float  # aggregate ‖ours − ref‖ / ‖ref − previous‖
    update_max: float
    update_worst: str


def relative_difference(ours: Path, reference: Path, previous: Path | None = None,
                        names: list[str] | None = None) -> Difference:
    """Compare `ours` with `reference` on `names` (default: every tensor of the reference)."""
    a, b = Checkpoint.open(ours), Checkpoint.open(reference)
    p = Checkpoint.open(previous) if previous else None
    names = names or list(b.tensors)
    diff2 = ref2 = upd2 = 0.0
    w_max, w_worst, u_max, u_worst = 0.0, "", 0.0, ""
    for name in names:
        x, y = a.read(name).double(), b.read(name).double()
        d = float((x - y).square().sum())
        r = float(y.square().sum())
        diff2, ref2 = diff2 + d, ref2 + r
        if r and math.sqrt(d / r) >= w_max:
            w_max, w_worst = math.sqrt(d / r), name
        if p is not None:
            u = float((y - p.read(name).double()).square().sum())
            upd2 += u
            if u and math.sqrt(d / u) >= u_max:
                u_max, u_worst = math.sqrt(d / u), name
    return Difference(
        tensors=len(names),
        weights=math.sqrt(diff2 / ref2) if ref2 else math.sqrt(diff2),
        weights_max=w_max, weights_worst=w_worst,
        update=math.sqrt(diff2 / upd2) if upd2 else math.nan,
        update_max=u_max if p is not None else math.nan, update_worst=u_worst)
