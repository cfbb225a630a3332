"""The flat spectrum post-step of the plus-iso profile (Iso-C's isotropic merge).

A merged task vector U Σ Vᵀ of one matrix becomes c · U Vᵀ, c keeping its Frobenius norm: the directions
few tasks share are no longer drowned by the dominant ones. plus-iso applies it only where the trust-radius
rescaling shrank the matrix, the case it compensates (flattening every matrix cost forgetting with gentle
fine-tunes on the benchmark's dev split). Singular values below the weights' rounding noise are dropped, not
raised: a low-rank task vector (a LoRA arrival) would otherwise be flattened into noise.
"""

from __future__ import annotations

import math

import torch

from ..linalg import gram64


def rounding_floor(base: torch.Tensor, eps: float) -> float:
    """The singular value below which a difference of two [m, n] models stored with machine epsilon `eps`
    at `base`'s scale is rounding noise: eps · rms(base) · (√m + √n), about 3× the largest singular value
    of the rounding errors (0.2-0.33× that, measured for fp32, bf16 and fp16)."""
    m, n = base.shape
    return eps * float(base.double().norm()) / math.sqrt(m * n) * (math.sqrt(m) + math.sqrt(n))


def flatten_spectrum(delta: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """delta = U Σ Vᵀ → c · U Vᵀ over its singular values above `floor` (and 1e-7 σ_1), c keeping ‖delta‖_F
    (the directions below the floor are dropped).

    fp32 and narrower go through the eigendecomposition of the fp64 Gram matrix of the smaller side, as
    top_right_singular_vectors does (1.5-3.9× cheaper than an fp64 SVD, bench/speed/flatten.py; fp32's
    rounding floor is far above fp64's √eps), with U Vᵀ = delta V Σ⁻¹ Vᵀ; fp64 keeps the SVD."""
    x = delta.double()
    wide = x.shape[1] > x.shape[0]
    if wide:
        x = x.T  # [long side, short side]: V spans the short one
    if delta.dtype == torch.float64:
        _, sigma, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.T
    else:
        evals, v = torch.linalg.eigh(gram64(x))  # x is already fp64 with the short side last
        sigma = evals.clamp_min(0).sqrt()
    keep = sigma > max(float(sigma.max()) * 1e-7, floor) if sigma.numel() else sigma.bool()
    if not bool(keep.any()):
        return delta
    level = x.norm() / math.sqrt(int(keep.sum()))  # every kept direction at one level, ‖delta‖_F kept
    vk = v[:, keep]
    out = ((x @ vk) * (level / sigma[keep])) @ vk.T
    return (out.T if wide else out).to(delta.dtype)
