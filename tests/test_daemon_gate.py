"""The validation gate: surrogate scores (nufilt_core.scores), post-merge checks, user command, thresholds."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import torch
from daemon_harness import wait_for
from models import base_state, finetune, load, write_model
from nufilt_daemon.config import GateSettings, Threshold
from nufilt_daemon.gate import (
    apply_thresholds,
    check_candidate,
    check_untouched,
    decide,
    parse_metrics,
    recorded_metrics,
)
from nufilt_daemon.states import GateOutcome

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.lineage import LineageRecord
from nufilt_core.merge import MergeRequest, ScoreRequest, StepDigests, merge_step
from nufilt_core.methods import METHODS
from nufilt_core.scores import matrix_terms, surrogate_scores
from nufilt_core.selection import is_linear_weight


def top_v(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.svd(x, full_matrices=False)[2][:k].T


def test_matrix_terms_are_the_subspace_terms_of_eq_13_and_14():
    g = torch.Generator().manual_seed(0)
    tau_prev = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 10, generator=g,
                                                                                    dtype=torch.float64)
    tau_new = torch.randn(12, 10, generator=g, dtype=torch.float64)
    merged = tau_prev + 0.5 * tau_new
    t = matrix_terms(tau_prev, tau_new, merged, null_rank=8, task_rank=2)
    vp = top_v(tau_prev, 3)  # rank 3: only the 3 non-zero directions count, not 8
    vt = top_v(tau_new, 2)
    assert abs(t.stab - float(((merged - tau_prev) @ vp).square().sum())) < 1e-9
    assert abs(t.stab_ref - float((tau_prev @ vp).square().sum())) < 1e-9
    assert abs(t.plas - float(((merged - tau_new) @ vt).square().sum())) < 1e-9
    assert abs(t.plas_ref - float((tau_new @ vt).square().sum())) < 1e-9
    assert t.stab > 0 and t.plas > 0


def test_scores_at_the_extremes(tmp_path: Path):
    base = base_state()
    b, t1, t2 = (write_model(s, tmp_path / n) for s, n in
                 ((base, "b"), (finetune(base, 1), "t1"), (finetune(base, 2), "t2")))
    ck = {n: Checkpoint.open(p) for n, p in (("b", b), ("t1", t1), ("t2", t2))}

    def sel(name: str, shape: tuple[int, ...]) -> bool:
        return is_linear_weight(name, shape)

    first = surrogate_scores(ck["b"], None, ck["t1"], ck["t1"], sel)  # step 1, θ_1^m = θ_1
    assert first.stability == 0 and first.plasticity == 0 and first.matrices == 12
    kept_old = surrogate_scores(ck["b"], ck["t1"], ck["t2"], ck["t1"], sel)  # the new task ignored
    assert kept_old.stability == 0 and kept_old.plasticity > 0.5
    took_new = surrogate_scores(ck["b"], ck["t1"], ck["t2"], ck["t2"], sel)  # the old tasks overwritten
    assert took_new.plasticity == 0 and took_new.stability > 0.5
    assert 0 < kept_old.as_dict()["plasticity"] and took_new.harmonic_mean == 0


def test_check_candidate_passes_a_real_merge_and_catches_a_changed_untouched_tensor(tiny: dict[str, Path],
                                                                                   tmp_path: Path):
    out = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=out,
                            options={"profile": "paper", "iters": 2}))
    out2 = tmp_path / "m2"
    res = merge_step(MergeRequest(base=tiny["base"], previous=out, checkpoint=tiny["t2"], output=out2))
    ck = {n: Checkpoint.open(p) for n, p in (("b", tiny["base"]), ("p", out), ("n", tiny["t2"]), ("c", out2))}
    report = check_candidate(ck["b"], ck["p"], ck["n"], ck["c"], res.record, GateSettings(), "cpu")
    assert report["problems"] == []
    assert report["checks"]["untouched"]["checked"] == 18  # biases, norms, fc2, embeddings, position ids
    assert 0 < report["scores"]["stability"] and report["scores"]["matrices"] == 10

    # someone edits a LayerNorm of the candidate (keep_base says it must equal the base)
    state = load(out2)
    state["embeddings.LayerNorm.weight"] = state["embeddings.LayerNorm.weight"] + 1
    tampered = write_model(state, tmp_path / "tampered")
    LineageRecord.read(out2).write(tampered)
    bad = check_candidate(ck["b"], ck["p"], ck["n"], Checkpoint.open(tampered), res.record, GateSettings(), "cpu")
    assert any("'embeddings.LayerNorm.weight'" in p and "leaves alone" in p for p in bad["problems"])
    assert any("model_sha256" in p for p in bad["problems"])
    assert decide(bad, tampered, GateSettings()).outcome == GateOutcome.REJECTED


def test_a_one_pass_merge_is_checked_from_what_it_read_and_wrote(tiny: dict[str, Path], tmp_path: Path):
    """The daemon's child: the checks and scores come from the merge pass and agree with re-reading the files."""
    options = {"profile": "paper", "policy": "keep_previous", "iters": 2}
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=tmp_path / "m1", options=options))
    out = tmp_path / "m2"
    res = merge_step(MergeRequest(base=tiny["base"], previous=tmp_path / "m1", checkpoint=tiny["t2"], output=out,
                                  check_first=False, scores=ScoreRequest()))
    ck = [Checkpoint.open(p) for p in (tiny["base"], tmp_path / "m1", tiny["t2"], out)]
    from_pass = check_candidate(*ck, res.record, GateSettings(), "cpu", merged=res)
    from_files = check_candidate(*ck, res.record, GateSettings(), "cpu")
    assert from_pass["problems"] == from_files["problems"] == []
    assert from_pass["checks"]["untouched"] == from_files["checks"]["untouched"] == {"checked": 18, "changed": []}
    for key in ("stability", "plasticity", "matrices", "null_rank", "task_rank"):
        assert from_pass["scores"][key] == pytest.approx(from_files["scores"][key], rel=1e-5), key

    # a written tensor unlike its input cannot come out of the engine; the digests are edited to show the check
    assert res.digests is not None
    name = "encoder.layer.0.output.dense.weight"
    edited = StepDigests(res.digests.inputs, {**res.digests.output, name: res.digests.output[name][:-3] + "00\n"})
    assert check_untouched(*ck, res.record, edited) == (18, [name])


def test_the_gate_names_no_method():
    """Method knowledge stays in the method (MergeMethod.untouched, .scored): gate.py asks, it never
    spells a method's name in a string, an identifier or an import."""
    import nufilt_daemon.gate

    tree = ast.parse(Path(nufilt_daemon.gate.__file__).read_text())
    names = {n.lower() for n in METHODS} | {m.__name__.lower() for m in METHODS.values()}
    words = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names))) + r")\b", re.IGNORECASE)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and words.search(node.value):
            found.append(node.value)
        elif isinstance(node, ast.Name | ast.Attribute | ast.alias | ast.ImportFrom):
            ident = {ast.Name: "id", ast.Attribute: "attr", ast.alias: "name", ast.ImportFrom: "module"}[type(node)]
            parts = str(getattr(node, ident) or "").lower().split(".")
            found += [p for p in parts if p in names]
    assert found == []


def tampered(model: Path, name: str, folder: Path) -> Path:
    """A copy of `model` (with its lineage record) where one tensor is nudged by +1."""
    state = load(model)
    state[name] = state[name] + 1
    out = write_model(state, folder)
    LineageRecord.read(model).write(out)
    return out


@pytest.mark.parametrize(("method", "options", "steps", "checked"), [
    ("opcm", {}, 1, 28),  # step 1: θ_1^m = θ_1, every tensor equals the new checkpoint
    ("wudi", {}, 1, 28),
    ("nufilt", {"profile": "paper", "policy": "keep_previous", "iters": 2}, 2, 18),  # unfiltered tensors stay as θ_1^m
    ("task_arithmetic", {}, 1, 1),  # claims nothing: only the integer buffer is compared
])
def test_the_untouched_check_asks_the_method_and_catches_a_changed_tensor(
        tiny: dict[str, Path], tmp_path: Path, method: str, options: dict, steps: int, checked: int):
    previous = None
    for t in range(1, steps + 1):
        out = tmp_path / f"m{t}"
        res = merge_step(MergeRequest(base=tiny["base"], previous=previous, checkpoint=tiny[f"t{t}"], output=out,
                                      method=method if t == 1 else None, options=options if t == 1 else {}))
        previous_model, previous = previous, out
    ck = {n: Checkpoint.open(p) for n, p in (("b", tiny["base"]), ("n", tiny[f"t{steps}"]), ("c", out))}
    prev = Checkpoint.open(previous_model) if previous_model else None
    gate = GateSettings(scores=False)
    report = check_candidate(ck["b"], prev, ck["n"], ck["c"], res.record, gate, "cpu")
    assert report["problems"] == [] and report["checks"]["untouched"] == {"checked": checked, "changed": []}

    name = "embeddings.LayerNorm.weight"
    bad = check_candidate(ck["b"], prev, ck["n"], Checkpoint.open(tampered(out, name, tmp_path / "tampered")),
                          res.record, gate, "cpu")
    if checked > 1:  # the method says this tensor is one of its inputs, bit for bit
        assert bad["checks"]["untouched"]["changed"] == [name]
        assert any(f"'{name}'" in p and "leaves alone" in p for p in bad["problems"])
    else:
        assert bad["checks"]["untouched"]["changed"] == []
    assert any("model_sha256" in p for p in bad["problems"])  # and the lineage hash catches it anyway
    assert decide(bad, out, gate).outcome == GateOutcome.REJECTED


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "validate.py"
    path.write_text("import json, sys, os, time\n" + body)
    return [sys.executable, str(path)]


def test_user_command_and_thresholds_decide(tmp_path: Path):
    cand = tmp_path / "candidate"
    cand.mkdir()
    ok = {"problems": [], "scores": {"stability": 0.1, "plasticity": 0.2, "harmonic_mean": 0.13}}
    cmd = script(tmp_path, "assert sys.argv[1] == os.environ['NUFILT_CANDIDATE']\n"
                           "print('loading...'); print(json.dumps({'accuracy': 0.9, 'name': 'x'}))\n")

    def gate(**kw: object) -> GateSettings:
        return GateSettings(command=cmd, **kw)

    d = decide(ok, cand, gate(thresholds={"accuracy": Threshold(min=0.8), "stability": Threshold(max=0.5)}))
    assert d.outcome == GateOutcome.ACCEPTED
    assert d.metrics == {"stability": 0.1, "plasticity": 0.2, "harmonic_mean": 0.13, "accuracy": 0.9}
    assert d.command["argv"][-1] == str(cand)
    d = decide(ok, cand, gate(thresholds={"accuracy": Threshold(min=0.95)}))
    assert d.outcome == GateOutcome.REJECTED and d.reasons == ["accuracy = 0.9 is below the minimum 0.95"]
    d = decide(ok, cand, GateSettings(thresholds={"plasticity": Threshold(max=0.1)}))  # built-in scores only
    assert d.outcome == GateOutcome.REJECTED and "plasticity = 0.2 is above the maximum 0.1" in d.reasons
    d = decide(ok, cand, GateSettings(thresholds={"accuracy": Threshold(min=0.5)}))
    assert d.outcome == GateOutcome.REJECTED and "not reported" in d.reasons[0]

    failing = script(tmp_path, "print('model is worse', file=sys.stderr); sys.exit(3)\n")
    d = decide(ok, cand, GateSettings(command=failing))
    assert d.outcome == GateOutcome.REJECTED and d.reasons == ["validation command exited with 3: model is worse"]
    assert decide(ok, cand, GateSettings(command=["/nonexistent/validate"])).outcome == GateOutcome.FAILED
    slow = script(tmp_path, "time.sleep(30)\n")
    d = decide(ok, cand, GateSettings(command=slow, command_timeout_seconds=0.5))
    assert d.outcome == GateOutcome.FAILED and "timed out" in d.reasons[0]
    for printed in ("NaN", "-Infinity"):  # Python's json reads both; no threshold may take them for a pass
        broken = script(tmp_path, f"print('{{\"accuracy\": {printed}}}')\n")
        d = decide(ok, cand, GateSettings(command=broken, thresholds={"accuracy": Threshold(min=0.5, max=1.0)}))
        assert d.outcome == GateOutcome.REJECTED and d.reasons == [f"accuracy = {float(printed)} is not a finite "
                                                                   "number"], d.reasons
    chatty = script(tmp_path, "print('no json here')\n")
    assert decide(ok, cand, GateSettings(command=chatty)).outcome == GateOutcome.FAILED


def test_relative_thresholds_compare_with_production():
    relative = GateSettings(thresholds={"harmonic_mean": Threshold(min_delta=-0.01, max_delta=0.2)})
    now = {"harmonic_mean": 0.5}
    assert apply_thresholds(now, relative, {"harmonic_mean": 0.505}) == ([], [])  # 0.005 worse: within
    violations, notes = apply_thresholds(now, relative, {"harmonic_mean": 0.6})
    assert violations == ["harmonic_mean = 0.5 is -0.1 against production's 0.6, below min_delta -0.01"] and not notes
    violations, _ = apply_thresholds(now, relative, {"harmonic_mean": 0.2})
    assert violations == ["harmonic_mean = 0.5 is +0.3 against production's 0.2, above max_delta 0.2"]
    # nothing to compare with: not a violation, said in the notes
    assert apply_thresholds(now, relative, None) == ([], ["harmonic_mean: no production value to compare with "
                                                          "(no production yet)"])
    assert apply_thresholds(now, relative, {})[1] == ["harmonic_mean: no production value to compare with "
                                                      "(production did not record it)"]
    assert recorded_metrics({"metrics": {"accuracy": 0.9, "flag": True, "name": "x"}}) == {"accuracy": 0.9}
    assert recorded_metrics({}) == {}


def test_parse_metrics_takes_the_object_or_its_last_json_line():
    assert parse_metrics('{"a": 1, "b": true, "c": "x"}') == {"a": 1.0}
    assert parse_metrics('step 1\n{"acc": 0.5}\n') == {"acc": 0.5}
    assert parse_metrics("[1, 2]") is None and parse_metrics("") is None


def test_the_command_gets_no_daemon_secrets_and_a_timeout_ends_everything_it_started(tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch):
    cand = tmp_path / "candidate"
    cand.mkdir()
    ok = {"problems": [], "scores": {}}
    monkeypatch.setenv("NUFILT_MLFLOW__WEBHOOK_SECRET", "hook-s3cret")
    monkeypatch.setenv("NUFILT_MLFLOW__TRACKING_URI", "https://u:pa55@mlflow.example")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pa55")
    monkeypatch.setenv("EVAL_DATA", "/data/eval.jsonl")  # the operator's own variables still reach it
    shown = script(tmp_path, "print(json.dumps({'seen': 1})); print(sorted(os.environ), file=sys.stderr)\n")
    d = decide(ok, cand, GateSettings(command=shown))
    env_seen = d.command["stderr_tail"]
    assert d.outcome == GateOutcome.ACCEPTED and "EVAL_DATA" in env_seen and "NUFILT_CANDIDATE" in env_seen
    assert "NUFILT_MLFLOW" not in env_seen and "MLFLOW_TRACKING_PASSWORD" not in env_seen

    pid_file = tmp_path / "grandchild.pid"
    spawner = script(tmp_path, "import subprocess\n"
                               f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                               f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)\n")
    d = decide(ok, cand, GateSettings(command=spawner, command_timeout_seconds=2))
    assert d.outcome == GateOutcome.FAILED and "timed out" in d.reasons[0]
    grandchild = int(pid_file.read_text())

    def gone() -> bool:
        try:
            return Path(f"/proc/{grandchild}/stat").read_text().split()[2] == "Z"  # a zombie awaiting init
        except FileNotFoundError:
            return True

    wait_for("the command's own child ended too", gone, timeout=10)
