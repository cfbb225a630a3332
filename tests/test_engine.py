"""The merge engine: streaming I/O, lineage, chains, pre-flight errors, atomic output."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load, run_cli
from models import base_state, finetune, write_model
from safetensors import safe_open
from safetensors.torch import save_file

from nufilt_core.checkpoint import LINEAGE_NAME, Checkpoint
from nufilt_core.errors import CheckpointError, LineageError, NufiltError
from nufilt_core.merge import MergeRequest, continual_merge, merge_step


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_sharded_and_single_inputs_give_identical_outputs(tmp_path):
    base = base_state()
    single = {"base": write_model(base, tmp_path / "s/base"), "t1": write_model(finetune(base, 1), tmp_path / "s/t1"),
              "t2": write_model(finetune(base, 2), tmp_path / "s/t2")}
    sharded = {"base": write_model(base, tmp_path / "x/base", shards=3),
               "t1": write_model(finetune(base, 1), tmp_path / "x/t1", shards=2),
               "t2": write_model(finetune(base, 2), tmp_path / "x/t2", shards=4)}
    results = []
    for label, paths in (("s", single), ("x", sharded)):
        m1, m2 = tmp_path / f"{label}/m1", tmp_path / f"{label}/m2"
        merge_step(MergeRequest(base=paths["base"], checkpoint=paths["t1"], output=m1))
        results.append(merge_step(MergeRequest(base=paths["base"], checkpoint=paths["t2"], output=m2, previous=m1)))
    a, b = load(tmp_path / "s/m2"), load(tmp_path / "x/m2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the content hash does not depend on how the inputs were sharded
    assert results[0].record.model_sha256 == results[1].record.model_sha256
    assert results[0].record.base.sha256 == results[1].record.base.sha256


def test_output_shards_are_valid_safetensors_with_index(tiny, tmp_path):
    out = tmp_path / "m1"
    run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", out, "--max-shard-size", "4KB",
            "--quiet")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        assert shard.stat().st_size <= 4096 + 4096  # header + at most the limit (one tensor may exceed it alone)
        with safe_open(str(shard), "pt") as f:  # the reference library reads what we wrote
            assert all(index["weight_map"][k] == shard.name for k in f.keys())
    single = tmp_path / "m1-single"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=single))
    a, b = load(out), load(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())


def test_side_files_and_lineage_are_written(tiny, tmp_path):
    out = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=out))
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    record = json.loads((out / LINEAGE_NAME).read_text())
    assert record["step"] == 1 and record["method"] == "nufilt" and len(record["checkpoints"]) == 1
    assert record["settings"]["null_rank"] == 128 and record["settings"]["lora_rank"] == 64
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("method", ["nufilt", "task_arithmetic"])
def test_chain_of_one_shot_runs_equals_continual_run(tiny, tmp_path, method):
    previous = None
    for t in (1, 2, 3):
        out = tmp_path / f"cli-{t}"
        args = ["merge", "--base", tiny["base"], "--checkpoint", tiny[f"t{t}"], "--output", out, "--quiet"]
        if previous:
            args += ["--previous", previous]  # method, settings and seed come from the lineage record
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


# --- bad input: a clear error naming the file (and tensor), and nothing written -------------------------------


def expect_error(tmp_path: Path, req: MergeRequest, error: type[Exception], *needles: str) -> None:
    with pytest.raises(error) as info:
        merge_step(req)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not Path(req.output).exists()
    assert leftovers(Path(req.output).parent) == []


def test_missing_extra_and_reshaped_tensors(tmp_path):
    base = base_state()
    b = write_model(base, tmp_path / "base")
    missing = dict(finetune(base, 1))
    del missing["encoder.layer.1.output.dense.weight"]
    write_model(missing, tmp_path / "missing")
    extra = {**finetune(base, 1), "classifier.weight": torch.zeros(2, 16)}
    write_model(extra, tmp_path / "extra")
    reshaped = {**finetune(base, 1), "encoder.layer.0.intermediate.dense.weight": torch.zeros(16, 32)}
    write_model(reshaped, tmp_path / "reshaped")
    out = tmp_path / "out"
    expect_error(tmp_path, MergeRequest(base=b, checkpoint=tmp_path / "missing", output=out), CheckpointError,
                 "encoder.layer.1.output.dense.weight", "missing")
    expect_error(tmp_path, MergeRequest(base=b, checkpoint=tmp_path / "extra", output=out), CheckpointError,
                 "classifier.weight", "extra")
    expect_error(tmp_path, MergeRequest(base=b, checkpoint=tmp_path / "reshaped", output=out), CheckpointError,
                 "encoder.layer.0.intermediate.dense.weight", "[16, 32]", "[32, 16]")


def test_non_finite_and_integer_mismatch(tmp_path):
    base = base_state()
    b = write_model(base, tmp_path / "base")
    nan = finetune(base, 1)
    nan["encoder.layer.1.attention.self.key.weight"][3, 4] = float("nan")
    write_model(nan, tmp_path / "nan")
    ints = {**finetune(base, 1), "encoder.layer.0.output.LayerNorm.weight": torch.ones(16, dtype=torch.int32)}
    write_model(ints, tmp_path / "ints")
    out = tmp_path / "out"
    expect_error(tmp_path, MergeRequest(base=b, checkpoint=tmp_path / "nan", output=out), CheckpointError,
                 "encoder.layer.1.attention.self.key.weight", "NaN", "nan/model.safetensors")
    expect_error(tmp_path, MergeRequest(base=b, checkpoint=tmp_path / "ints", output=out), CheckpointError,
                 "encoder.layer.0.output.LayerNorm.weight", "I32")


def test_truncated_corrupt_and_incomplete_files(tiny, tmp_path):
    out = tmp_path / "out"
    src = (tiny["t1"] / "model.safetensors").read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(src[:-100])
    expect_error(tmp_path, MergeRequest(base=tiny["base"], checkpoint=trunc, output=out), CheckpointError,
                 "trunc.safetensors", "truncated")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 20) + b"{not json at all....")
    expect_error(tmp_path, MergeRequest(base=tiny["base"], checkpoint=garbage, output=out), CheckpointError,
                 "garbage.safetensors", "JSON")
    sharded = write_model(finetune(base_state(), 1), tmp_path / "sharded", shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    expect_error(tmp_path, MergeRequest(base=tiny["base"], checkpoint=sharded, output=out), CheckpointError,
                 "model-00002-of-00003.safetensors", "missing")


def test_pickles_are_refused_without_unpickling(tiny, tmp_path):
    sentinel = tmp_path / "unpickled"
    # a pickle that would create a file if anything ever loaded it
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(pickle.dumps(Boom()))
    proc = run_cli("merge", "--base", tiny["base"], "--checkpoint", bad, "--output", tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert "pickle" in proc.stderr and "safetensors" in proc.stderr and "pytorch_model.bin" in proc.stderr
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(bad.read_bytes())
    with pytest.raises(CheckpointError, match="only pickle weights"):
        Checkpoint.open(folder)
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_lineage_errors(tiny, tmp_path):
    m1 = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1))
    out = tmp_path / "out"
    other_base = write_model(base_state(seed=9), tmp_path / "other-base")
    expect_error(tmp_path, MergeRequest(base=other_base, checkpoint=tiny["t2"], output=out, previous=m1),
                 LineageError, "another base")
    expect_error(tmp_path, MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=out, previous=m1),
                 LineageError, "already merged at step 1")
    expect_error(tmp_path, MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=out, previous=m1,
                                        method="task_arithmetic"), LineageError, "cannot switch")
    expect_error(tmp_path, MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=out, previous=tiny["t1"]),
                 LineageError, "not a model nufilt merged")
    tampered = load(m1)
    tampered["encoder.layer.0.attention.self.query.weight"] += 1
    save_file(tampered, str(m1 / "model.safetensors"))
    expect_error(tmp_path, MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=out, previous=m1),
                 LineageError, "no longer match")


def test_existing_output_and_bad_settings(tiny, tmp_path):
    out = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=out))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(NufiltError, match="already exists"):
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=out))
    assert (out / "model.safetensors").read_bytes() == before
    proc = run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", tmp_path / "x",
                   "--lora-rank", "-1", check=False)
    assert proc.returncode == 1 and "lora_rank" in proc.stderr and not (tmp_path / "x").exists()
    proc = run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", tmp_path / "x",
                   "--set", "no_such_setting=1", check=False)
    assert proc.returncode == 1 and "no_such_setting" in proc.stderr
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=out, overwrite=True))
    assert (out / "model.safetensors").read_bytes() != before and leftovers(tmp_path) == []


def test_kill_during_merge_leaves_no_output(tmp_path):
    """A real SIGKILL in the middle of a slow merge: no folder that looks finished."""
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.attn.q_proj.weight": torch.randn(256, 256, generator=g) for i in range(6)}
    b = write_model(base, tmp_path / "base")
    t1 = write_model({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / "t1")
    t2 = write_model({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / "t2")
    m1 = tmp_path / "m1"
    merge_step(MergeRequest(base=b, checkpoint=t1, output=m1))
    out = tmp_path / "m2"
    exe = Path(sys.executable).parent / "nufilt"
    proc = subprocess.Popen([str(exe), "merge", "--base", str(b), "--previous", str(m1), "--checkpoint", str(t2),
                             "--output", str(out), "--iters", "100000"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(".tmp-" in name for name in leftovers(tmp_path)):  # wait until it is writing the output
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    assert all(".tmp-" in name for name in leftovers(tmp_path))  # only a hidden temporary sibling may remain


def test_threads_option(tiny, tmp_path):
    proc = run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", tmp_path / "x",
                   "--threads", "0", check=False)
    assert proc.returncode == 1 and "--threads 0" in proc.stderr and not (tmp_path / "x").exists()
    run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", tmp_path / "y", "--threads", "1",
            "--quiet")
    assert (tmp_path / "y" / LINEAGE_NAME).exists()
