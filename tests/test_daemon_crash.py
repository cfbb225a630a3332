"""kill -9 of the real daemon, again and again at random moments: a crash never costs a checkpoint."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess, wait_for
from models import base_state, finetune, write_model
from nufilt_daemon.intake import content_hash

from nufilt_core.lineage import LineageRecord

pytestmark = pytest.mark.slow

N_CHECKPOINTS, N_KILLS = 6, 8  # 6 queued, 8 kills 0.5–4 s apart


def test_repeated_kill_9_never_fails_a_checkpoint_and_merges_each_exactly_once(tmp_path: Path):
    base = base_state()
    b = write_model(base, tmp_path / "base")
    ckpts = [write_model(finetune(base, i), tmp_path / f"t{i}") for i in range(1, N_CHECKPOINTS + 1)]
    # max_attempts = 1: before, one interruption in flight failed the job; restarts must not count at all
    d = DaemonProcess(tmp_path / "svc", b, interrupted_retry_seconds=0.2, max_attempts=1).start()
    for i, c in enumerate(ckpts, 1):
        d.drop(c, f"task{i}")
    wait_for("all journaled", lambda: len(d.jobs()) == N_CHECKPOINTS, timeout=60)
    rng = random.Random(1234)
    seen_in_flight: dict[int, int] = {}
    for k in range(N_KILLS):
        if k % 2:  # every other kill waits for a merge or validation to be running: the interesting moment
            wait_for("a job in flight", lambda: d.in_states("merging", "validating") or
                     len(d.in_states("promoted")) == N_CHECKPOINTS, timeout=60, interval=0.02)
        else:  # the others at a random moment: start-up, recovery, merge, validation, promotion
            time.sleep(rng.uniform(0.5, 4.0))
        d.kill9()
        for j in d.in_states("merging", "validating"):
            seen_in_flight[j["id"]] = seen_in_flight.get(j["id"], 0) + 1
        d.start(wait_ready=False)  # the next kill may hit start-up
    assert seen_in_flight, "no kill interrupted a job: the test proved nothing"
    try:
        d.wait_ready()  # the last daemon's metrics endpoint; a slow start-up on a busy machine took > 10 s
        wait_for("every checkpoint promoted", lambda: len(d.in_states("promoted")) == N_CHECKPOINTS, timeout=240)
        jobs = d.jobs()
        assert [j["state"] for j in jobs] == ["promoted"] * N_CHECKPOINTS  # nothing failed, nothing duplicated
        # a kill in flight re-queued the job (counted, backing off) or, after the rename into versions/,
        # had its promotion completed at the restart; never a failure, never the child's fault
        assert all(j["child_failures"] == 0 for j in jobs)
        requeued = d.logged("job_requeued_after_restart")
        assert sum(j["interruptions"] for j in jobs) == len(requeued)
        assert len(requeued) + len(d.logged("promotion_completed_after_restart")) >= 1
        record = LineageRecord.read(d.store / "production")
        assert os.readlink(d.store / "production") == f"versions/v{N_CHECKPOINTS:06d}"
        assert [c.sha256 for c in record.checkpoints] == [content_hash(c) for c in ckpts]  # each once, in order
        assert content_hash(d.store / "production") == record.model_sha256
        assert list((d.store / "candidates").iterdir()) == []
        wait_for("the interruption gauge back at 0", lambda: d.metrics()[("nufilt_queued_job_interruptions", ())]
                 == 0, timeout=10)
    finally:
        assert d.stop() == 0
