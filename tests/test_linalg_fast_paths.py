"""The engine's fast paths against the plain computations they replace.

`top_right_singular_vectors` takes fp32 inputs through an fp64 Gram eigendecomposition instead
of a full SVD (for a few top directions of a large matrix, a subspace iteration instead of the
full `eigh`), and `nufilt_matrix` runs Adam (written out, `adam_step`) on hand-written gradients
(through G = τᵀτ when d_in < 2·d_out) instead of torch.optim.Adam and autograd on the paper's
loss. All must give the plain results.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from nufilt_core.linalg import (
    gram64,
    lapack_top_eigenpairs,
    seeded_normal,
    top_eigenpairs,
    top_right_singular_vectors,
)
from nufilt_core.methods.nufilt import NufiltSettings, adam_step, nufilt_matrix, paper_loss


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


def spectrum_matrix(values: list[float], n: int, seed: int) -> torch.Tensor:
    """Q diag(values, 0…) Qᵀ in fp64: a symmetric PSD matrix with a chosen spectrum."""
    q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q
    lam = torch.zeros(n, dtype=torch.float64)
    lam[: len(values)] = torch.tensor(values, dtype=torch.float64)
    return (q * lam) @ q.T


def test_partial_eigensolver_spans_eighs_top_k():
    # k = r_v = 8 of n = 256: the subspace iteration runs (block 32 ≤ n / 6) and must give eigh's subspace
    x = task_like(400, 256, 12, seed=5)
    gram = gram64(x)
    top = top_eigenpairs(gram, 8)
    assert top is not None
    evals, evecs = torch.linalg.eigh(gram)
    want = evecs.flip(1)[:, :8]
    assert (projector(top[1]) - projector(want)).norm() < 1e-7
    assert torch.allclose(top[0], evals.flip(0)[:8], rtol=1e-10)
    assert torch.equal(top_eigenpairs(gram, 8)[1], top[1])  # seeded start: deterministic
    # through top_right_singular_vectors, for a tall and a wide matrix, against the fp64 SVD
    for m in (x, x.T.contiguous()):
        vh = torch.linalg.svd(m.double(), full_matrices=False)[2]
        assert (projector(top_right_singular_vectors(m, 8)) - projector(vh[:8].T)).norm() < 1e-6


def test_partial_eigensolver_leaves_hard_cases_to_eigh():
    n = 300
    decaying = [1.0 / (i + 1) for i in range(100)]
    assert top_eigenpairs(spectrum_matrix(decaying, n, 0), 8) is not None
    tied = [*decaying[:7], 0.11, 0.11, *decaying[9:]]  # λ8 = λ9: no top-8 subspace to converge to
    assert top_eigenpairs(spectrum_matrix(tied, n, 1), 8) is None
    flat = [1.0 - 1e-4 * i for i in range(n)]  # the gap after 8 would take longer than eigh
    assert top_eigenpairs(spectrum_matrix(flat, n, 2), 8) is None
    assert top_eigenpairs(spectrum_matrix([3.0, 2.0, 1.0], n, 3), 8) is None  # rank 3 < k
    assert top_eigenpairs(spectrum_matrix(decaying[:64], 64, 4), 8) is None  # k not ≪ n: eigh is as cheap
    # and the callers still get eigh's answer: rank 3 gives 3 directions
    low = task_like(n, n, 3, seed=6, noise=0.0)
    assert top_right_singular_vectors(low, 8).shape == (n, 3)


def test_adam_step_is_torch_adam():
    params = [seeded_normal((5, 7), 1), seeded_normal((7, 5), 2)]
    ref = [p.clone() for p in params]
    opt = torch.optim.Adam(ref, lr=3e-3)
    moments, squares = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for step in range(1, 21):
        grads = [seeded_normal(p.shape, 100 * step + i) * 10.0 ** (i - step % 3) for i, p in enumerate(params)]
        adam_step(params, grads, moments, squares, step, 3e-3)
        for r, g in zip(ref, grads, strict=True):
            r.grad = g
        opt.step()
    for p, r in zip(params, ref, strict=True):
        assert torch.allclose(p, r, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("d_out,d_in", [(300, 200), (200, 300), (64, 64)])  # several blocks, wide, one block
def test_gram64_is_the_plain_product(d_out, d_in):
    x = task_like(d_out, d_in, 8, seed=7)
    x64 = x.double()
    want = x64.T @ x64 if d_in <= d_out else x64 @ x64.T
    got = gram64(x)
    assert torch.equal(got, got.T)  # mirrored, exactly symmetric
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-13 * float(want.abs().max()))


def test_lapack_subset_eigensolver_is_eighs_top_k():
    pytest.importorskip("scipy")
    x = task_like(300, 200, 40, seed=8)
    gram = gram64(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert lapack_top_eigenpairs(gram, 64) is None  # more than one torch thread: torch's threaded eigh
        torch.set_num_threads(1)
        evals, evecs = lapack_top_eigenpairs(gram, 64)
        assert lapack_top_eigenpairs(gram, 150) is None  # k > n/2: no cheaper than the full eigh
    finally:
        torch.set_num_threads(threads)
    want_vals, want_vecs = torch.linalg.eigh(gram)
    assert torch.allclose(evals, want_vals.flip(0)[:64], rtol=1e-10)
    assert (projector(evecs) - projector(want_vecs.flip(1)[:, :64])).norm() < 1e-9


def test_syevr_gives_scipy_s_bytes_and_lets_other_threads_run():
    """The ctypes call of LAPACK's dsyevr returns exactly what SciPy's eigh (driver evr, a subset) does, and other
    Python threads run while it computes (SciPy's wrapper holds the interpreter lock throughout)."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    from nufilt_core import syevr

    gram = gram64(task_like(2200, 2000, 60, seed=3)).numpy()
    want = scipy_linalg.eigh(gram, subset_by_index=[2000 - 32, 1999], driver="evr", check_finite=False)
    before = gram.copy()
    got = syevr.top_eigenpairs(gram, 32)
    assert got is not None and np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np.array_equal(gram, before)  # its input is left as it was

    def others_ran_during(call) -> int:  # type: ignore[no-untyped-def]
        """Increments another thread made while `call` ran."""
        counted, done = [0], threading.Event()

        def count() -> None:
            while not done.is_set():
                counted[0] += 1

        counter = threading.Thread(target=count)
        counter.start()
        try:
            time.sleep(0.05)  # the counter is running
            at_start = counted[0]
            call()
            return counted[0] - at_start
        finally:
            done.set()
            counter.join()

    holding = others_ran_during(lambda: scipy_linalg.eigh(gram, subset_by_index=[2000 - 32, 1999], driver="evr"))
    released = others_ran_during(lambda: syevr.top_eigenpairs(gram, 32))
    # held, the counter runs only around the call (a switch interval or two); released, throughout it
    assert released > 5 * holding, (released, holding)
