"""The merge engine's I/O: safetensors read and written as streams, sharded or not, side files and
the lineage record beside the weights; inputs that are not whole, sound safetensors refused with an
error naming the file, and nothing written."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from cli_runner import run_cli
from engine_checks import expect_error, leftovers
from models import base_state, finetune, load, write_model
from safetensors import safe_open

from nufilt_core.checkpoint import LINEAGE_NAME, Checkpoint
from nufilt_core.errors import CheckpointError
from nufilt_core.merge import MergeRequest, merge_step


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
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=out, options={"profile": "paper"}))
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    record = json.loads((out / LINEAGE_NAME).read_text())
    assert record["step"] == 1 and record["method"] == "nufilt" and len(record["checkpoints"]) == 1
    assert record["settings"]["null_rank"] == 128 and record["settings"]["lora_rank"] == 64
    assert leftovers(tmp_path) == []


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
