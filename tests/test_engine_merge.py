"""One merge step: pre-flight checks against the base (names, shapes, dtypes, NaN/Inf), the lineage
checks, and an output that appears whole or not at all (an existing one kept, a killed merge)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from daemon_harness import wait_for
from engine_checks import expect_error, leftovers
from models import base_state, finetune, load, write_model
from safetensors.torch import save_file

from nufilt_core.errors import CheckpointError, LineageError, NufiltError
from nufilt_core.merge import MergeRequest, merge_step


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


def test_existing_output_is_kept_unless_overwrite(tiny, tmp_path):
    out = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=out))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(NufiltError, match="already exists"):
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=out))
    assert (out / "model.safetensors").read_bytes() == before
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=out, overwrite=True))
    assert (out / "model.safetensors").read_bytes() != before and leftovers(tmp_path) == []


def test_kill_during_merge_leaves_no_output(tmp_path):
    """A real SIGKILL in the middle of a slow merge: no folder that looks finished."""
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.attn.q_proj.weight": torch.randn(256, 256, generator=g) for i in range(6)}
    base["embeddings.norm.weight"] = torch.ones(256)  # stored first, and left as the base's: written at once
    b = write_model(base, tmp_path / "base")
    t1 = write_model({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / "t1")
    t2 = write_model({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / "t2")
    m1 = tmp_path / "m1"
    merge_step(MergeRequest(base=b, checkpoint=t1, output=m1))
    out = tmp_path / "m2"
    exe = Path(sys.executable).parent / "nufilt"
    log = tmp_path / "merge.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([str(exe), "merge", "--base", str(b), "--previous", str(m1), "--checkpoint",
                                 str(t2), "--output", str(out), "--iters", "100000"], stderr=stderr)

    def half_written() -> bool:
        assert proc.poll() is None, log.read_text()
        return "[merge " in log.read_text()  # its progress line: the first tensor is on disk, the next computing

    wait_for("the first tensor of the output written", half_written, timeout=120)
    assert any(".tmp-" in name for name in leftovers(tmp_path))  # into the hidden temporary sibling
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    assert all(".tmp-" in name for name in leftovers(tmp_path))  # only a hidden temporary sibling may remain


def test_a_lineage_record_edited_after_it_was_written_is_refused(tiny, tmp_path):
    import json

    from nufilt_core.checkpoint import LINEAGE_NAME
    from nufilt_core.errors import LineageError

    m1 = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1))
    record = json.loads((m1 / LINEAGE_NAME).read_text())
    record["seed"] += 1  # the weights are untouched: only the record's hash can tell
    (m1 / LINEAGE_NAME).write_text(json.dumps(record))
    with pytest.raises(LineageError, match="edited after it was written") as e:
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=tmp_path / "m2", previous=m1))
    assert e.value.culprit == "previous" and not (tmp_path / "m2").exists()
