"""NUFILT against its formula, on small matrices and through the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from models import base_state, finetune, load, write_model

from nufilt_core.linalg import adapter_seed, seeded_normal, top_right_singular_vectors
from nufilt_core.merge import MergeRequest, merge_step
from nufilt_core.methods.nufilt import ADAPTER_INIT_SCALE, NufiltSettings, nufilt_matrix, paper_loss


def low_rank(d_out: int, d_in: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g) / rank


def test_top_right_singular_vectors_skips_zero_directions():
    x = low_rank(20, 12, 3, 0)
    v = top_right_singular_vectors(x, 8)
    assert v.shape == (12, 3)  # rank 3: only 3 directions carry anything
    assert torch.allclose(v.T @ v, torch.eye(3), atol=1e-5)
    assert torch.allclose(x @ v @ v.T, x, atol=1e-5)  # they span x's row space
    assert top_right_singular_vectors(torch.zeros(5, 4), 3).shape == (4, 0)


def test_filter_only_equals_formula():
    tau_prev, tau_new = low_rank(24, 16, 5, 1), low_rank(24, 16, 4, 2)
    s = NufiltSettings(null_rank=3, lora_rank=0)
    result = nufilt_matrix(tau_prev, tau_new, None, s)
    _, _, vh = torch.linalg.svd(tau_prev)
    v = vh[:3].T
    expected = tau_new @ (torch.eye(16) - v @ v.T)
    assert torch.allclose(result.update, expected, atol=1e-6)
    assert result.update.norm() < tau_new.norm()  # something was filtered


@pytest.mark.parametrize("d_out,d_in", [(24, 16), (16, 24)])  # the Gram-matrix path and the direct one
def test_adapter_lowers_loss_and_respects_formula(d_out, d_in):
    tau_prev, tau_new = low_rank(d_out, d_in, 6, 3), low_rank(d_out, d_in, 5, 4) + 0.3 * low_rank(d_out, d_in, 6, 3)
    s = NufiltSettings(null_rank=4, task_rank=3, lora_rank=4, iters=50, lr=1e-2)
    a0 = seeded_normal((4, d_in), 7) * 0.02
    r = nufilt_matrix(tau_prev, tau_new, a0, s)
    assert r.loss_after < r.loss_before

    # the loss as the paper writes it (nufilt.paper_loss), recomputed from scratch with the returned A, B
    p = torch.eye(d_in) - r.v_prev @ r.v_prev.T

    def loss(b, a):
        return float(paper_loss(tau_prev, tau_new, a, b, r.v_prev, r.v_new, s))

    assert loss(torch.zeros_like(r.b), r.a) == pytest.approx(r.loss_before, rel=1e-5)
    assert loss(r.b, r.a) == pytest.approx(r.loss_after, rel=1e-4)
    # W_t = W_{t-1} + τ_t (P + B A): on earlier directions only the adapter term moves anything
    assert torch.allclose(r.update, tau_new @ (p + r.b @ r.a), atol=1e-5)
    assert torch.allclose(r.update @ r.v_prev, tau_new @ r.b @ r.a @ r.v_prev, atol=1e-5)
    assert (tau_new @ r.b @ r.a).norm() > 0  # the adapter did something


def test_step_one_is_the_checkpoint_on_filtered_tensors(tiny, tmp_path):
    out = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=out))
    merged, ft, base = load(out), load(tiny["t1"]), load(tiny["base"])
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(merged[q], ft[q])  # θ_1^m = θ_1 (P = I, adapter stays at B = 0)
    assert torch.equal(merged["encoder.layer.0.output.dense.weight"], base["encoder.layer.0.output.dense.weight"])
    assert torch.equal(merged["embeddings.LayerNorm.weight"], base["embeddings.LayerNorm.weight"])  # keep_base


def test_published_code_first_step_drops_leading_columns(tiny, tmp_path):
    out = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=out,
                            options={"first_step": "published_code", "null_rank": 4, "lora_rank": 0}))
    merged, ft, base = load(out), load(tiny["t1"]), load(tiny["base"])
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(merged[q][:, :4], base[q][:, :4])  # first r_p input columns of τ_1 filtered away
    assert torch.allclose(merged[q][:, 4:], ft[q][:, 4:])


def test_engine_update_matches_matrix_function(tiny, tmp_path):
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1))
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=m2, previous=m1, seed=5))
    base, prev, new, merged = load(tiny["base"]), load(m1), load(tiny["t2"]), load(m2)
    name = "encoder.layer.1.intermediate.dense.weight"
    s = NufiltSettings()
    a0 = seeded_normal((s.lora_rank, base[name].shape[1]), adapter_seed(5, name, 2)) * ADAPTER_INIT_SCALE
    r = nufilt_matrix(prev[name] - base[name], new[name] - base[name], a0, s)
    assert torch.allclose(merged[name], prev[name] + r.update, atol=1e-6)
    assert not torch.allclose(merged[name], prev[name] + (new[name] - base[name]))  # it did filter


@pytest.mark.parametrize("policy", ["keep_base", "keep_previous", "average"])
def test_policy_for_unfiltered_tensors(tiny, tmp_path, policy):
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", m1, "--policy", policy, "--quiet")
    run_cli("merge", "--base", tiny["base"], "--previous", m1, "--checkpoint", tiny["t2"], "--output", m2, "--quiet")
    base, t1, t2, merged = load(tiny["base"]), load(tiny["t1"]), load(tiny["t2"]), load(m2)
    name = "encoder.layer.0.attention.self.query.bias"
    expected = {"keep_base": base[name], "keep_previous": t1[name], "average": (t1[name] + t2[name]) / 2}[policy]
    assert torch.allclose(merged[name], expected, atol=1e-6)
    assert torch.equal(merged["embeddings.position_ids"], base["embeddings.position_ids"])  # int buffer untouched


def test_include_patterns_choose_the_filtered_tensors(tiny, tmp_path):
    out = tmp_path / "m1"
    run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", out, "--quiet",
            "--include", r"output\.dense\.weight$")
    merged, base, ft = load(out), load(tiny["base"]), load(tiny["t1"])
    assert torch.equal(merged["encoder.layer.0.output.dense.weight"], ft["encoder.layer.0.output.dense.weight"])
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(merged[q], base[q])  # not selected any more: keep_base


def test_deterministic_bytes(tiny, tmp_path):
    outs = []
    for k in range(2):
        m1, m2 = tmp_path / f"a{k}", tmp_path / f"b{k}"
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1, seed=3))
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=m2, previous=m1))
        outs.append((m2 / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    m3 = tmp_path / "other-seed"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=m3, previous=tmp_path / "a0", seed=4))
    assert (m3 / "model.safetensors").read_bytes() != outs[0]  # the seed does reach the adapter


def test_fp16_and_bf16_keep_their_dtype(tmp_path: Path):
    for dtype in (torch.float16, torch.bfloat16):
        base = base_state(dtype=dtype)
        b = write_model(base, tmp_path / f"base-{dtype}")
        t1 = write_model(finetune(base, 1), tmp_path / f"t1-{dtype}")
        t2 = write_model(finetune(base, 2), tmp_path / f"t2-{dtype}")
        m1, m2 = tmp_path / f"m1-{dtype}", tmp_path / f"m2-{dtype}"
        merge_step(MergeRequest(base=b, checkpoint=t1, output=m1))
        merge_step(MergeRequest(base=b, checkpoint=t2, output=m2, previous=m1))
        merged = load(m2)
        for name, tensor in base.items():
            assert merged[name].dtype == tensor.dtype, name
            assert torch.isfinite(merged[name].float()).all() if tensor.is_floating_point() else True


# ---- levers beyond the paper (issue 9): rescaling and r_p by energy ----------------------------

def _filtered(names) -> list[str]:
    from nufilt_core.selection import Selection

    sel = Selection.resolve(names)
    return [n for n in names if sel.is_filtered(n, (1, 1))]


@pytest.mark.parametrize(("unit", "radius", "growth"), [("model", 0.0, 0.0), ("matrix", 0.0, 0.0), ("model", 0.05, 0.0),
                                                        ("matrix", 0.05, 0.0), ("matrix", 0.0, -0.5)])
def test_rescale_follows_opcms_rule_on_the_fused_update(tiny, unit, radius, growth, tmp_path):
    # an independent replay: U = λ_{t-1} τ_{≤t-1} + update (update from nufilt_matrix),
    # λ_t = max(1, ‖U‖ / max(mean ‖τ_i‖ · t^growth, κ‖W0‖))
    opts = {"rescale": unit, "rescale_radius": radius, "rescale_growth": growth}
    paths = [tiny["t1"], tiny["t2"], tiny["t3"]]
    previous, outs = None, []
    for t, ckpt in enumerate(paths, 1):
        out = tmp_path / f"m{t}"
        merge_step(MergeRequest(base=tiny["base"], checkpoint=ckpt, output=out, previous=previous,
                                options=opts if t == 1 else {}))
        previous = out
        outs.append(load(out))
    base = load(tiny["base"])
    names = [n for n in _filtered(list(base)) if base[n].ndim == 2]
    s = NufiltSettings(**opts)
    merged = {n: base[n].clone() for n in names}
    lam = {n: 1.0 for n in names} if unit == "matrix" else {"": 1.0}
    norms: dict[str, list[float]] = {k: [] for k in lam}
    for t, ckpt in enumerate(paths, 1):
        theta = load(ckpt)
        u = {}
        for n in names:
            a0 = seeded_normal((s.lora_rank, base[n].shape[1]), adapter_seed(0, n, t)) * ADAPTER_INIT_SCALE
            r = nufilt_matrix(merged[n] - base[n], theta[n] - base[n], a0, s)
            u[n] = lam[n if unit == "matrix" else ""] * (merged[n] - base[n]) + r.update
        groups = {n: [n] for n in names} if unit == "matrix" else {"": names}
        for k, members in groups.items():
            norms[k].append(sum(float((theta[n] - base[n]).double().square().sum()) for n in members) ** 0.5)
            size = sum(float(u[n].double().square().sum()) for n in members) ** 0.5
            w0 = sum(float(base[n].double().square().sum()) for n in members) ** 0.5
            lam[k] = 1.0 if t == 1 else max(1.0, size / max(sum(norms[k]) / t * t**growth, radius * w0))
            for n in members:
                merged[n] = base[n] + u[n] / lam[k]
        for n in names:
            torch.testing.assert_close(outs[t - 1][n], merged[n], atol=2e-6, rtol=1e-5)
    assert max(lam.values()) > 1  # the rule did shrink something
    # unfiltered tensors follow the policy, untouched by the rescaling
    b = "encoder.layer.0.attention.self.query.bias"
    assert torch.equal(outs[-1][b], base[b])


def test_rescale_state_is_required_to_continue(tiny, tmp_path):
    import json

    from nufilt_core.checkpoint import LINEAGE_NAME
    from nufilt_core.errors import LineageError

    m1 = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1, options={"rescale": "model"}))
    record = json.loads((m1 / LINEAGE_NAME).read_text())
    assert set(record["method_state"]["rescale"]) == {""} and record["method_state"]["rescale"][""]["lambda"] == 1
    record["method_state"] = {}
    record["record_sha256"] = ""  # as a record written before the field: the method's own check is what is tested
    (m1 / LINEAGE_NAME).write_text(json.dumps(record))
    with pytest.raises(LineageError, match="rescale state"):
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=tmp_path / "m2", previous=m1))


def test_null_energy_filters_the_fewest_directions_holding_that_share():
    g = torch.Generator().manual_seed(3)
    # singular values 8, 4, 2, 1, …: energies 64, 16, 4, 1 → 90 % of the energy needs 2 directions
    u, _ = torch.linalg.qr(torch.randn(20, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))
    sv = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    tau_prev = u @ torch.diag(sv) @ v.T
    tau_new = torch.randn(20, 12, generator=g, dtype=torch.float64)
    for share, k in ((0.75, 1), (0.9, 2), (0.99, 4), (1.0, 6)):
        r = nufilt_matrix(tau_prev, tau_new, None, NufiltSettings(null_energy=share, lora_rank=0))
        assert r.v_prev.shape[1] == k, share
    r = nufilt_matrix(tau_prev, tau_new, None, NufiltSettings(null_energy=1.0, null_rank=3, lora_rank=0))
    assert r.v_prev.shape[1] == 3  # never more than null_rank


def test_task_energy_filters_the_low_rank_part_of_the_new_task_vector():
    g = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(20, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))
    tau_new = u @ torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)) @ v.T
    tau_prev = torch.randn(20, 12, generator=g, dtype=torch.float64)
    for share, k in ((0.75, 1), (0.9, 2), (0.99, 4)):
        got = nufilt_matrix(tau_prev, tau_new, None, NufiltSettings(task_energy=share, lora_rank=0, null_rank=3))
        # the formula, from an independent SVD: τ_k = Σ_{i≤k} σ_i u_i v_iᵀ, then τ_k (I − V̂p V̂pᵀ)
        uu, sv, vh = torch.linalg.svd(tau_new)
        tau_k = uu[:, :k] @ torch.diag(sv[:k]) @ vh[:k]
        vp = torch.linalg.svd(tau_prev).Vh[:3].T
        torch.testing.assert_close(got.update, tau_k - tau_k @ vp @ vp.T)
        assert torch.linalg.matrix_rank(got.update) == k
    whole = nufilt_matrix(tau_prev, tau_new, None, NufiltSettings(task_energy=1.0, lora_rank=0, null_rank=3))
    torch.testing.assert_close(whole.update, nufilt_matrix(tau_prev, tau_new, None,
                                                           NufiltSettings(lora_rank=0, null_rank=3)).update)


def test_a_trust_radius_wider_than_the_merged_vector_leaves_the_papers_nufilt(tiny, tmp_path):
    outs = {}
    for label, opts in (("paper", {}), ("radius", {"rescale": "model", "rescale_radius": 10.0})):
        previous = None
        for t, ckpt in enumerate([tiny["t1"], tiny["t2"]], 1):
            out = tmp_path / f"{label}{t}"
            merge_step(MergeRequest(base=tiny["base"], checkpoint=ckpt, output=out, previous=previous,
                                    options=opts if t == 1 else {}))
            previous = out
        outs[label] = load(previous)
    for n, v in outs["paper"].items():
        torch.testing.assert_close(outs["radius"][n], v, atol=1e-6, rtol=1e-6)


def test_adapter_span_keeps_the_loss_and_drops_what_the_loss_never_saw():
    tau_prev, tau_new = low_rank(24, 16, 5, 1), low_rank(24, 16, 4, 2)
    a0 = seeded_normal((6, 16), 7) * 0.02
    plain = nufilt_matrix(tau_prev, tau_new, a0, NufiltSettings(null_rank=4, lora_rank=6, task_rank=3))
    span = nufilt_matrix(tau_prev, tau_new, a0, NufiltSettings(null_rank=4, lora_rank=6, task_rank=3,
                                                                adapter_span=True))
    assert span.loss_after == pytest.approx(plain.loss_after, rel=1e-5)
    q = torch.linalg.qr(torch.cat([span.v_new, span.v_prev], dim=1)).Q
    outside = span.a - (span.a @ q) @ q.T
    assert outside.abs().max() < 1e-6  # the adapter's rows lie in span([V̂t, V̂p])
    assert (plain.a - (plain.a @ q) @ q.T).norm() > 1e-3  # the paper's adapter does not


def test_policy_sum_adds_unfiltered_tensors_and_rescales_them_with_the_rest(tiny, tmp_path):
    base, t1, t2 = load(tiny["base"]), load(tiny["t1"]), load(tiny["t2"])
    bias = "encoder.layer.0.attention.self.query.bias"
    for opts in ({"policy": "sum"}, {"policy": "sum", "rescale": "matrix"}):
        m1, m2 = tmp_path / "m1", tmp_path / "m2"
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1, options=opts, overwrite=True))
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=m2, previous=m1, overwrite=True))
        got, u = load(m2)[bias], (t1[bias] - base[bias]) + (t2[bias] - base[bias])
        if "rescale" not in opts:
            torch.testing.assert_close(got, base[bias] + u)
        else:  # its own unit: λ = max(1, ‖U‖ / mean(‖τ_1‖, ‖τ_2‖))
            mean = ((t1[bias] - base[bias]).norm() + (t2[bias] - base[bias]).norm()) / 2
            torch.testing.assert_close(got, base[bias] + u / max(1.0, float(u.norm() / mean)))


def test_profile_plus_is_a_named_setting_that_explicit_settings_override(tiny, tmp_path):
    from nufilt_core.methods.nufilt import PROFILES

    out = tmp_path / "m1"
    run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", out, "--quiet",
            "--profile", "plus", "--null-rank", "8")
    import json

    from nufilt_core.checkpoint import LINEAGE_NAME

    settings = json.loads((out / LINEAGE_NAME).read_text())["settings"]
    assert settings["profile"] == "plus" and settings["null_rank"] == 8  # the explicit one wins
    assert {k: settings[k] for k in PROFILES["plus"] if k != "null_rank"} == \
        {k: v for k, v in PROFILES["plus"].items() if k != "null_rank"}
    assert NufiltSettings().profile == "paper" and NufiltSettings().rescale == "none"  # the paper's by default


def test_the_benchmarks_plus_variants_are_the_profiles():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
    from bench.quality.variants import LEVER_GRID, PLUS, PLUS_ISO
    from nufilt_core.methods.nufilt import PROFILES

    assert next(v for v in LEVER_GRID if v.name == PLUS).options == PROFILES["plus"]
    assert next(v for v in LEVER_GRID if v.name == PLUS_ISO).options == PROFILES["plus-iso"]
    from typing import get_args

    from nufilt_core.methods.nufilt import Profile

    assert set(get_args(Profile)) == set(PROFILES)  # the settings' type names every profile, and only those
    plus_iso = NufiltSettings(profile="plus-iso")
    assert plus_iso.spectrum_power == 0.0 and plus_iso.spectrum_when == "shrunk"


@pytest.mark.parametrize("power", [0.0, 0.5])
def test_spectrum_power_reshapes_the_merged_task_vector_and_keeps_its_norm(tiny, tmp_path, power):
    # step 2 with the setting against the paper's step 2, reshaped by an independent SVD: same singular
    # vectors, singular values ∝ σ^p, the same Frobenius norm; unfiltered tensors and step 1 untouched
    outs = {}
    for label, opts in (("paper", {}), ("shaped", {"spectrum_power": power})):
        m1, m2 = tmp_path / f"{label}1", tmp_path / f"{label}2"
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1, options=opts))
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=m2, previous=m1))
        outs[label] = (load(m1), load(m2))
    base = load(tiny["base"])
    names = _filtered(list(base))
    for n in base:
        torch.testing.assert_close(outs["shaped"][0][n], outs["paper"][0][n], rtol=0, atol=0)
        if n not in names or base[n].ndim != 2:
            assert torch.equal(outs["shaped"][1][n], outs["paper"][1][n]), n
            continue
        delta = (outs["paper"][1][n] - base[n]).double()
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        shaped = sv**power
        expected = u @ torch.diag(shaped * sv.norm() / shaped.norm()) @ vh
        got = (outs["shaped"][1][n] - base[n]).double()
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(got.norm(), delta.norm(), atol=0, rtol=1e-5)
        if power == 0.0:
            got_sv = torch.linalg.svdvals(got)
            assert float(got_sv.max() / got_sv.min()) < 1.001  # flat: every direction the same size


def test_clip_spectrum_meets_the_target_by_clipping_the_largest_singular_values():
    from nufilt_core.methods.nufilt import clip_spectrum

    g = torch.Generator().manual_seed(11)
    delta = torch.randn(30, 12, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(1, -1, 12,
                                                                                                dtype=torch.float64))
    sv = torch.linalg.svdvals(delta)
    for share in (0.9, 0.5, 0.1):
        target = share * float(sv.norm())
        lo, hi = 0.0, float(sv[0])  # the level c by bisection, independently of clip_spectrum's search
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float(sv.clamp(max=mid).norm()) < target else (lo, mid)
        got = clip_spectrum(delta, target)
        torch.testing.assert_close(torch.linalg.svdvals(got), sv.clamp(max=hi), atol=1e-9, rtol=1e-9)
        assert abs(float(got.norm()) - target) < 1e-9 * target
        u, _, vh = torch.linalg.svd(delta, full_matrices=False)  # the same singular vectors
        torch.testing.assert_close(got, (u * sv.clamp(max=hi)) @ vh, atol=1e-9, rtol=1e-9)
    assert torch.equal(clip_spectrum(delta, 2 * float(sv.norm())), delta)  # within the target: unchanged


def test_rescale_clip_shrinks_only_the_dominant_directions_of_the_merged_task_vector(tiny, tmp_path):
    # an independent replay of step 2: U = τ_1 + update, target = mean(‖τ_1‖, ‖τ_2‖) per matrix, and U's
    # singular values clipped to reach it; step 1 is the checkpoint
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    opts = {"rescale": "clip"}
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1, options=opts))
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=m2, previous=m1))
    base, t1, t2, got = load(tiny["base"]), load(tiny["t1"]), load(tiny["t2"]), load(m2)
    s = NufiltSettings(**opts)
    clipped = 0
    for n in (n for n in _filtered(list(base)) if base[n].ndim == 2):
        a0 = seeded_normal((s.lora_rank, base[n].shape[1]), adapter_seed(0, n, 2)) * ADAPTER_INIT_SCALE
        tau1, tau2 = (t1[n] - base[n]).double(), (t2[n] - base[n]).double()
        u = tau1 + nufilt_matrix(tau1.float(), tau2.float(), a0, s).update.double()
        target = (float(tau1.norm()) + float(tau2.norm())) / 2
        sv = torch.linalg.svdvals(got[n].double() - base[n].double())
        if float(u.norm()) > target:
            clipped += 1
            assert abs(float(sv.norm()) - target) < 1e-4 * target
            top = torch.linalg.svdvals(u)
            k = int((sv < top - 1e-4).sum())  # the clipped directions are the leading ones, all at one level
            assert 0 < k < len(sv) and float(sv[:k].max() - sv[:k].min()) < 1e-4 * float(sv[0])
            torch.testing.assert_close(sv[k:], top[k:], atol=1e-4, rtol=1e-4)
    assert clipped > 0


def test_a_new_profile_mid_lineage_replaces_the_inherited_settings(tiny, tmp_path):
    import json

    from nufilt_core.checkpoint import LINEAGE_NAME
    from nufilt_core.errors import LineageError
    from nufilt_core.methods.nufilt import PROFILES

    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1, options={"profile": "plus"}))
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=m2, previous=m1,
                            options={"profile": "plus-iso"}))
    settings = json.loads((m2 / LINEAGE_NAME).read_text())["settings"]
    assert {k: settings[k] for k in PROFILES["plus-iso"]} == PROFILES["plus-iso"]
    # without a profile the inherited settings stay, whatever the defaults
    m3 = tmp_path / "m3"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t3"], output=m3, previous=m2))
    assert json.loads((m3 / LINEAGE_NAME).read_text())["settings"]["spectrum_power"] == 0.0
    # the paper's lineage has no rescale state: switching to a rescaling profile says how to do it
    p1 = tmp_path / "p1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=p1))
    with pytest.raises(LineageError, match="start a new lineage"):
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=tmp_path / "p2", previous=p1,
                                options={"profile": "plus"}))


def test_spectrum_when_shrunk_flattens_only_the_matrices_the_rescaling_shrank(tiny, tmp_path):
    # a trust radius between the matrices' merged norms: some are shrunk (λ > 1), some not; with
    # spectrum_when = shrunk the first are flattened as with "always", the others left as plus leaves them
    outs = {}
    for label, extra in (("plain", {}), ("always", {"spectrum_power": 0.0}),
                         ("shrunk", {"spectrum_power": 0.0, "spectrum_when": "shrunk"})):
        opts = {"rescale": "matrix", "rescale_radius": 0.37, **extra}
        m1, m2 = tmp_path / f"{label}1", tmp_path / f"{label}2"
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1, options=opts))
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=m2, previous=m1))
        outs[label] = load(m2)
    base = load(tiny["base"])
    kinds = {"always": 0, "plain": 0}
    for n in (n for n in _filtered(list(base)) if base[n].ndim == 2):
        same = next(k for k in ("always", "plain") if torch.allclose(outs["shrunk"][n], outs[k][n], atol=1e-6))
        kinds[same] += 1
        if same == "plain":  # not shrunk, so not flattened: its spectrum is as merged
            assert not torch.allclose(outs["plain"][n], outs["always"][n], atol=1e-6)
    assert kinds["always"] > 0 and kinds["plain"] > 0, kinds


@pytest.mark.parametrize("rescale", ["none", "clip"])
def test_spectrum_when_shrunk_is_refused_where_no_rescaling_records_a_shrink(rescale):
    # it would silently never shape anything: clip and none leave λ_t = 1 on every matrix
    from nufilt_core.errors import SettingsError
    from nufilt_core.methods import resolve_settings
    from nufilt_core.methods.nufilt import Nufilt

    with pytest.raises(SettingsError, match=rf"spectrum_when 'shrunk' needs rescale .*not '{rescale}'"):
        resolve_settings(Nufilt, {}, {"rescale": rescale, "spectrum_power": 0.0, "spectrum_when": "shrunk"})
    resolve_settings(Nufilt, {}, {"rescale": rescale, "spectrum_power": 0.0})  # "always" is fine with either
    resolve_settings(Nufilt, {}, {"profile": "plus-iso"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_flat_spectrum_keeps_low_rank_task_vectors_out_of_the_rounding_noise(tmp_path, dtype):
    # LoRA-style fine-tunes: each task vector has rank 2. merged − base also holds the weights' rounding
    # errors in every direction; flattening those to the signal's level (power 0) would make the merged task
    # vector mostly noise. It must stay in the span of the tasks' directions.
    g = torch.Generator().manual_seed(0)
    names = [f"layers.{i}.attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")]
    base = {n: torch.randn(96, 64, generator=g) * 0.05 for n in names}
    cols: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    models = {"base": base}
    for t in ("t1", "t2"):
        state = {}
        for n, w in base.items():
            b_, a_ = torch.randn(96, 2, generator=g), torch.randn(2, 64, generator=g)
            delta = b_ @ a_
            state[n] = w + delta * (0.1 * float(w.norm()) / float(delta.norm()))
            cols[n].append(b_)
        models[t] = state
    paths = {k: write_model({n: v.to(dtype) for n, v in m.items()}, tmp_path / k) for k, m in models.items()}
    opts = {"spectrum_power": 0.0, "iters": 5}
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    merge_step(MergeRequest(base=paths["base"], checkpoint=paths["t1"], output=m1, options=opts))
    merge_step(MergeRequest(base=paths["base"], checkpoint=paths["t2"], output=m2, previous=m1))
    stored_base, merged = load(paths["base"]), load(m2)
    for n in names:
        delta = merged[n].double() - stored_base[n].double()
        span, _ = torch.linalg.qr(torch.cat(cols[n], dim=1).double())  # the tasks' column space, rank 4
        inside = float((span @ (span.T @ delta)).norm() ** 2 / delta.norm() ** 2)
        assert inside > 0.98, (n, inside)  # without the noise floor: 0.44 (fp32), 0.06 (bf16)
