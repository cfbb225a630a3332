"""Small linear-algebra helpers shared by the methods."""

from __future__ import annotations

import hashlib

import torch


def top_right_singular_vectors(x: torch.Tensor, rank: int, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Top-`rank` right singular vectors of x [d_out, d_in] as columns [d_in, k].

    Directions whose singular value is numerically zero are not returned (k may be < rank):
    they carry nothing of x, so e.g. a zero task vector has no "earlier task directions".

    fp32 (and narrower) inputs go through the symmetric eigendecomposition of the Gram matrix of
    the smaller side, formed in fp64: 1.1–3× cheaper than a full SVD on CPU (most for non-square
    x), and fp64 loses nothing an fp32 SVD resolves (zero cut-off at σ_max·max(shape)·eps_fp32
    ≈ 1e-4 σ_max, far above fp64's √eps ≈ 1e-8). `gram` may pass xᵀx (fp64) when the caller
    already has it. fp64 inputs keep the SVD, whose precision the Gram matrix would not preserve.
    """
    d_out, d_in = x.shape
    if rank <= 0 or x.numel() == 0 or not bool(x.any()):
        return x.new_zeros((d_in, 0))
    if x.dtype == torch.float64:
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.T
    else:
        x64 = x.double()
        wide = d_in > d_out  # eigendecompose the smaller of xᵀx and xxᵀ
        if gram is None or wide:
            gram = x64 @ x64.T if wide else x64.T @ x64
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        s = evals.flip(0).clamp_min(0).sqrt()
        v = evecs.flip(1)
    tol = s.max() * max(x.shape) * torch.finfo(x.dtype).eps  # as torch.linalg.matrix_rank
    k = min(rank, int((s > tol).sum()))
    if x.dtype != torch.float64 and d_in > d_out:
        v = (x64.T @ v[:, :k]) / s[:k]  # right vectors from the left ones: v_i = xᵀ u_i / σ_i
    return v[:, :k].to(x.dtype)


def adapter_seed(seed: int, name: str, step: int) -> int:
    """Generator seed for one tensor's adapter: first 8 bytes of sha256, little-endian, 63 bits."""
    digest = hashlib.sha256(f"{seed}:{name}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """N(0, 1) drawn on the CPU in fp32, so every device starts from the same numbers."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
