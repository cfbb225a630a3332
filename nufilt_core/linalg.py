"""Small linear-algebra helpers shared by the methods."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import syevr

GRAM_BLOCK = 128  # columns per block of the Gram matrix's upper triangle


def gram64(x: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of x's smaller side in fp64: xᵀx [d_in, d_in] when d_in ≤ d_out, else xxᵀ.
    fp32 products are exact in fp64, so this loses nothing of x. Formed a block row of the upper triangle at
    a time and mirrored: about half the products of one n × n matmul (measured 1.5× faster for 768 columns)."""
    x64 = x.double()
    if x.shape[1] > x.shape[0]:
        x64 = x64.T
    n = x64.shape[1]
    g = x64.new_empty((n, n))
    for i in range(0, n, GRAM_BLOCK):
        j = i + GRAM_BLOCK
        row = x64[:, i:j].T @ x64[:, i:]  # G[i:j, i:]
        g[i:j, i:] = row
        g[j:, i:j] = row[:, GRAM_BLOCK:].T
    return g


# The partial eigensolver stops when its Ritz vectors are within this angle of the true top-k subspace
# (Davis–Kahan: sin θ ≤ residual / gap): far below what an fp32 SVD of x resolves (≈ 1e-5 here).
EIGEN_ANGLE = 1e-8
# a full fp64 eigh costs about this many n³ flops at matmul speed (measured: 8.5–9.5 for n = 768–2048)
EIGH_COST_N3 = 9.0


def top_eigenpairs(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The top-k eigenvalues (descending) and eigenvectors [n, k] of a symmetric PSD matrix by subspace
    iteration with Rayleigh–Ritz, or None where a full `eigh` is the better tool: k not ≪ n, a rank below k,
    or a spectrum whose gap after k would take more than half of a full eigh's work to resolve.

    For V̂t (k = r_v = 8 of n = 768) this takes 6–8 products of the Gram matrix with a block of 32 and is
    ~5× faster than `eigh`. Deterministic: the start block is seeded. The result is accurate to EIGEN_ANGLE
    (checked on the residuals, not assumed), so it spans what `eigh`'s top-k span."""
    n = gram.shape[0]
    b = min(n, max(4 * k, k + 24))  # the block: its last Ritz value sets the speed of convergence
    if k <= 0 or 6 * b > n:
        return None
    per_iter = 2 * n * n * b + 6 * n * b * b  # G·Q, QR and the Ritz vectors
    budget, spent = EIGH_COST_N3 * n**3 / 2, per_iter
    q = torch.linalg.qr(gram @ seeded_normal((n, b), 0).to(gram)).Q
    while True:
        z = gram @ q
        theta, y = torch.linalg.eigh(q.T @ z)  # Rayleigh–Ritz, ascending
        theta, y = theta.flip(0), y.flip(1)[:, :k]
        if theta[k - 1] <= 1e-12 * theta[0]:
            return None  # rank below k: eigh's zero cut-off decides what is kept
        u = q @ y
        residual = float((z @ y - u * theta[:k]).norm(dim=0).max())
        gap = float(theta[k - 1] - theta[k])  # b > k
        if residual <= EIGEN_ANGLE * gap:
            return theta[:k], u
        # the k-th direction's error shrinks by about θ_b / θ_k per step: the steps still needed, at that rate
        rate = max(float(theta[-1] / theta[k - 1]), 1e-30)
        need = math.log(EIGEN_ANGLE * gap / residual) / math.log(rate) if rate < 1 and gap > 0 else math.inf
        if spent + need * per_iter > budget:
            return None
        q = torch.linalg.qr(z).Q
        spent += per_iter


@functools.cache
def _blas_threads() -> Any:
    """threadpoolctl's view of the loaded BLAS libraries, taken once (after SciPy loaded its own): building
    it scans /proc/self/maps, which a call per matrix would redo hundreds of times a step."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """SciPy's BLAS held to one thread inside the block: matrices merged in parallel each get one, and the
    limit `lapack_top_eigenpairs` sets and restores per call cannot be undone by another thread's exit."""
    try:
        import scipy.linalg  # noqa: F401  (loads its BLAS before threadpoolctl looks)
    except ImportError:
        yield
        return
    with _blas_threads().limit(limits=1, user_api="blas"):
        yield


def lapack_top_eigenpairs(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The top-k eigenpairs (descending) of an fp64 Gram matrix from LAPACK's syevr, which computes only those k
    (tridiagonalisation, then k eigenvectors): 1.5× torch's full eigh for 128 of 768, 3× for 128 of 2048,
    as accurate (projectors within 1e-11); called without the interpreter lock (syevr.py), so matrices merged
    in parallel threads do not wait for each other there. None where torch's eigh is used instead: off the
    CPU, not fp64, k > n/2, torch on more than one thread (SciPy's OpenBLAS is held to one: its threads
    spin-wait beside busy processes as OpenMP's did), or without SciPy."""
    n = gram.shape[0]
    if gram.device.type != "cpu" or gram.dtype != torch.float64 or 2 * k > n or torch.get_num_threads() != 1:
        return None
    if not syevr.available():
        return None
    with _blas_threads().limit(limits=1, user_api="blas"):
        top = syevr.top_eigenpairs(gram.numpy(), k)
    if top is None:
        return None
    evals, evecs = top
    return torch.from_numpy(evals[::-1].copy()), torch.from_numpy(evecs[:, ::-1].copy())


def top_right_singular_vectors(x: torch.Tensor, rank: int, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Top-`rank` right singular vectors of x [d_out, d_in] as columns [d_in, k].

    Directions whose singular value is numerically zero are not returned (k may be < rank):
    they carry nothing of x, so e.g. a zero task vector has no "earlier task directions".

    fp32 (and narrower) inputs go through the symmetric eigendecomposition of the Gram matrix of
    the smaller side, formed in fp64: 1.1–3× cheaper than a full SVD on CPU (most for non-square
    x), and fp64 loses nothing an fp32 SVD resolves (zero cut-off at σ_max·max(shape)·eps_fp32
    ≈ 1e-4 σ_max, far above fp64's √eps ≈ 1e-8). `gram` may pass `gram64(x)` when the caller
    already has it. fp64 inputs keep the SVD, whose precision the Gram matrix would not preserve.
    """
    d_out, d_in = x.shape
    if rank <= 0 or x.numel() == 0 or not bool(x.any()):
        return x.new_zeros((d_in, 0))
    if x.dtype == torch.float64:
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.T
    else:
        g = gram if gram is not None else gram64(x)
        top = top_eigenpairs(g, rank) or lapack_top_eigenpairs(g, rank)
        if top is None:
            evals, evecs = torch.linalg.eigh(g)  # ascending
            top = evals.flip(0), evecs.flip(1)
        s, v = top[0].clamp_min(0).sqrt(), top[1]
    tol = s.max() * max(x.shape) * torch.finfo(x.dtype).eps  # as torch.linalg.matrix_rank
    k = min(rank, int((s > tol).sum()))
    if x.dtype != torch.float64 and d_in > d_out:
        v = (x.double().T @ v[:, :k]) / s[:k]  # right vectors from the left ones: v_i = xᵀ u_i / σ_i
    return v[:, :k].to(x.dtype)


def low_rank_right_singular_vectors(left: torch.Tensor, right: torch.Tensor, rank: int) -> torch.Tensor:
    """What top_right_singular_vectors(left @ right, rank) returns, without forming the product: for a
    low-rank x = left [d_out, r] · right [r, d_in] (a LoRA update), rightᵀ = Q R̃, then the SVD of the small
    left·R̃ᵀ [d_out, r] = U Σ Wᵀ gives x = U Σ (Q W)ᵀ; in fp64, O((d_out + d_in) r²) instead of O(d_out d_in²).
    The same zero cut-off, at the inputs' precision."""
    d_out, d_in = left.shape[0], right.shape[1]
    if rank <= 0 or not bool(left.any()) or not bool(right.any()):
        return left.new_zeros((d_in, 0))
    q, r = torch.linalg.qr(right.double().T)
    _, s, wh = torch.linalg.svd(left.double() @ r.T, full_matrices=False)
    tol = s.max() * max(d_out, d_in) * torch.finfo(left.dtype).eps  # as top_right_singular_vectors
    k = min(rank, int((s > tol).sum()))
    return (q @ wh[:k].T).to(left.dtype)


def adapter_seed(seed: int, name: str, step: int) -> int:
    """Generator seed for one tensor's adapter: first 8 bytes of sha256, little-endian, 63 bits."""
    digest = hashlib.sha256(f"{seed}:{name}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """N(0, 1) drawn on the CPU in fp32, so every device starts from the same numbers."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
