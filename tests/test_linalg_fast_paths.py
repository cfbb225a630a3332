"""The engine's fast paths against the plain computations they replace.

`top_right_singular_vectors` takes fp32 inputs through an fp64 Gram eigendecomposition instead
of a full SVD, and `nufilt_matrix` runs Adam on hand-written gradients (through G = τᵀτ when
d_in < 2·d_out) instead of autograd on the paper's loss. Both must give the plain results.
"""

from __future__ import annotations

import pytest
import torch

from nufilt_core.linalg import seeded_normal, top_right_singular_vectors
from nufilt_core.methods.nufilt import NufiltSettings, nufilt_matrix, paper_loss


def task_like(d_out: int, d_in: int, rank: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    """Low-rank-dominant plus noise, with a decaying spectrum (as real task vectors)."""
    g = torch.Generator().manual_seed(seed)
    s = 1.0 / torch.arange(1, rank + 1, dtype=torch.float32)
    low = (torch.randn(d_out, rank, generator=g) * s) @ torch.randn(rank, d_in, generator=g) / rank
    return low + noise * low.norm() / (d_out * d_in) ** 0.5 * torch.randn(d_out, d_in, generator=g)


def projector(v: torch.Tensor) -> torch.Tensor:
    return v.double() @ v.double().T


@pytest.mark.parametrize("d_out,d_in", [(48, 48), (96, 32), (32, 96)])  # square, tall (xᵀx), wide (xxᵀ)
def test_top_vectors_span_the_svd_subspace(d_out, d_in):
    x = task_like(d_out, d_in, 12, seed=d_out + d_in)
    vh = torch.linalg.svd(x.double(), full_matrices=False)[2]
    for k in (4, 12, 20):
        # k = 12 ends the dominant part, where the gap is large; 4 and 20 cut inside a decaying spectrum
        v = top_right_singular_vectors(x, k)
        assert v.dtype == x.dtype and v.shape == (d_in, k)
        assert torch.allclose(v.T.double() @ v.double(), torch.eye(k, dtype=torch.float64), atol=1e-5)
        want = vh[:k].T
        assert (projector(v) - projector(want)).norm() < 1e-4 * k**0.5, k


def test_rank_deficient_and_gram_argument():
    x = task_like(40, 24, 5, seed=1, noise=0.0)  # exactly rank 5
    assert top_right_singular_vectors(x, 16).shape == (24, 5)  # zero directions are never returned
    assert top_right_singular_vectors(x.T.contiguous(), 16).shape == (40, 5)  # wide side too
    gram = x.double().T @ x.double()
    assert torch.equal(top_right_singular_vectors(x, 3, gram=gram), top_right_singular_vectors(x, 3))
    x64 = x.double()  # fp64 keeps the SVD path
    assert torch.allclose(projector(top_right_singular_vectors(x64, 3)), projector(top_right_singular_vectors(x, 3)),
                          atol=1e-5)


def autograd_nufilt(tau_prev, tau_new, a0, s: NufiltSettings, v_prev, v_new):
    """The paper's loss (nufilt.paper_loss, rebuilt from the full matrices every step), autograd + Adam."""
    d_in = tau_new.shape[1]
    p = torch.eye(d_in) - v_prev @ v_prev.T
    a = a0.clone().requires_grad_(True)
    b = torch.zeros(d_in, a0.shape[0], requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=s.lr)
    for _ in range(s.iters):
        loss = paper_loss(tau_prev, tau_new, a, b, v_prev, v_new, s)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return a.detach(), b.detach(), tau_new @ (p + b.detach() @ a.detach())


@pytest.mark.parametrize("d_out,d_in", [(64, 48), (48, 48), (40, 64), (24, 64)])  # Gram path ×3, direct path
def test_hand_written_adam_follows_autograd(d_out, d_in):
    tau_prev = task_like(d_out, d_in, 10, seed=3)
    tau_new = task_like(d_out, d_in, 8, seed=4) + 0.3 * tau_prev
    s = NufiltSettings(null_rank=6, task_rank=4, lora_rank=5, iters=30, lr=1e-2, lambda_old=2.0)
    a0 = seeded_normal((5, d_in), 11) * 0.02
    r = nufilt_matrix(tau_prev, tau_new, a0, s)
    a, b, update = autograd_nufilt(tau_prev, tau_new, a0, s, r.v_prev, r.v_new)
    assert r.loss_after < 0.9 * r.loss_before  # the adapter did real work, so the comparison means something
    assert (r.b - b).norm() <= 1e-4 * b.norm()
    assert (r.a - a).norm() <= 1e-4 * a.norm()
    assert (r.update - update).norm() <= 1e-5 * update.norm()
