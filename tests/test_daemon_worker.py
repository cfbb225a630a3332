"""The merge worker in-process with a real journal, store and merge child: what one bad job does."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from daemon_harness import wait_for
from models import base_state, finetune, write_model
from nufilt_daemon.sources.base import Arrival
from nufilt_daemon.states import FINAL_STATES, JobState
from nufilt_daemon.status import status_data
from pydantic import ValidationError
from worker_harness import make_worker, run_until


def test_a_merge_process_killed_like_the_oom_killer_fails_only_its_job(tiny: dict[str, Path], tmp_path: Path):
    worker, intake, journal, store = make_worker(tmp_path, tiny["base"], max_attempts=2)
    intake.emit(Arrival(tiny["t1"], "folder", "t1"))
    intake.emit(Arrival(tiny["t2"], "folder", "t2"))
    worker.start()
    try:
        killed = []
        for _ in range(2):  # its own process dying counts: retried once, then failed (max_attempts = 2)
            child = wait_for("a merge process of job 1", lambda: worker._child if worker._child and
                             worker._child.pid not in killed else None, timeout=60, interval=0.01)
            os.kill(child.pid, signal.SIGKILL)  # what the kernel's OOM killer does
            killed.append(child.pid)
            if not killed[1:]:
                wait_for("job 1 queued again", lambda: journal.job(1).child_failures == 1, timeout=30)
        wait_for("the second job", lambda: journal.job(2).state == JobState.PROMOTED, timeout=120)
        assert worker.is_alive()
    finally:
        worker.stop(0)
    first = journal.job(1)
    assert first.state == JobState.FAILED and "killed by SIGKILL" in first.reason and "out of memory" in first.reason
    assert (first.attempts, first.child_failures) == (2, 1)
    assert "attempt 1 of 2, retried" in journal.transitions(1)[2][2]
    assert store.production().number == 1 and store.production().lineage().step == 1  # t2 became step 1
    assert worker.metrics.merges.labels("failed")._value.get() == 1
    assert list(store.candidates_dir.iterdir()) == []
    assert (tmp_path / "state" / "logs" / "job-000001-a1.log").exists()


def test_a_method_setting_the_merge_refuses_fails_the_job_with_the_method_s_message(tiny: dict[str, Path],
                                                                                    tmp_path: Path):
    with pytest.raises(ValidationError, match="null_rnk"):  # refused when the settings load (daemon: exit 78)
        make_worker(tmp_path, tiny["base"], method_settings={"null_rnk": 4})
    worker, intake, journal, store = make_worker(tmp_path, tiny["base"])
    worker.settings.method_settings = {"null_rnk": 4}  # one that gets past anyway: the merge process says no
    intake.emit(Arrival(tiny["t1"], "folder", "t1"))
    run_until(worker, "the job to end", lambda: journal.job(1).state == JobState.FAILED, timeout=120)
    assert "null_rnk" in journal.job(1).reason and store.production() is None
    assert journal.job(1).staged_path is None  # a failed job's copy is dropped; resubmitting retries it


def test_an_internal_error_fails_the_job_and_removes_its_candidate(tiny: dict[str, Path], tmp_path: Path):
    worker, intake, journal, store = make_worker(tmp_path, tiny["base"])
    store.versions_dir.rmdir()
    store.versions_dir.write_text("not a folder")  # promotion's rename into versions/ fails for real
    intake.emit(Arrival(tiny["t1"], "folder", "t1"))
    run_until(worker, "the job to fail", lambda: journal.job(1).state == JobState.FAILED, timeout=120)
    assert "internal error" in journal.job(1).reason
    assert list(store.candidates_dir.iterdir()) == []  # not left on disk until a restart


def test_a_checkpoint_from_another_base_is_rejected_with_its_distance(tiny: dict[str, Path], tmp_path: Path):
    import json

    from models import base_state, write_model

    other = write_model(base_state(seed=7), tmp_path / "other")  # same names and shapes, unrelated values
    worker, intake, journal, store = make_worker(tmp_path, tiny["base"])
    intake.emit(Arrival(other, "folder", "other"))
    intake.emit(Arrival(tiny["t1"], "folder", "t1"))
    run_until(worker, "both jobs done", lambda: journal.job(2).state == JobState.PROMOTED, timeout=120)
    first = journal.job(1)
    assert first.state == JobState.REJECTED and "implausibly far from the base" in first.reason
    assert "median relative distance" in first.reason and "1.4" in first.reason  # the number, ≈ √2
    assert store.production().lineage().step == 1  # t1 became step 1: the other model never entered
    report = json.loads((store.production().path / "validation.json").read_text())
    assert 0 < report["checks"]["distance_from_base"]["median"] < 0.5


GATE_CASES = {
    # name: (settings, final state, reason fragment)
    "command-rejects": ({"gate": {"command": ["sh", "-c", "echo bad >&2; exit 3", "sh"]}}, "rejected", "exited with 3"),
    "threshold-rejects": ({"gate": {"thresholds": {"stability": {"max": -1}}}}, "rejected", "above the maximum"),
    "equal-to-threshold": ({"gate": {"command": ["sh", "-c", "echo '{\"acc\": 0.5}'", "sh"],
                                     "thresholds": {"acc": {"min": 0.5, "max": 0.5}}}}, "promoted", None),
    "command-missing": ({"gate": {"command": ["/nonexistent/validate"]}}, "failed", "not found"),
    "command-timeout": ({"gate": {"command": ["sh", "-c", "sleep 30", "sh"], "command_timeout_seconds": 0.3}}, "failed",
                        "timed out"),
    "command-no-json": ({"gate": {"command": ["sh", "-c", "echo hello", "sh"]}}, "failed", "no JSON"),
    "merge-timeout": ({"merge_timeout_seconds": 0.05}, "failed", "merge timed out"),
}


@pytest.mark.parametrize("case", list(GATE_CASES))
def test_the_gate_in_the_worker_decides(tiny: dict[str, Path], tmp_path: Path, case: str):
    settings, final, fragment = GATE_CASES[case]
    worker, intake, journal, store = make_worker(tmp_path, tiny["base"], **settings)
    intake.emit(Arrival(tiny["t1"], "folder", "t1"))
    run_until(worker, "the job to end", lambda: journal.job(1).state in ("promoted", "rejected", "failed"), timeout=120)
    job = journal.job(1)
    assert job.state == final and (fragment is None or fragment in job.reason), job.reason
    assert list(store.candidates_dir.iterdir()) == []
    quarantined = store.quarantine_dir / "job-000001"
    if final == "promoted":
        assert store.production().number == 1
    else:
        assert store.production() is None  # production never moves on a rejection or a failure
        assert quarantined.is_dir() == (final == "rejected")
        if final == "rejected":
            assert json.loads((quarantined / "validation.json").read_text())["decision"] == "rejected"


def test_a_staged_copy_changed_after_arrival_fails_the_job(tiny: dict[str, Path], tmp_path: Path):
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(tiny["t1"], mine)
    worker, intake, journal, store = make_worker(tmp_path, tiny["base"])
    intake.emit(Arrival(mine, "folder", "mine"))
    staged = Path(journal.job(1).staged_path) / "model.safetensors"
    with staged.open("r+b") as f:  # one data byte changed in place (in the daemon's private copy)
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    run_until(worker, "the job to end", lambda: journal.job(1).state == JobState.FAILED, timeout=120)
    assert "no longer matches the content hash" in journal.job(1).reason and store.production() is None


def test_a_rollback_while_a_merge_runs_discards_the_candidate_and_redoes_the_job(tiny: dict[str, Path],
                                                                                  tmp_path: Path):
    # merges of seconds (the tiny model's take milliseconds): the rollback must land inside job 3's merge
    worker, intake, journal, store = make_worker(tmp_path, tiny["base"], method_settings={"iters": 3000})
    for name in ("t1", "t2"):
        intake.emit(Arrival(tiny[name], "folder", name))
    worker.start()
    try:
        wait_for("v2", lambda: journal.job(2).state == JobState.PROMOTED, timeout=120)
        intake.emit(Arrival(tiny["t3"], "folder", "t3"))
        wait_for("job 3 merging from v2", lambda: journal.job(3).state == "merging" and worker._child, timeout=60,
                 interval=0.01)
        worker.promoter.rollback("regressed")  # what `nufilt rollback` does from another process
        wait_for("job 3 promoted", lambda: journal.job(3).state == JobState.PROMOTED, timeout=120)
    finally:
        worker.stop(0)
    job = journal.job(3)
    steps = [(t[1], t[2]) for t in journal.transitions(3)]
    assert ("queued", "production changed during the merge (rollback); redone from the new production") in steps
    assert job.attempts == 1 and job.from_version == 1 and job.child_failures == 0  # a requeue is not an attempt
    prod = store.production()
    assert prod.number == job.version == 3 and prod.parent == 1 and prod.lineage().step == 2
    assert list(store.candidates_dir.iterdir()) == []


def test_a_sharded_base_gives_sharded_versions(tmp_path: Path):
    """Without max_shard_bytes, a version is sharded as the base (its largest shard), not one 5 GiB file."""
    base = base_state()
    worker, intake, journal, store = make_worker(tmp_path, write_model(base, tmp_path / "base", shards=3))
    intake.emit(Arrival(write_model(finetune(base, 1), tmp_path / "t1", shards=3), "folder", "t1"))
    run_until(worker, "the job to end", lambda: journal.job(1).state in FINAL_STATES, timeout=120)
    assert journal.job(1).state == JobState.PROMOTED, journal.job(1).reason
    version = store.production().path
    shards = sorted(p.name for p in version.glob("*.safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in shards
    index = json.loads((version / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards and set(index["weight_map"]) == set(base)


def test_an_idle_worker_pre_starts_the_next_job_s_merge_process_and_stop_ends_it(tiny: dict[str, Path],
                                                                                 tmp_path: Path):
    worker, intake, journal, store = make_worker(tmp_path, tiny["base"])
    logs = tmp_path / "state" / "logs"
    worker.start()
    try:
        spare = wait_for("a pre-started merge process", lambda: worker._spare, timeout=30).proc
        assert spare.poll() is None and (logs / "merge-spare.log").exists()
        intake.emit(Arrival(tiny["t1"], "folder", "t1"))
        worker.wake()
        running = wait_for("job 1's merge process", lambda: worker._child, timeout=60, interval=0.01)
        assert running.pid == spare.pid  # the job took the waiting process, not a new one
        wait_for("job 1 promoted", lambda: journal.job(1).state == JobState.PROMOTED, timeout=120)
        assert (logs / "job-000001-a1.log").exists() and spare.wait(10) == 0
        following = wait_for("the next spare", lambda: worker._spare, timeout=30).proc
        assert following.pid != spare.pid and following.poll() is None
        os.kill(following.pid, signal.SIGKILL)  # a spare killed while it waits is replaced, not handed a job
        third = wait_for("a replacement", lambda: worker._spare if worker._spare and worker._spare.proc.pid
                         != following.pid else None, timeout=30).proc
        intake.emit(Arrival(tiny["t2"], "folder", "t2"))
        worker.wake()
        wait_for("job 2 promoted", lambda: journal.job(2).state == JobState.PROMOTED, timeout=120)
        last = wait_for("a spare after job 2", lambda: worker._spare, timeout=30).proc
    finally:
        worker.stop(0)
    assert third.poll() == 0 and last.wait(0) == 0  # released with an empty request: a clean exit
    assert worker._spare is None and store.production().lineage().step == 2


def test_without_prestart_no_merge_process_waits(tiny: dict[str, Path], tmp_path: Path):
    worker, intake, journal, _ = make_worker(tmp_path, tiny["base"], prestart_merge_process=False)
    intake.emit(Arrival(tiny["t1"], "folder", "t1"))
    idle_since: list[float] = []

    def idle_a_while() -> bool:  # two turns of the idle loop (1 s each), where a spare would have started
        if journal.job(1).state != JobState.PROMOTED:
            return False
        idle_since[:] = idle_since or [time.monotonic()]
        return time.monotonic() - idle_since[0] > 2.5

    run_until(worker, "job 1 promoted and the worker idle", idle_a_while)
    assert worker._spare is None and not (tmp_path / "state" / "logs" / "merge-spare.log").exists()


def test_unset_method_settings_start_new_lineages_with_the_recommended_profile_and_leave_running_ones_alone(
        tiny: dict[str, Path], tmp_path: Path):
    from nufilt_core.methods.profiles import DEFAULT_PROFILE as recommended

    assert recommended != "paper"  # else this test would not tell the two apart

    # a lineage started before an upgrade, with the paper's NUFILT; the upgraded daemon leaves method_settings unset
    old = tmp_path / "old"
    worker, intake, journal, store = make_worker(old, tiny["base"], method_settings={"profile": "paper", "iters": 2})
    intake.emit(Arrival(tiny["t1"], "folder", "t1"))
    run_until(worker, "step 1", lambda: journal.job(1).state in FINAL_STATES)
    worker, intake, journal, store = make_worker(old, tiny["base"], method_settings=None)
    upgraded = status_data(worker.settings)  # what `nufilt status` tells the operator before the next merge
    assert upgraded["production"]["profile"] == "paper"
    assert upgraded["next_merge"]["options"] == {} and "inherited from the lineage" in upgraded["next_merge"]["source"]
    assert upgraded["next_merge"]["settings"]["profile"] == "paper" and upgraded["next_merge"]["settings"]["iters"] == 2
    intake.emit(Arrival(tiny["t2"], "folder", "t2"))
    run_until(worker, "step 2", lambda: journal.job(2).state in FINAL_STATES)
    assert journal.job(2).state == JobState.PROMOTED, journal.job(2).reason
    step2 = store.production().lineage()
    assert step2.step == 2 and step2.settings["profile"] == "paper" and step2.settings["iters"] == 2

    # a new lineage with method_settings unset: step 1 takes the recommended profile, step 2 inherits it
    worker, intake, journal, store = make_worker(tmp_path / "new", tiny["base"], method_settings=None)
    fresh = status_data(worker.settings)["next_merge"]
    assert fresh["options"] == {} and fresh["settings"]["profile"] == recommended
    intake.emit(Arrival(tiny["t1"], "folder", "t1"))
    intake.emit(Arrival(tiny["t2"], "folder", "t2"))
    run_until(worker, "both steps", lambda: journal.job(2).state in FINAL_STATES)
    assert journal.job(2).state == JobState.PROMOTED, journal.job(2).reason
    records = [store.version(n).lineage() for n in (1, 2)]
    assert [r.step for r in records] == [1, 2] and {r.settings["profile"] for r in records} == {recommended}
    assert records[0].settings == records[1].settings

