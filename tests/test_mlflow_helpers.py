"""The MLflow pieces that need no server: finding the checkpoint in a download, back-off,
lineage tags within MLflow's limits, credentials kept out of error messages."""

from __future__ import annotations

import hashlib

import pytest
from models import base_state, write_model
from nufilt_daemon.config import MlflowSettings
from nufilt_daemon.journal import Journal
from nufilt_daemon.mlflow_connection import describe_error
from nufilt_daemon.publishers.mlflow import MAX_TAG_VALUE_CHARS, lineage_tags
from nufilt_daemon.sources.mlflow_registry import MlflowRegistrySource, find_checkpoint, quote_filter_value

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.lineage import CheckpointRef, LineageRecord


@pytest.fixture(scope="module")
def state():
    return base_state()


def test_find_checkpoint_single_file_nested(tmp_path, state):
    write_model(state, tmp_path / "run/model/weights")
    (tmp_path / "run/MLmodel").write_text("flavors: {}\n")
    found, warning = find_checkpoint(tmp_path / "run")
    assert found == tmp_path / "run/model/weights" and warning is None
    assert len(Checkpoint.open(found).tensors) == len(state)


def test_find_checkpoint_shards_with_index(tmp_path, state):
    write_model(state, tmp_path / "run/checkpoint", shards=3)
    found, warning = find_checkpoint(tmp_path / "run")
    assert found == tmp_path / "run/checkpoint" and warning is None
    assert len(Checkpoint.open(found).tensors) == len(state)


def test_find_checkpoint_ignores_hidden_folders(tmp_path, state):
    write_model(state, tmp_path / "run/checkpoint")
    write_model(state, tmp_path / "run/.cache/old")
    assert find_checkpoint(tmp_path / "run") == (tmp_path / "run/checkpoint", None)


@pytest.mark.parametrize("layout", ["two_folders", "two_indexes", "nothing"])
def test_find_checkpoint_unclear_returns_root_with_a_reason(tmp_path, state, layout):
    root = tmp_path / "run"
    if layout == "two_folders":
        write_model(state, root / "a")
        write_model(state, root / "b")
    elif layout == "two_indexes":
        write_model(state, root / "a", shards=2)
        write_model(state, root / "b", shards=2)
    else:
        root.mkdir()
        (root / "pytorch_model.bin").write_bytes(b"pickle")
    found, warning = find_checkpoint(root)
    assert found == root
    assert warning and ("expected one" in warning or "no .safetensors" in warning)


def test_backoff_doubles_and_is_capped(tmp_path):
    settings = MlflowSettings(tracking_uri="http://127.0.0.1:9", source_model="m", poll_interval_seconds=30)
    source = MlflowRegistrySource(settings, tmp_path / "dl", Journal(tmp_path / "j.db"),
                                  backoff_initial_seconds=1, backoff_max_seconds=8)
    delays = []
    for streak in range(7):
        source.consecutive_errors = streak
        delays.append(source._next_delay())
    assert delays == [30, 1, 2, 4, 8, 8, 8]


def test_source_and_filter_need_a_model(tmp_path):
    with pytest.raises(ValueError, match="source_model"):
        MlflowRegistrySource(MlflowSettings(tracking_uri="http://x"), tmp_path, Journal(tmp_path / "j.db"))
    assert quote_filter_value("fine-tunes") == "'fine-tunes'"
    assert quote_filter_value("bob's model") == '"bob\'s model"'


def fake_hash(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_lineage_tags_are_strings_within_limits_and_keep_the_newest(tmp_path):
    n = 200  # 200 × 65 characters: more than one tag value may hold
    record = LineageRecord(
        method="nufilt", settings={"null_rank": 64, "note": "x" * 10_000}, seed=0, step=n,
        base=CheckpointRef(fake_hash(-1), "base"), checkpoints=[CheckpointRef(fake_hash(i), f"t{i}") for i in range(n)],
        model_sha256=fake_hash(10_000))
    tags = lineage_tags(record, 42)
    assert all(isinstance(v, str) and len(v) <= MAX_TAG_VALUE_CHARS for v in tags.values())
    kept = tags["nufilt.checkpoints_sha256"].split(",")
    assert 0 < len(kept) < n and kept == [fake_hash(i) for i in range(n - len(kept), n)]
    assert tags["nufilt.checkpoints_count"] == str(n)
    assert tags["nufilt.checkpoint_sha256"] == fake_hash(n - 1)
    assert tags["nufilt.store_version"] == "42" and tags["nufilt.step"] == str(n)


def test_error_descriptions_drop_credentials():
    error = ConnectionError("API request to https://alice:hunter2@mlflow.example/api/2.0/x failed\n  retries: 2")
    text = describe_error(error)
    assert "hunter2" not in text and "alice" not in text
    assert text.startswith("ConnectionError: API request to https://***@mlflow.example") and "\n" not in text



def test_find_checkpoint_takes_the_adapter_mlflow_transformers_logs(tmp_path):
    """mlflow.transformers logs a PEFT model as peft/ (the adapter) beside components/ (the tokenizer)."""
    from peft_models import lora_adapter, tiny_bert

    base = tiny_bert(tmp_path / "base")
    lora_adapter(base, tmp_path / "run/peft", r=2, lora_alpha=4, target_modules=["query"])
    (tmp_path / "run/components/tokenizer").mkdir(parents=True)
    (tmp_path / "run/components/tokenizer/tokenizer.json").write_text("{}")
    (tmp_path / "run/MLmodel").write_text("flavors: {}\n")
    found, warning = find_checkpoint(tmp_path / "run")
    assert found == tmp_path / "run/peft" and warning is None
    assert Checkpoint.open(found).adapter is not None
    lora_adapter(base, tmp_path / "run/other", r=2, lora_alpha=4, target_modules=["query"])
    found, warning = find_checkpoint(tmp_path / "run")
    assert found == tmp_path / "run" and warning and "2 PEFT adapters" in warning
