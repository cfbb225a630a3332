"""The seven continual baselines against their formulas, through the real engine.

Each formula is re-implemented here independently, on whole in-memory state dicts, following the
published code's structure (TIES: flatten the model, `kthvalue` trim, sign election, disjoint
mean; OPCM: full SVD, zero the diagonal and the top-left block, rescale by the flattened norms;
WUDI: autograd + Adam on the stacked task vectors; DOP: FusionBench's loop, two backward passes
per Adam step and the two-point min-norm solver). The engine (`merge_step`, streaming, one
tensor at a time, state carried through the lineage record) must agree over three steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from models import base_state, finetune, load, write_model

from nufilt_core.checkpoint import LINEAGE_NAME
from nufilt_core.errors import LineageError
from nufilt_core.kth_magnitude import KthMagnitude
from nufilt_core.merge import MergeRequest, merge_step
from nufilt_core.methods import METHODS
from nufilt_core.methods.dop import DopSettings, dop_matrix
from nufilt_core.methods.opcm import OpcmSettings
from nufilt_core.methods.ties import TiesSettings
from nufilt_core.methods.wudi import WudiSettings, wudi_matrix
from nufilt_core.selection import is_linear_weight

State = dict[str, torch.Tensor]
STEPS = 3


def floats(state: State) -> list[str]:
    return sorted(n for n, v in state.items() if v.is_floating_point())


def task_vector(model: State, base: State) -> State:
    return {n: model[n] - base[n] for n in floats(base)}


def with_base_buffers(merged: State, base: State) -> State:
    return {**{n: v for n, v in base.items() if not v.is_floating_point()}, **merged}


# ---- the formulas, written independently of nufilt_core -------------------------------------------

def ref_weight_average(base: State, tasks: list[State]) -> list[State]:
    merged, out = base, []
    for t, theta in enumerate(tasks, 1):
        merged = {n: ((t - 1) * merged[n] + theta[n]) / t for n in floats(base)}
        out.append(merged)
    return out


def ref_task_arithmetic(base: State, tasks: list[State], lam: float = 0.3) -> list[State]:
    merged, out = base, []
    for theta in tasks:
        merged = {n: merged[n] + lam * (theta[n] - base[n]) for n in floats(base)}
        out.append(merged)
    return out


def ties_of(vectors: list[State], names: list[str], topk: float, merge_func: str = "mean") -> State:
    """TIES of task vectors as the TIES code: flatten, kthvalue trim per row, elect, disjoint mean."""
    flat = torch.vstack([torch.cat([v[n].reshape(-1) for n in names]) for v in vectors])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * topk), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = trimmed * torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    merged = selected.sum(dim=0)
    if merge_func == "mean":
        merged = merged / (selected != 0).sum(dim=0).to(flat.dtype).clamp(min=1)
    out, at = {}, 0
    for n in names:
        size = vectors[0][n].numel()
        out[n] = merged[at:at + size].view(vectors[0][n].shape)
        at += size
    return out


def ref_ties(base: State, tasks: list[State], lam: float = 0.3, topk: float = 0.2,
             merge_func: str = "mean") -> list[State]:
    names, merged, out = floats(base), base, []
    for theta in tasks:
        update = ties_of([task_vector(merged, base), task_vector(theta, base)], names, topk, merge_func)
        merged = {n: merged[n] + lam * update[n] for n in names}
        out.append(merged)
    return out


def ref_magmax(base: State, tasks: list[State], lam: float = 0.5) -> list[State]:
    running = {n: torch.zeros_like(base[n]) for n in floats(base)}  # the unscaled maximum-magnitude vector
    out = []
    for theta in tasks:
        tau = task_vector(theta, base)
        running = {n: torch.where(tau[n].abs() >= running[n].abs(), tau[n], running[n]) for n in running}
        out.append({n: base[n] + lam * running[n] for n in running})
    return out


def norm(vector: State) -> float:
    return float(torch.cat([v.reshape(-1) for v in vector.values()]).norm())


def ref_opcm(base: State, tasks: list[State], alpha: float = 0.5) -> tuple[list[State], list[float]]:
    merged = {n: tasks[0][n] for n in floats(base)}
    norms, lam_prev = [norm(task_vector(tasks[0], base))], 1.0
    out, lambdas = [merged], [1.0]
    for theta in tasks[1:]:
        norms.append(norm(task_vector(theta, base)))
        unscaled = {}
        for n in floats(base):
            tau_prev, tau = merged[n] - base[n], theta[n] - base[n]
            if is_linear_weight(n, tuple(tau.shape)):
                u, s, vh = torch.linalg.svd(tau_prev, full_matrices=True)
                split = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                proj = u.T @ tau @ vh.T
                proj.diagonal().fill_(0)
                proj[:split, :split] = 0
                tau = u @ proj @ vh
            unscaled[n] = lam_prev * tau_prev + tau
        lam_prev = norm(unscaled) / (sum(norms) / len(norms))
        merged = {n: base[n] + unscaled[n] / lam_prev for n in unscaled}
        out.append(merged)
        lambdas.append(lam_prev)
    return out, lambdas


def ref_wudi_matrix(tvs: torch.Tensor, iters: int, lr: float) -> torch.Tensor:
    """Autograd + Adam on the stacked task vectors [n, d_out, d_in], as the published code."""
    p = torch.nn.Parameter(tvs.sum(dim=0))
    opt = torch.optim.Adam([p], lr=lr, weight_decay=0)
    l2 = tvs.reshape(tvs.shape[0], -1).norm(dim=-1).square()
    for _ in range(iters):
        loss = (torch.matmul(p.unsqueeze(0) - tvs, tvs.transpose(1, 2)).square() / l2[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return p.detach()


def ref_wudi(base: State, tasks: list[State], iters: int = 50, lr: float = 1e-5) -> list[State]:
    merged = {n: tasks[0][n] for n in floats(base)}
    out = [merged]
    for theta in tasks[1:]:
        new = {}
        for n in floats(base):
            tvs = torch.stack([merged[n] - base[n], theta[n] - base[n]])
            if not is_linear_weight(n, tuple(tvs.shape[1:])):
                new[n] = base[n] + tvs.mean(dim=0)
                continue
            new[n] = base[n] + ref_wudi_matrix(tvs, iters, lr)
        merged = new
        out.append(merged)
    return out


def ref_dop_matrix(w0: torch.Tensor, w_prev: torch.Tensor, w_new: torch.Tensor, iters: int = 200, lr: float = 1e-4,
                   alpha: float = 0.8, beta: float = 0.999, eps: float = 0.99999) -> torch.Tensor:
    """FusionBench's loop: full SVDs, autograd on each loss, loss-normalised gradients, 2-point MGDA, EMA."""
    projections = []
    for w in (w_prev, w_new):
        u, s, vh = torch.linalg.svd(w - w0, full_matrices=True)
        r = int(torch.searchsorted(s.cumsum(0) / s.sum(), torch.tensor([eps], dtype=s.dtype)))
        projections.append((u[:, :r], s[:r], vh.T[:, :r]))

    def loss(p: torch.Tensor, i: int) -> torch.Tensor:
        u, s, v = projections[i]
        delta = p - (w_prev, w_new)[i]
        return (torch.diag(s) @ u.T @ delta).square().sum() + (delta @ v @ torch.diag(s)).square().sum()

    p = torch.nn.Parameter((w_prev + w_new) / 2)
    opt = torch.optim.Adam([p], lr=lr)
    ema = [alpha, 1 - alpha]
    for _ in range(iters):
        grads = []
        for i in range(2):
            value = loss(p, i)
            opt.zero_grad()
            value.backward()
            grads.append(p.grad.clone() / float(value.detach()))
        v11, v12, v22 = (float((x * y).sum()) for x, y in ((grads[0], grads[0]), (grads[0], grads[1]),
                                                           (grads[1], grads[1])))
        gamma = 0.999 if v12 >= v11 else 0.001 if v12 >= v22 else -(v12 - v22) / (v11 + v22 - 2 * v12)
        ema = [beta * ema[0] + (1 - beta) * gamma, beta * ema[1] + (1 - beta) * (1 - gamma)]
        total = ema[0] * loss(p, 0) + ema[1] * loss(p, 1)
        opt.zero_grad()
        total.backward()
        opt.step()
    return p.detach()


def ref_dop(base: State, tasks: list[State]) -> list[State]:
    merged = {n: tasks[0][n] for n in floats(base)}
    out = [merged]
    for theta in tasks[1:]:
        merged = {n: ref_dop_matrix(base[n], merged[n], theta[n]) if is_linear_weight(n, tuple(base[n].shape))
                  else (merged[n] + theta[n]) / 2 for n in floats(base)}
        out.append(merged)
    return out


REFERENCES: dict[str, Callable[[State, list[State]], list[State]]] = {
    "weight_average": ref_weight_average,
    "task_arithmetic": ref_task_arithmetic,
    "ties": ref_ties,
    "magmax": ref_magmax,
    "opcm": lambda base, tasks: ref_opcm(base, tasks)[0],
    "wudi": ref_wudi,
    "dop": ref_dop,
}


# ---- the engine ---------------------------------------------------------------------------------

def write_chain(tmp_path: Path, dtype: torch.dtype, edit: Callable[[int, State], None] | None = None):
    base = base_state(dtype=dtype)
    tasks = []
    for i in range(1, STEPS + 1):
        theta = finetune(base, i)
        if edit:
            edit(i, theta)
        tasks.append(theta)
    paths = [write_model(theta, tmp_path / f"t{i}") for i, theta in enumerate(tasks, 1)]
    return base, tasks, write_model(base, tmp_path / "base"), paths


def run_chain(base_path: Path, paths: list[Path], out: Path, method: str, options: dict | None = None):
    previous, results = None, []
    for t, ckpt in enumerate(paths, 1):
        target = out / f"m{t}"
        results.append(merge_step(MergeRequest(base=base_path, checkpoint=ckpt, output=target, previous=previous,
                                               method=method, options=options or {})))
        previous = target
    return [load(r.output) for r in results], [r.record for r in results]


# fp64 checkpoints give tight agreement; fp32 is what production runs. TIES on fp32 is exact
# (same elementwise operations, exact radix select), SVD/Adam differ at rounding level.
TOLERANCE = {torch.float64: {"atol": 1e-10, "rtol": 1e-9}, torch.float32: {"atol": 2e-6, "rtol": 1e-5}}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("method", list(REFERENCES))
def test_engine_matches_formula_over_three_steps(method, dtype, tmp_path):
    base, tasks, base_path, paths = write_chain(tmp_path, dtype)
    got, records = run_chain(base_path, paths, tmp_path / "out", method)
    expected = REFERENCES[method](base, tasks)
    tol = {"atol": 0.0, "rtol": 0.0} if (method == "ties" and dtype == torch.float32) else TOLERANCE[dtype]
    for t, (g, e) in enumerate(zip(got, expected, strict=True), 1):
        assert records[t - 1].step == t and records[t - 1].method == method
        for n, v in with_base_buffers(e, base).items():
            assert g[n].dtype == base[n].dtype
            torch.testing.assert_close(g[n], v, **tol, msg=lambda m, n=n, t=t: f"step {t}, {n}: {m}")
    # the merge really is sensitive to the step (a method that ignored θ_2, θ_3 would pass step 1 only)
    assert any(not torch.equal(got[0][n], got[-1][n]) for n in floats(base))


def test_opcm_lambda_and_norms_carry_through_the_lineage_record(tmp_path):
    base, tasks, base_path, paths = write_chain(tmp_path, torch.float64)
    _, records = run_chain(base_path, paths, tmp_path / "out", "opcm")
    _, lambdas = ref_opcm(base, tasks)
    norms = [norm(task_vector(theta, base)) for theta in tasks]
    for t, record in enumerate(records, 1):
        state = json.loads((tmp_path / "out" / f"m{t}" / LINEAGE_NAME).read_text())["method_state"]
        assert state == record.method_state
        assert state["lambda"] == pytest.approx(lambdas[t - 1], rel=1e-12)
        assert state["task_vector_norms"] == pytest.approx(norms[:t], rel=1e-12)
    assert lambdas[-1] > 1  # the rescaling did something: merged vector norm grew past the mean


def test_opcm_keeps_the_mean_task_vector_norm(tmp_path):
    base, tasks, base_path, paths = write_chain(tmp_path, torch.float64)
    got, _ = run_chain(base_path, paths, tmp_path / "out", "opcm")
    norms = [norm(task_vector(theta, base)) for theta in tasks]
    for t in range(2, STEPS + 1):
        assert norm(task_vector(got[t - 1], base)) == pytest.approx(sum(norms[:t]) / t, rel=1e-10)


def test_opcm_does_not_project_onto_a_zero_previous_matrix(tmp_path):
    frozen = "encoder.layer.0.attention.self.query.weight"

    def freeze_in_first(i: int, theta: State) -> None:
        if i == 1:
            theta[frozen] = base_state(dtype=torch.float64)[frozen].clone()

    base, tasks, base_path, paths = write_chain(tmp_path, torch.float64, freeze_in_first)
    got, records = run_chain(base_path, paths[:2], tmp_path / "out", "opcm")
    tau = tasks[1][frozen] - base[frozen]
    merged = got[1][frozen] - base[frozen]
    # nothing earlier to protect: τ_2 enters whole (the published code would zero its diagonal via SVD(0) = I)
    torch.testing.assert_close(merged, tau / records[1].method_state["lambda"], atol=1e-12, rtol=1e-10)
    assert tau.diagonal().abs().min() > 0


def test_opcm_refuses_a_previous_record_without_its_state(tmp_path):
    _, _, base_path, paths = write_chain(tmp_path, torch.float32)
    m1 = tmp_path / "m1"
    merge_step(MergeRequest(base=base_path, checkpoint=paths[0], output=m1, method="opcm"))
    record = json.loads((m1 / LINEAGE_NAME).read_text())
    record["method_state"] = {}
    record["record_sha256"] = ""  # as a record written before the field: the method's own check is what is tested
    (m1 / LINEAGE_NAME).write_text(json.dumps(record))
    with pytest.raises(LineageError, match="OPCM state"):
        merge_step(MergeRequest(base=base_path, checkpoint=paths[1], output=tmp_path / "m2", previous=m1))
    assert not (tmp_path / "m2").exists()


def test_wudi_moves_off_the_sum_and_lowers_its_loss(tmp_path):
    base, tasks, base_path, paths = write_chain(tmp_path, torch.float64)
    got, records = run_chain(base_path, paths[:2], tmp_path / "out", "wudi")
    summary = records[1].summary
    assert summary["optimized_tensors"] == sum(is_linear_weight(n, tuple(base[n].shape)) for n in floats(base))
    assert summary["loss_after"] < summary["loss_before"]
    name = "encoder.layer.1.intermediate.dense.weight"
    start = (tasks[0][name] - base[name]) + (tasks[1][name] - base[name])
    moved = (got[1][name] - base[name] - start).abs().max()
    assert 1e-5 < moved <= 2 * 50 * 1e-5  # Adam moves each entry by about lr per step at most


@pytest.mark.parametrize("shape", [(40, 8), (12, 12), (16, 32), (8, 40)], ids=["tall", "square", "edge", "wide"])
def test_wudi_matrix_equals_autograd_adam_for_every_shape(shape):
    # the fast gradient takes G (d_in ≤ n·d_out) or the stacked factor (wider): both must equal autograd
    g = torch.Generator().manual_seed(11)
    tvs = torch.randn(2, *shape, generator=g, dtype=torch.float64) * 0.05
    got, before, after = wudi_matrix(list(tvs), iters=50, lr=1e-3)
    torch.testing.assert_close(got, ref_wudi_matrix(tvs, 50, 1e-3), atol=1e-12, rtol=1e-10)
    assert after < before


def test_wudi_leaves_a_zero_task_vector_out_of_its_loss(tmp_path):
    untouched = "encoder.layer.1.output.dense.weight"

    def untouched_in_second(i: int, theta: State) -> None:
        if i == 2:
            theta[untouched] = base_state(dtype=torch.float32)[untouched].clone()

    _, tasks, base_path, paths = write_chain(tmp_path, torch.float32, untouched_in_second)
    got, _ = run_chain(base_path, paths[:2], tmp_path / "out", "wudi")
    # only τ_1 is in the loss, which is 0 at the start τ_1 + 0: the tensor stays at θ_1, no NaN
    assert torch.equal(got[1][untouched], tasks[0][untouched])


def test_ties_published_first_step_is_untrimmed_task_arithmetic(tmp_path):
    base, tasks, base_path, paths = write_chain(tmp_path, torch.float32)
    got, _ = run_chain(base_path, paths[:1], tmp_path / "out", "ties", {"first_step": "published_code"})
    expected = ref_task_arithmetic(base, tasks[:1])[0]
    for n in floats(base):
        torch.testing.assert_close(got[0][n], expected[n], atol=0.0, rtol=0.0)
    formula, _ = run_chain(base_path, paths[:1], tmp_path / "formula", "ties")
    zeroed = sum(int((formula[0][n] == base[n]).sum()) for n in floats(base))
    total = sum(base[n].numel() for n in floats(base))
    assert zeroed == pytest.approx(0.8 * total, abs=2)  # the formula's step 1 trims τ_1 to its top 20 %


def test_ties_majority_sign_settles_exact_cancellations(tmp_path):
    """Where the trimmed values cancel exactly, σ is the model-wide majority sign (a third pass)."""
    bias = "embeddings.LayerNorm.bias"  # zero in the base, so task vectors are the stored values themselves
    base = base_state()
    theta1 = finetune(base, 1)
    signs = torch.tensor([1.0, -1.0]).repeat(base[bias].numel() // 2)
    theta1[bias] = 5 * signs * torch.linspace(1, 2, base[bias].numel())  # large, both signs: kept at both steps
    base_path, t1 = write_model(base, tmp_path / "base"), write_model(theta1, tmp_path / "t1")
    merge_step(MergeRequest(base=base_path, checkpoint=t1, output=tmp_path / "m1", method="ties"))
    m1 = load(tmp_path / "m1")
    theta2 = finetune(base, 2)
    theta2[bias] = -m1[bias]  # τ_2 = −τ_{≤1} exactly on this tensor
    theta2["embeddings.word_embeddings.weight"] += 1.0  # many kept positive entries: majority sign +1
    t2 = write_model(theta2, tmp_path / "t2")
    result = merge_step(MergeRequest(base=base_path, checkpoint=t2, output=tmp_path / "m2", previous=tmp_path / "m1"))
    assert result.record.summary["majority_sign"] == 1.0
    got = load(tmp_path / "m2")
    torch.testing.assert_close(got[bias], m1[bias] + 0.3 * m1[bias].abs(), atol=0.0, rtol=0.0)
    expected = ref_ties(base, [theta1, theta2])[1]
    for n in floats(base):
        torch.testing.assert_close(got[n], expected[n], atol=0.0, rtol=0.0)


def test_ties_sum_merge_func(tmp_path):
    base, tasks, base_path, paths = write_chain(tmp_path, torch.float32)
    got, _ = run_chain(base_path, paths, tmp_path / "out", "ties", {"merge_func": "sum", "scale": 0.5})
    expected = ref_ties(base, tasks, lam=0.5, merge_func="sum")
    mean = ref_ties(base, tasks, lam=0.5)
    for g, e in zip(got, expected, strict=True):
        for n in floats(base):
            torch.testing.assert_close(g[n], e[n], atol=0.0, rtol=0.0)
    assert any(not torch.equal(expected[-1][n], mean[-1][n]) for n in floats(base))  # sum ≠ mean here


# ---- the streaming selector TIES relies on ------------------------------------------------------

def test_kth_magnitude_equals_kthvalue_of_the_concatenation():
    g = torch.Generator().manual_seed(7)
    chunks = [torch.randn(37, 5, generator=g) * 10 ** float(torch.randint(-4, 3, (1,), generator=g))
              for _ in range(6)]
    chunks.append(torch.tensor([0.0, -0.0, 1.5, -1.5, 1.5, 3e-39, -3e-39]))  # zeros, ties, subnormals
    chunks.append(torch.randn(64, generator=g).to(torch.bfloat16).float())  # many exact duplicates
    everything = torch.cat([c.reshape(-1) for c in chunks]).abs()
    d = everything.numel()
    for k in (1, 2, d // 5, d // 2, d - 1, d):
        sel = KthMagnitude()
        for c in chunks:
            sel.count_high(c)
        sel.choose(k)
        for c in reversed(chunks):  # the second pass may see the tensors in any order
            sel.count_low(c)
        expected = everything.kthvalue(k).values
        assert sel.threshold == float(expected), k
        kept = sum(int(sel.keep(c).sum()) for c in chunks)
        assert kept == int((everything >= expected).sum())


@pytest.mark.parametrize("shape", [(40, 8), (12, 12), (8, 40)], ids=["tall", "square", "wide"])
def test_dop_matrix_equals_fusionbench_loop_for_every_shape(shape):
    # the Gram and the factored products (chosen by shape and rank) must both give autograd's numbers
    g = torch.Generator().manual_seed(5)
    w0, w_prev, w_new = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    w_prev, w_new = w0 + 0.05 * (w_prev - w0), w0 + 0.05 * (w_new - w0)
    got, figures = dop_matrix(w0, w_prev, w_new, DopSettings(iters=60, lr=1e-3))
    torch.testing.assert_close(got, ref_dop_matrix(w0, w_prev, w_new, iters=60, lr=1e-3), atol=1e-12, rtol=1e-10)
    assert 0 < figures["ranks"][0] <= min(shape) and 0.001 <= figures["alpha"] <= 0.999
    # it moved off the midpoint, towards lower stability + plasticity losses in sum
    assert sum(figures["loss_after"]) < sum(figures["loss_before"])


def test_dop_without_mgda_descends_the_fixed_mix_and_with_a_zero_target_stays_finite():
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(12, 10, generator=g, dtype=torch.float64)
    w_new = w0 + 0.05 * torch.randn(12, 10, generator=g, dtype=torch.float64)
    got, figures = dop_matrix(w0, w0.clone(), w_new, DopSettings(iters=30, lr=1e-3))
    assert figures["ranks"][0] == 0 and bool(torch.isfinite(got).all())  # τ_m = 0: no directions, no NaN
    w_prev = w0 + 0.05 * torch.randn(12, 10, generator=g, dtype=torch.float64)
    _, figures = dop_matrix(w0, w_prev, w_new, DopSettings(iters=30, lr=1e-4, mgda=False))
    mix = [0.8 * m + 0.2 * n for m, n in (figures["loss_before"], figures["loss_after"])]
    assert figures["alpha"] == 0.8 and mix[1] < mix[0]


def test_kth_magnitude_rank_zero_keeps_everything():
    sel = KthMagnitude()
    x = torch.tensor([0.0, 2.0, -3.0])
    sel.count_high(x)
    sel.choose(0)
    sel.count_low(x)
    assert sel.threshold == 0.0 and bool(sel.keep(x).all())
    with pytest.raises(ValueError, match="exceeds"):
        KthMagnitude().choose(1)


# ---- settings and the CLI -----------------------------------------------------------------------

def test_defaults_are_the_papers():
    assert (TiesSettings().scale, TiesSettings().topk, TiesSettings().merge_func) == (0.3, 0.2, "mean")
    assert OpcmSettings().alpha == 0.5
    assert (WudiSettings().iters, WudiSettings().lr) == (50, 1e-5)
    d = DopSettings()  # FusionBench's dop/dop.yaml
    assert (d.lr, d.iters, d.mgda, d.ema, d.alpha, d.ema_beta, d.svd_epsilon, d.svd_proj_space) == \
        (1e-4, 200, True, True, 0.8, 0.999, 0.99999, "uv")
    assert {"dop", "weight_average", "task_arithmetic", "ties", "magmax", "opcm", "wudi", "nufilt"} <= set(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_merges_a_bf16_model_through_the_cli(method, tmp_path):
    base = base_state(dtype=torch.bfloat16)
    base_path = write_model(base, tmp_path / "base")
    ckpts = [write_model(finetune(base, i), tmp_path / f"t{i}") for i in (1, 2)]
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    # step 1 in-process; step 2, which continues from m1's lineage record, through the real console script
    merge_step(MergeRequest(base=base_path, checkpoint=ckpts[0], output=m1, method=method))
    proc = run_cli("merge", "--base", base_path, "--previous", m1, "--checkpoint", ckpts[1], "--output", m2,
                   "--quiet", "--json")
    record = json.loads(proc.stdout)
    assert (record["method"], record["step"]) == (method, 2)
    for merged in (load(m1), load(m2)):
        assert merged.keys() == base.keys()
        for n, v in base.items():
            assert merged[n].dtype == v.dtype and merged[n].shape == v.shape, n
            if v.is_floating_point():
                assert bool(torch.isfinite(merged[n].float()).all()), n
            else:
                assert torch.equal(merged[n], v), n  # integer buffers are never merged
        assert sum(int((merged[n] != base[n]).sum()) for n in floats(base)) > 0
    assert math.isfinite(record["duration_seconds"])
