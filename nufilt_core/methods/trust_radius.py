"""Rescaling with a trust radius, the post-step of the plus and plus-iso profiles.

Per filtered matrix, with this step's fused update and λ_{t-1} from the lineage record:
  U = λ_{t-1} τ_{≤t-1} + update,   W^m_t = W_0 + U / λ_t,
  λ_t = max(1, ‖U‖ / target),      target = max(mean_i ‖τ_i‖, κ ‖W_0‖).
κ = 0 is OPCM's rule; κ > 0 is a trust radius around θ0: a merged task vector that stays within κ‖W_0‖
(gentle fine-tunes) is never shrunk. λ_t and ‖τ_1‖…‖τ_t‖ per matrix are stored in the lineage record
(method state "rescale"), so a lineage rescales from its first step or never.
"""

from __future__ import annotations

import math
from statistics import fmean
from typing import Any

import torch

from ..errors import LineageError


class TrustRadius:
    def __init__(self, radius: float, step: int, previous_state: dict[str, Any]):
        self.radius = radius
        self.step = step
        # λ_{t-1} and ‖τ_1‖…‖τ_{t-1}‖ per matrix, read from the previous record
        self.previous: dict[str, tuple[float, list[float]]] = self._read(previous_state) if step > 1 else {}
        self.lambdas: dict[str, float] = {}
        self.norms: dict[str, list[float]] = {}

    def _read(self, state: dict[str, Any]) -> dict[str, tuple[float, list[float]]]:
        scales = state.get("rescale")
        ok = isinstance(scales, dict) and all(
            isinstance(v, dict) and isinstance(v.get("lambda"), int | float)
            and isinstance(v.get("norms"), list) and len(v["norms"]) == self.step - 1 for v in scales.values())
        if not ok or not scales:
            raise LineageError(f"the previous merged model's lineage record lacks a valid NUFILT rescale state for "
                               f"step {self.step} (expected 'rescale' with 'lambda' and {self.step - 1} 'norms' "
                               f"per matrix, got {state.get('rescale')!r}); a trust radius needs every step of "
                               f"the lineage merged with one, so start a new lineage (step 1) with it")
        return {k: (float(v["lambda"]), [float(n) for n in v["norms"]]) for k, v in scales.items()}

    def apply(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor,
              update: torch.Tensor, radius: float | None = None) -> torch.Tensor:
        """W^m_t of one filtered matrix from this step's fused update; records λ_t and ‖τ_t‖. `radius`: κ for
        this matrix at this step, if not the lineage's (an adapter arrival's rule)."""
        if self.previous and name not in self.previous:
            raise LineageError(f"{name}: the previous lineage record holds no rescale state for this matrix (it "
                               f"was not filtered at the earlier steps); start a new lineage (step 1)")
        lam_prev, norms = self.previous.get(name, (1.0, []))
        u = lam_prev * (previous - base) + update
        new_norm = math.sqrt(float((new - base).double().square().sum()))
        self.norms[name] = [*norms, new_norm]
        lam = 1.0
        if self.step > 1:  # step 1: λ_1 = 1, only ‖τ_1‖ is recorded
            kappa = self.radius if radius is None else radius
            target = max(fmean(self.norms[name]), kappa * math.sqrt(float(base.double().square().sum())))
            merged = math.sqrt(float(u.double().square().sum()))
            lam = max(1.0, merged / target) if target > 0 else 1.0
        self.lambdas[name] = lam
        return base + u / lam

    def previous_lambda(self, name: str) -> float:
        """λ_{t-1} of a matrix: the merged task vector as accumulated is λ_{t-1} (W^m_{t-1} − W_0)."""
        return self.previous.get(name, (1.0, []))[0]

    def shrank(self, name: str) -> bool:
        return self.lambdas.get(name, 1.0) > 1.0

    def state(self) -> dict[str, Any]:
        """By matrix name: the same record whatever order the matrices were merged in."""
        return {"rescale": {name: {"lambda": self.lambdas[name], "norms": self.norms[name]}
                            for name in sorted(self.lambdas)}}
