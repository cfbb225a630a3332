"""`nufilt merge` and `nufilt inspect`, the real console script: one-shot runs chained with
--previous, the inspection, and options refused before any output."""

from __future__ import annotations

import json

import pytest
import torch
from cli_runner import run_cli
from engine_checks import leftovers
from models import load

from nufilt_core.checkpoint import LINEAGE_NAME, Checkpoint
from nufilt_core.merge import MergeRequest, continual_merge, merge_step


@pytest.mark.parametrize("method", ["nufilt", "task_arithmetic"])
def test_chain_of_one_shot_runs_equals_continual_run(tiny, tmp_path, method):
    previous = None
    for t in (1, 2, 3):
        out = tmp_path / f"cli-{t}"
        args = ["merge", "--base", tiny["base"], "--checkpoint", tiny[f"t{t}"], "--output", out, "--quiet"]
        if previous:
            args += ["--previous", previous]  # method, settings and seed come from the lineage record
        if t == 2:
            args.append("--one-pass")  # the same model and record, each input read once
        else:
            args += ["--method", method, "--seed", "11"]
        run_cli(*args)
        previous = out
    result = continual_merge(tiny["base"], [tiny["t1"], tiny["t2"], tiny["t3"]], tmp_path / "api", method=method,
                             seed=11)
    a, b = load(tmp_path / "cli-3"), load(tmp_path / "api")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert result.record.step == 3
    assert [c.sha256 for c in result.record.checkpoints] == [
        c["sha256"] for c in json.loads((tmp_path / "cli-3" / LINEAGE_NAME).read_text())["checkpoints"]]
    assert leftovers(tmp_path) == []


def test_inspect_shows_tensors_and_lineage(tiny, tmp_path):
    out = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=out))
    text = run_cli("inspect", out).stdout
    assert "encoder.layer.0.attention.self.query.weight" in text and "F32" in text
    assert "step 1 of method nufilt" in text
    data = json.loads(run_cli("inspect", out, "--json").stdout)
    assert data["lineage"]["step"] == 1 and len(data["tensors"]) == len(Checkpoint.open(out).tensors)


def test_bad_settings_are_refused_before_any_output(tiny, tmp_path):
    proc = run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", tmp_path / "x",
                   "--lora-rank", "-1", check=False)
    assert proc.returncode == 1 and "lora_rank" in proc.stderr and not (tmp_path / "x").exists()
    proc = run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", tmp_path / "x",
                   "--set", "no_such_setting=1", check=False)
    assert proc.returncode == 1 and "no_such_setting" in proc.stderr


def test_threads_option(tiny, tmp_path):
    proc = run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", tmp_path / "x",
                   "--threads", "0", check=False)
    assert proc.returncode == 1 and "--threads 0" in proc.stderr and not (tmp_path / "x").exists()
    run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", tmp_path / "y", "--threads", "1",
            "--quiet")
    assert (tmp_path / "y" / LINEAGE_NAME).exists()
