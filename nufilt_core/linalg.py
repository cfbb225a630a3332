"""Small linear-algebra helpers shared by the methods."""

from __future__ import annotations

import hashlib

import torch


def top_right_singular_vectors(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` right singular vectors of x [d_out, d_in] as columns [d_in, k].

    Directions whose singular value is numerically zero are not returned (k may be < rank):
    they carry nothing of x, so e.g. a zero task vector has no "earlier task directions".
    """
    if rank <= 0 or x.numel() == 0:
        return x.new_zeros((x.shape[1], 0))
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    tol = s.max() * max(x.shape) * torch.finfo(x.dtype).eps  # as torch.linalg.matrix_rank
    k = min(rank, int((s > tol).sum()))
    return vh[:k].T


def adapter_seed(seed: int, name: str, step: int) -> int:
    """Generator seed for one tensor's adapter: first 8 bytes of sha256, little-endian, 63 bits."""
    digest = hashlib.sha256(f"{seed}:{name}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """N(0, 1) drawn on the CPU in fp32, so every device starts from the same numbers."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
