"""The typed boundary between the worker and its merge child (child_protocol.py), over a real child."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nufilt_daemon.child_protocol import ChildError, ChildEvent, ChildRequest, EventName, Merged, Validated
from nufilt_daemon.config import GateSettings, Settings
from nufilt_daemon.journal import Journal
from nufilt_daemon.metrics import Metrics
from nufilt_daemon.promoter import Promoter
from nufilt_daemon.states import GateOutcome
from nufilt_daemon.store import Store
from nufilt_daemon.worker import MergeWorker
from pydantic import ValidationError


def run_child(stdin: bytes) -> tuple[int, list[str]]:
    """`python -m nufilt_daemon.merge_process` as the worker starts it: (exit code, event lines)."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "nufilt_daemon.merge_process", "--events-fd", str(write_fd),
                             "--parent-pid", str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, pass_fds=(write_fd,))
    os.close(write_fd)
    assert proc.stdin is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    with os.fdopen(read_fd) as events:
        lines = events.read().splitlines()
    return proc.wait(timeout=300), lines


def worker_request(tmp_path: Path, tiny: dict[str, Path]) -> ChildRequest:
    """The request the worker itself builds for a job (MergeWorker._request), from real settings."""
    settings = Settings(base_model=tiny["base"], store_dir=tmp_path / "store", state_dir=tmp_path / "state",
                        device="cpu", method_settings={"iters": 2}, gate=GateSettings(scores=False))
    store, journal = Store(tmp_path / "store").ensure(), Journal.in_state_dir(tmp_path / "state")
    worker = MergeWorker(settings, journal, store, Promoter(store, journal, 5, 5, publish=False), Metrics(),
                         tmp_path / "logs")
    job = journal.add_job("folder", "t1", "0" * 64, str(tiny["t1"]))
    return worker._request(job, tmp_path / "candidate", None)


def test_the_worker_s_request_merges_and_every_event_is_typed(tiny: dict[str, Path], tmp_path: Path):
    request = worker_request(tmp_path, tiny)
    assert ChildRequest.model_validate_json(request.model_dump_json()) == request  # what crosses stdin
    code, lines = run_child(request.model_dump_json().encode())
    events = [ChildEvent.model_validate_json(line).root for line in lines]
    assert code == 0
    names = [e.event for e in events]
    assert names[-2:] == [EventName.MERGED, EventName.VALIDATED] and set(names[:-2]) == {EventName.PROGRESS}
    merged, validated = events[-2], events[-1]
    assert isinstance(merged, Merged) and merged.record["step"] == 1 and merged.record["method"] == "nufilt"
    assert isinstance(validated, Validated) and validated.report["problems"] == []
    assert (tmp_path / "candidate" / "model.safetensors").exists()


def test_a_request_that_is_not_a_child_request_is_one_typed_error(tiny: dict[str, Path], tmp_path: Path):
    request = worker_request(tmp_path, tiny).model_dump(mode="json")
    request["methd"] = request.pop("method")  # a field misspelt on one side
    for bad in (b"not json", json.dumps(request).encode()):
        code, lines = run_child(bad)
        assert code == 2 and len(lines) == 1
        error = ChildEvent.model_validate_json(lines[0]).root
        assert isinstance(error, ChildError)
        assert (error.stage, error.kind) == ("request", GateOutcome.FAILED) and "bad request" in error.message
    assert not (tmp_path / "candidate").exists()


def test_event_names_and_fields_are_checked_on_the_worker_s_side():
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        ChildEvent.model_validate_json('{"event": "merge", "record": {}}')  # a misspelt name
    with pytest.raises(ValidationError, match="stage"):
        ChildEvent.model_validate_json('{"event": "error", "kind": "failed", "type": "X", "message": "m"}')
    with pytest.raises(ValidationError, match="kind"):  # an error is the input's fault or the daemon's, nothing else
        ChildError(stage="merge", kind=GateOutcome.ACCEPTED, type="X", message="m")
