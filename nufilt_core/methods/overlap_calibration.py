"""Calibrating the over-accumulation of one merge step (a lever studied on the quality benchmark's dev split).

Where the earlier tasks' merged task vector M and this step's update N push the same output-side direction, their
sum inflates its singular value (the spectral over-accumulation that SVC, arXiv 2602.05536, calibrates in batch
merges). For each left singular vector u_i of M + N above the rounding floor, with a_i = u_iᵀM and b_i = u_iᵀN
(rows, a_i + b_i = σ_i v_iᵀ), σ_i² = ‖a_i‖² + ‖b_i‖² + 2⟨a_i, b_i⟩: a positive cross term is what pushing together
added, and it is removed, σ_i' = √(σ_i² − 2⟨a_i, b_i⟩⁺), the value the direction would have had with the two
contributions orthogonal; directions where they conflict, and the rest of the spectrum, are left as they are.
"""

from __future__ import annotations

import torch

from ..linalg import gram64
from .flat_spectrum import significant


def calibrate_overlap(merged_before: torch.Tensor, update: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """The update N' such that merged_before + N' is merged_before + update with its over-accumulated singular values
    calibrated (see the module's docstring); fp64 inside, `update`'s dtype out."""
    m, n = merged_before.double(), update.double()
    total = m + n
    evals, vectors = torch.linalg.eigh(gram64(total))  # of the smaller side
    sigma = evals.clamp_min(0).sqrt()
    wide = total.shape[1] > total.shape[0]  # then the Gram matrix is total totalᵀ: its vectors are the left ones
    keep = significant(sigma, floor)
    if not bool(keep.any()):
        return update
    sigma = sigma[keep]
    u = vectors[:, keep] if wide else (total @ vectors[:, keep]) / sigma
    a, b = u.T @ m, u.T @ n  # [k, d_in] each
    cross = (a * b).sum(dim=1).clamp_min(0)
    calibrated = (sigma.square() - 2 * cross).clamp_min(0).sqrt()
    # total = Σ u_i (a_i + b_i): each direction's row scaled by σ_i'/σ_i
    out = total - u @ (((sigma - calibrated) / sigma)[:, None] * (a + b))
    return (out - m).to(update.dtype)
