"""NUFILT against its formula, on small matrices and through the engine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from models import base_state, finetune, load, write_model

from nufilt_core.linalg import adapter_seed, seeded_normal, top_right_singular_vectors
from nufilt_core.merge import MergeRequest, merge_step
from nufilt_core.methods.nufilt import ADAPTER_INIT_SCALE, NufiltSettings, nufilt_matrix, paper_loss

PAPER = {"profile": "paper"}


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
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=out, options=PAPER))
    merged, ft, base = load(out), load(tiny["t1"]), load(tiny["base"])
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(merged[q], ft[q])  # θ_1^m = θ_1 (P = I, adapter stays at B = 0)
    assert torch.equal(merged["encoder.layer.0.output.dense.weight"], base["encoder.layer.0.output.dense.weight"])
    assert torch.equal(merged["embeddings.LayerNorm.weight"], base["embeddings.LayerNorm.weight"])  # keep_base


def test_published_code_first_step_drops_leading_columns(tiny, tmp_path):
    out = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=out,
                            options={**PAPER, "first_step": "published_code", "null_rank": 4, "lora_rank": 0}))
    merged, ft, base = load(out), load(tiny["t1"]), load(tiny["base"])
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(merged[q][:, :4], base[q][:, :4])  # first r_p input columns of τ_1 filtered away
    assert torch.allclose(merged[q][:, 4:], ft[q][:, 4:])


def test_engine_update_matches_matrix_function(tiny, tmp_path):
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1, options=PAPER))
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=m2, previous=m1, seed=5))
    base, prev, new, merged = load(tiny["base"]), load(m1), load(tiny["t2"]), load(m2)
    name = "encoder.layer.1.intermediate.dense.weight"
    s = NufiltSettings(**PAPER)
    a0 = seeded_normal((s.lora_rank, base[name].shape[1]), adapter_seed(5, name, 2)) * ADAPTER_INIT_SCALE
    r = nufilt_matrix(prev[name] - base[name], new[name] - base[name], a0, s)
    assert torch.allclose(merged[name], prev[name] + r.update, atol=1e-6)
    assert not torch.allclose(merged[name], prev[name] + (new[name] - base[name]))  # it did filter


@pytest.mark.parametrize("policy", ["keep_base", "keep_previous", "average"])
def test_policy_for_unfiltered_tensors(tiny, tmp_path, policy):
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", m1, "--policy", policy, "--quiet",
            "--profile", "paper")
    run_cli("merge", "--base", tiny["base"], "--previous", m1, "--checkpoint", tiny["t2"], "--output", m2, "--quiet")
    base, t1, t2, merged = load(tiny["base"]), load(tiny["t1"]), load(tiny["t2"]), load(m2)
    name = "encoder.layer.0.attention.self.query.bias"
    expected = {"keep_base": base[name], "keep_previous": t1[name], "average": (t1[name] + t2[name]) / 2}[policy]
    assert torch.allclose(merged[name], expected, atol=1e-6)
    assert torch.equal(merged["embeddings.position_ids"], base["embeddings.position_ids"])  # int buffer untouched


def test_include_patterns_choose_the_filtered_tensors(tiny, tmp_path):
    out = tmp_path / "m1"
    run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", out, "--quiet",
            "--profile", "paper", "--include", r"output\.dense\.weight$")
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


# ---- beyond the paper: the profiles' post-steps (trust radius, flat spectrum) and the retired settings ----

def _filtered(names) -> list[str]:
    from nufilt_core.selection import Selection

    sel = Selection.resolve(names)
    return [n for n in names if sel.is_filtered(n, (1, 1))]


def _record(out: Path) -> dict:
    import json

    from nufilt_core.checkpoint import LINEAGE_NAME

    return json.loads((out / LINEAGE_NAME).read_text())


def _chain(tiny, tmp_path: Path, label: str, opts: dict, steps: int = 2) -> list[Path]:
    previous, outs = None, []
    for t in range(1, steps + 1):
        out = tmp_path / f"{label}{t}"
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny[f"t{t}"], output=out, previous=previous,
                                options=opts if t == 1 else {}))
        previous = out
        outs.append(out)
    return outs


@pytest.mark.parametrize("radius", [0.0, 0.05])
def test_trust_radius_follows_opcms_rule_per_matrix_on_the_fused_update(tiny, radius, tmp_path):
    # an independent replay: U = λ_{t-1} τ_{≤t-1} + update (update from nufilt_matrix),
    # λ_t = max(1, ‖U‖ / max(mean ‖τ_i‖, κ‖W0‖)) per matrix
    opts = {**PAPER, "trust_radius": radius}
    outs = [load(p) for p in _chain(tiny, tmp_path, "m", opts, steps=3)]
    base = load(tiny["base"])
    names = [n for n in _filtered(list(base)) if base[n].ndim == 2]
    s = NufiltSettings(**opts)
    merged = {n: base[n].clone() for n in names}
    lam = {n: 1.0 for n in names}
    norms: dict[str, list[float]] = {n: [] for n in names}
    for t in range(1, 4):
        theta = load(tiny[f"t{t}"])
        for n in names:
            a0 = seeded_normal((s.lora_rank, base[n].shape[1]), adapter_seed(0, n, t)) * ADAPTER_INIT_SCALE
            r = nufilt_matrix(merged[n] - base[n], theta[n] - base[n], a0, s)
            u = lam[n] * (merged[n] - base[n]) + r.update
            norms[n].append(float((theta[n] - base[n]).double().norm()))
            w0 = float(base[n].double().norm())
            lam[n] = 1.0 if t == 1 else max(1.0, float(u.double().norm()) / max(sum(norms[n]) / t, radius * w0))
            merged[n] = base[n] + u / lam[n]
            torch.testing.assert_close(outs[t - 1][n], merged[n], atol=2e-6, rtol=1e-5)
    assert max(lam.values()) > 1  # the rule did shrink something
    # unfiltered tensors follow the policy, untouched by the rescaling
    b = "encoder.layer.0.attention.self.query.bias"
    assert torch.equal(outs[-1][b], base[b])


def test_the_rescale_state_is_required_to_continue(tiny, tmp_path):
    import json

    from nufilt_core.checkpoint import LINEAGE_NAME
    from nufilt_core.errors import LineageError

    m1 = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1, options={**PAPER, "trust_radius": 0}))
    record = _record(m1)
    base = load(tiny["base"])
    assert set(record["method_state"]["rescale"]) == {n for n in _filtered(list(base)) if base[n].ndim == 2}
    assert all(v["lambda"] == 1 for v in record["method_state"]["rescale"].values())
    record["method_state"] = {}
    record["record_sha256"] = ""  # as a record written before the field: the method's own check is what is tested
    (m1 / LINEAGE_NAME).write_text(json.dumps(record))
    with pytest.raises(LineageError, match="rescale state"):
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=tmp_path / "m2", previous=m1))


def test_a_trust_radius_wider_than_the_merged_vector_leaves_the_papers_nufilt(tiny, tmp_path):
    paper = load(_chain(tiny, tmp_path, "paper", PAPER)[-1])
    wide = load(_chain(tiny, tmp_path, "radius", {**PAPER, "trust_radius": 10.0})[-1])
    for n, v in paper.items():
        torch.testing.assert_close(wide[n], v, atol=1e-6, rtol=1e-6)


def test_the_default_is_plus_iso_and_explicit_settings_override_a_profile(tiny, tmp_path):
    from nufilt_core.methods.profiles import PROFILES

    out = tmp_path / "m1"
    run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", out, "--quiet",
            "--profile", "plus", "--null-rank", "8")
    settings = _record(out)["settings"]
    assert settings["profile"] == "plus" and settings["null_rank"] == 8  # the explicit one wins
    assert {k: settings[k] for k in PROFILES["plus"] if k != "null_rank"} == \
        {k: v for k, v in PROFILES["plus"].items() if k != "null_rank"}
    default = tmp_path / "default"
    run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", default, "--quiet")
    assert _record(default)["settings"] == NufiltSettings(profile="plus-iso").model_dump(mode="json")
    assert NufiltSettings(profile="plus-iso").flat_spectrum and NufiltSettings(profile="plus-iso").trust_radius == 0.03
    assert NufiltSettings(**PAPER).trust_radius is None and not NufiltSettings(**PAPER).flat_spectrum


def test_the_benchmarks_profile_variants_are_the_profiles():
    import sys
    from typing import get_args

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
    from bench.quality.variants import all_variants
    from nufilt_core.methods.profiles import PROFILES, Profile

    assert set(get_args(Profile)) == set(PROFILES)  # the settings' type names every profile, and only those
    options = [v.options for v in all_variants() if v.method == "nufilt"]
    for profile in PROFILES:
        assert {"profile": profile} in options, profile


def test_a_flat_spectrum_applies_to_the_matrices_the_rescaling_shrank(tiny, tmp_path):
    # a trust radius between the matrices' merged norms: some are shrunk (λ > 1), some not. The shrunk ones
    # become the rescaled merge with a flat spectrum (an independent SVD: same singular vectors, equal
    # singular values, the same norm); the others, unfiltered tensors and step 1 stay as rescaled
    rescaled = _chain(tiny, tmp_path, "plain", {**PAPER, "trust_radius": 0.37})
    flat = _chain(tiny, tmp_path, "flat", {**PAPER, "trust_radius": 0.37, "flat_spectrum": True})
    lambdas = {n: v["lambda"] for n, v in _record(rescaled[1])["method_state"]["rescale"].items()}
    base, plain, got = load(tiny["base"]), load(rescaled[1]), load(flat[1])
    for n, v in load(rescaled[0]).items():
        assert torch.equal(load(flat[0])[n], v), n
    shrunk = 0
    for n in base:
        if lambdas.get(n, 1.0) <= 1.0:
            assert torch.equal(got[n], plain[n]), n
            continue
        shrunk += 1
        delta = (plain[n] - base[n]).double()
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        expected = u @ torch.diag(torch.full_like(sv, float(sv.norm()) / len(sv) ** 0.5)) @ vh
        torch.testing.assert_close((got[n] - base[n]).double(), expected, atol=2e-6, rtol=1e-4)
    assert 0 < shrunk < len(lambdas), (shrunk, len(lambdas))


def test_a_flat_spectrum_without_a_trust_radius_is_refused():
    # it would silently never flatten anything: without rescaling no matrix is ever shrunk
    from nufilt_core.errors import SettingsError
    from nufilt_core.methods import resolve_settings
    from nufilt_core.methods.nufilt import Nufilt

    with pytest.raises(SettingsError, match="flat_spectrum needs trust_radius"):
        resolve_settings(Nufilt, {}, {**PAPER, "flat_spectrum": True})
    resolve_settings(Nufilt, {}, {"profile": "plus-iso"})


def test_a_lineage_recorded_with_the_retired_settings_continues_with_the_same_bytes(tiny, tmp_path):
    # records written before the retired settings went name them all, at their values: rewritten that way,
    # a plus-iso lineage continues exactly as one recorded with today's settings
    import json

    from nufilt_core.checkpoint import LINEAGE_NAME

    now = _chain(tiny, tmp_path, "now", {"profile": "plus-iso"})
    old1 = tmp_path / "old1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=old1, options={"profile": "plus-iso"}))
    record = _record(old1)
    settings = {k: v for k, v in record["settings"].items() if k not in ("trust_radius", "flat_spectrum")}
    settings.update(rescale="matrix", rescale_radius=0.03, rescale_growth=0.0, adapter_span=False, null_energy=None,
                    task_energy=None, spectrum_power=0.0, spectrum_when="shrunk", calibrate_overlap=False,
                    smooth_tau=None, layer_scale=None)
    record.update(settings=settings, record_sha256="")
    (old1 / LINEAGE_NAME).write_text(json.dumps(record))
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=tmp_path / "old2", previous=old1))
    assert (tmp_path / "old2" / "model.safetensors").read_bytes() == (now[1] / "model.safetensors").read_bytes()
    assert _record(tmp_path / "old2")["settings"] == _record(now[1])["settings"]


@pytest.mark.parametrize(("retired", "named"), [({"rescale": "model"}, "rescale = 'model'"),
                                                ({"null_energy": 0.5}, "null_energy = 0.5"),
                                                ({"spectrum_power": 0.5}, "spectrum_power = 0.5"),
                                                ({"policy": "sum"}, "policy = 'sum'"),
                                                ({"calibrate_overlap": True}, "calibrate_overlap = True"),
                                                ({"smooth_tau": 0.5}, "smooth_tau = 0.5"),
                                                ({"layer_scale": [0.8, 1.0, 1.2]}, "layer_scale = [0.8, 1.0, 1.2]")])
def test_a_retired_setting_that_mattered_is_refused_naming_it(retired, named):
    from nufilt_core.errors import SettingsError
    from nufilt_core.methods import resolve_settings
    from nufilt_core.methods.nufilt import Nufilt

    with pytest.raises(SettingsError, match="no longer has .*" + re.escape(named)) as e:
        resolve_settings(Nufilt, {**PAPER, "rescale": "none", "adapter_span": False, **retired}, {})
    assert "start a new lineage" in str(e.value)


def test_a_new_profile_mid_lineage_replaces_the_inherited_settings(tiny, tmp_path):
    from nufilt_core.errors import LineageError
    from nufilt_core.methods.profiles import PROFILES

    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1, options={"profile": "plus"}))
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=m2, previous=m1,
                            options={"profile": "plus-iso"}))
    settings = _record(m2)["settings"]
    assert {k: settings[k] for k in PROFILES["plus-iso"]} == PROFILES["plus-iso"]
    # without a profile the inherited settings stay, whatever the defaults
    m3 = tmp_path / "m3"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t3"], output=m3, previous=m2))
    assert _record(m3)["settings"]["flat_spectrum"] is True
    # the paper's lineage has no rescale state: switching to a rescaling profile says how to do it
    p1 = tmp_path / "p1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=p1, options=PAPER))
    with pytest.raises(LineageError, match="start a new lineage"):
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=tmp_path / "p2", previous=p1,
                                options={"profile": "plus"}))


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
    opts = {**PAPER, "trust_radius": 0.0, "flat_spectrum": True, "iters": 5}  # two tasks: ‖U‖ > mean ‖τ_i‖
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    merge_step(MergeRequest(base=paths["base"], checkpoint=paths["t1"], output=m1, options=opts))
    merge_step(MergeRequest(base=paths["base"], checkpoint=paths["t2"], output=m2, previous=m1))
    stored_base, merged = load(paths["base"]), load(m2)
    assert all(v["lambda"] > 1 for v in _record(m2)["method_state"]["rescale"].values())  # so each is flattened
    for n in names:
        delta = merged[n].double() - stored_base[n].double()
        span, _ = torch.linalg.qr(torch.cat(cols[n], dim=1).double())  # the tasks' column space, rank 4
        inside = float((span @ (span.T @ delta)).norm() ** 2 / delta.norm() ** 2)
        assert inside > 0.98, (n, inside)  # without the noise floor: 0.44 (fp32), 0.06 (bf16)


def _orthonormal(n: int, k: int, seed: int) -> list[torch.Tensor]:
    q = torch.linalg.qr(seeded_normal((n, k), seed).double()).Q
    return [q[:, i] for i in range(k)]


def test_the_two_sided_filter_removes_only_the_earlier_singular_pairs():
    """With r_l = 0: τ_t − U_p U_pᵀ τ_t V̂p V̂pᵀ. A part of τ_t along an earlier input direction but on a new output
    direction stays (the one-sided filter removes it); a part on an earlier pair goes."""
    u1, u2 = _orthonormal(12, 2, 3)
    v1, v2 = _orthonormal(10, 2, 4)
    tau_prev = 5 * torch.outer(u1, v1)
    tau_new = 2 * torch.outer(u1, v1) + 3 * torch.outer(u2, v1) + torch.outer(u2, v2)
    both = NufiltSettings(profile="paper", lora_rank=0, null_rank=1, two_sided_filter=True)
    one = NufiltSettings(profile="paper", lora_rank=0, null_rank=1)
    two_sided = nufilt_matrix(tau_prev, tau_new, None, both).update
    one_sided = nufilt_matrix(tau_prev, tau_new, None, one).update
    assert torch.allclose(two_sided, 3 * torch.outer(u2, v1) + torch.outer(u2, v2), atol=1e-12)
    assert torch.allclose(one_sided, torch.outer(u2, v2), atol=1e-12)
    with pytest.raises(ValueError, match="two_sided_filter needs lora_rank 0"):
        NufiltSettings(two_sided_filter=True)
