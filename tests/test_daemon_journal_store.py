"""The daemon's durable state: journal lifecycle, store versions and production, recovery, outbox."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from nufilt_daemon.intake import Intake
from nufilt_daemon.journal import Journal, JournalError
from nufilt_daemon.metrics import Metrics
from nufilt_daemon.publishers.outbox import Outbox
from nufilt_daemon.recovery import recover
from nufilt_daemon.states import JobState
from nufilt_daemon.store import Store, StoreError

from nufilt_core.lineage import CheckpointRef, LineageRecord


def test_job_lifecycle_is_enforced_and_survives_reopening(tmp_path: Path):
    j = Journal.in_state_dir(tmp_path)
    job = j.add_job("folder", "a.safetensors", "aaa", "/staged/a")
    assert job.state == JobState.QUEUED and job.attempts == 0
    with pytest.raises(JournalError, match="queued → promoted is not allowed"):
        j.transition(job.id, JobState.PROMOTED)
    with pytest.raises(JournalError, match="queued → promoted is not allowed"):  # the same lifecycle check
        j.record_promotion(job.id, None, 1, 1, publish=True)
    assert j.production_changes() == [] and j.outbox_pending() == []  # nothing of it was written
    j.mark_started(job.id, None)
    j.transition(job.id, JobState.VALIDATING, step=1)
    j.record_promotion(job.id, None, 1, 1, publish=True)
    j.set_state("mlflow:cursor", "7")
    j.close()

    j = Journal.in_state_dir(tmp_path, create=False)
    done = j.job(job.id)
    assert (done.state, done.version, done.step, done.attempts) == (JobState.PROMOTED, 1, 1, 1)
    assert [t[1] for t in j.transitions(job.id)] == ["queued", "merging", "validating", "promoted"]
    assert j.get_state("mlflow:cursor") == "7" and j.get_state("other") is None
    assert [(c.kind, c.to_version) for c in j.production_changes()] == [("promote", 1)]
    assert [(o.kind, o.version) for o in j.outbox_pending()] == [("publish", 1)]  # same transaction
    with pytest.raises(JournalError, match="no journal here"):
        Journal.in_state_dir(tmp_path / "elsewhere", create=False)


def test_duplicates_are_recorded_and_failed_content_may_come_again(tmp_path: Path):
    j = Journal.in_state_dir(tmp_path)
    assert j.add_if_duplicate("folder", "a", "aaa") is None  # new content: the intake stages it, then adds it
    first = j.add_job("folder", "a", "aaa", "/s/a")
    again = j.add_if_duplicate("mlflow", "models:/m/3", "aaa")
    assert (again.state, again.duplicate_of, again.staged_path) == (JobState.DUPLICATE, first.id, None)
    j.mark_started(first.id, None)
    j.transition(first.id, JobState.FAILED, "out of memory")
    assert j.add_if_duplicate("folder", "a-retry", "aaa") is None
    retry = j.add_job("folder", "a-retry", "aaa", "/s/c")
    assert retry.state == JobState.QUEUED  # a failed job's content is not a duplicate: it may be retried
    rejected = j.add_job("folder", "broken", None, None, JobState.REJECTED, "unreadable")
    assert rejected.state == JobState.REJECTED and rejected.finished_at is not None
    assert j.counts()[JobState.DUPLICATE] == 1 and j.next_queued().id == retry.id


def record(step: int) -> LineageRecord:
    return LineageRecord(method="nufilt", settings={}, seed=0, step=step, base=CheckpointRef("b" * 64, "base"),
                         checkpoints=[], model_sha256="")


def make_version(store: Store, tmp_path: Path, job_id: int, parent: int | None, floor: int = 0):
    cand = store.candidate_path(job_id, 1)
    cand.mkdir(parents=True)
    (cand / "model.safetensors").write_bytes(b"x")
    return store.add_version(cand, {"job_id": job_id, "attempt": 1, "parent_version": parent}, floor=floor)


def test_store_versions_production_rollback_and_retention(tmp_path: Path):
    store = Store(tmp_path / "store").ensure()
    assert store.production() is None
    with pytest.raises(StoreError, match="nothing to roll back"):
        store.rollback_target()
    parent = None
    for job in range(1, 6):
        v = make_version(store, tmp_path, job, parent)
        store.set_production(v.number)
        parent = v.number
    assert os.readlink(store.production_link) == "versions/v000005"  # relative: the store can be moved
    assert not list(store.root.glob(".production.tmp-*"))
    current, target = store.rollback_target()
    assert (current.number, target.number) == (5, 4)
    store.set_production(1)
    with pytest.raises(StoreError, match="first version"):
        store.rollback_target()

    # retention: the newest K, plus production and its parent, whatever their age
    store.set_production(3)
    assert store.prune(keep=2) == [1]  # keeps 4, 5 (newest), 3 (production), 2 (its parent)
    assert [v.number for v in store.versions()] == [2, 3, 4, 5]
    assert make_version(store, tmp_path, 9, 3, floor=8).number == 9  # never reuses a journaled number

    q1 = store.quarantine(6, None, {"reasons": ["bad"]}, keep=1)
    cand = store.candidate_path(7, 1)
    cand.mkdir()
    q2 = store.quarantine(7, cand, {"reasons": ["worse"]}, keep=1)
    assert not q1.exists() and not cand.exists()
    assert json.loads((q2 / "validation.json").read_text())["reasons"] == ["worse"]

    store.candidate_path(8, 2).mkdir()
    (store.versions_dir / ".deleting-v000001-abc").mkdir()
    assert len(store.clean_candidates()) == 2 and [v.number for v in store.versions()] == [2, 3, 4, 5, 9]


def test_recovery_completes_a_promotion_cut_short_and_requeues_the_rest(tiny: dict[str, Path], tmp_path: Path):
    """The states a crash can leave, built on disk, then repaired as a restart would."""
    store = Store(tmp_path / "store").ensure()
    j = Journal.in_state_dir(tmp_path / "state")
    intake = Intake(j, tmp_path / "state" / "staged", lambda job, arrival: None)
    # job 1: candidate already renamed into versions/ when the daemon died; production not switched yet
    a = j.add_job("folder", "a", "aaa", None)
    j.mark_started(a.id, None)
    j.transition(a.id, JobState.VALIDATING, step=1)
    cand = store.candidate_path(a.id, 1)
    shutil.copytree(tiny["t1"], cand)
    record(1).write(cand)
    v1 = store.add_version(cand, {"job_id": a.id, "attempt": 1, "parent_version": None})
    # job 2: died mid-merge, leaving a candidate; job 3: interrupted for the third time
    b = j.add_job("folder", "b", "bbb", None)
    j.mark_started(b.id, None)
    store.candidate_path(b.id, 1).mkdir()
    c = j.add_job("folder", "c", "ccc", None)
    for _ in range(3):
        j.mark_started(c.id, None)
        j.transition(c.id, JobState.QUEUED)
    j.mark_started(c.id, None)
    orphan = tmp_path / "state" / "staged" / "orphan"
    orphan.mkdir(parents=True)

    before = time.time()
    report = recover(j, store, intake, retry_seconds=2.0, publish=False)
    # a daemon crash is never the checkpoint's fault: however often, the job is queued again, backing off
    assert report.completed == [a.id] and report.requeued == [b.id, c.id] and report.failed == []
    assert store.production().number == v1.number
    assert j.job(a.id).state == JobState.PROMOTED and j.job(a.id).version == v1.number
    assert j.job(b.id).state == JobState.QUEUED and "redone" in j.job(b.id).reason
    assert j.job(c.id).state == JobState.QUEUED and j.job(c.id).interruptions == 1 and j.job(c.id).attempts == 4
    assert before + 2.0 <= j.job(b.id).not_before <= time.time() + 2.0
    j.transition(c.id, JobState.MERGING)  # interrupted again: the back-off doubles
    recover(j, store, intake, retry_seconds=2.0, publish=False)
    assert j.job(c.id).interruptions == 2 and j.job(c.id).not_before >= before + 4.0
    assert not store.candidate_path(b.id, 1).exists() and not orphan.exists()


class FlakyRegistry:
    """A test double for the registry: down for the first calls, then up (an outage we script)."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls: list[tuple[str, object]] = []

    def publish(self, model_dir: Path, store_version: int, record: LineageRecord) -> str:
        self.calls.append(("publish", store_version))
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("registry down")
        return str(100 + store_version)

    def set_production(self, registry_version: str) -> None:
        self.calls.append(("set_production", registry_version))


def test_outbox_retries_in_order_until_the_registry_is_back(tiny: dict[str, Path], tmp_path: Path):
    store = Store(tmp_path / "store").ensure()
    j = Journal.in_state_dir(tmp_path / "state")

    def promote(reference: str, version: int) -> None:
        """The journal's side of a promotion, which adds the publish item in its transaction."""
        job = j.add_job("folder", reference, reference * 3, None)
        j.mark_started(job.id, None)
        j.transition(job.id, JobState.VALIDATING, step=1)
        j.record_promotion(job.id, None, version, 1, publish=True)

    for job in (1, 2):
        cand = store.candidate_path(job, 1)
        shutil.copytree(tiny["t1"], cand)
        record(job).write(cand)
        version = store.add_version(cand, {"job_id": job}).number
        promote(f"t{job}", version)
    j.record_rollback(2, 1, "worse", publish=True)  # a rollback after both publishes: set_production 1
    promote("pruned", 99)  # pruned before it could be published
    assert [(o.kind, o.version) for o in j.outbox_pending()] == [
        ("publish", 1), ("publish", 2), ("set_production", 1), ("publish", 99)]
    metrics = Metrics()
    registry = FlakyRegistry(failures=2)
    outbox = Outbox(j, store, registry, metrics, min_backoff=0.01, max_backoff=0.05)
    outbox.start()
    try:
        for _ in range(200):
            if not j.outbox_pending():
                break
            time.sleep(0.05)
    finally:
        outbox.stop()
    assert j.outbox_pending() == []
    assert registry.calls == [("publish", 1)] * 3 + [("publish", 2), ("set_production", "101")]
    assert metrics.registry_errors.labels("publish")._value.get() == 2
    assert j.registry_version_of(2) == "102"


def _promoting_job(j: Journal, store: Store, tmp_path: Path, job_id_ref: str, from_version: int | None, step: int):
    """A job the daemon died in while promoting: its candidate already renamed into versions/."""
    job = j.add_job("folder", job_id_ref, job_id_ref * 3, None)
    j.mark_started(job.id, from_version)
    j.transition(job.id, JobState.VALIDATING, step=step)
    cand = store.candidate_path(job.id, 1)
    cand.mkdir(parents=True)
    (cand / "model.safetensors").write_bytes(b"x")
    record(step).write(cand)
    return job, store.add_version(cand, {"job_id": job.id, "attempt": 1, "parent_version": from_version})


@pytest.mark.parametrize("point", ["renamed", "switched"])
def test_a_crash_during_a_step_2_promotion_is_completed_at_restart(tmp_path: Path, point: str):
    store = Store(tmp_path / "store").ensure()
    j = Journal.in_state_dir(tmp_path / "state")
    intake = Intake(j, tmp_path / "state" / "staged", lambda job, arrival: None)
    v1 = make_version(store, tmp_path, 99, None)
    store.set_production(v1.number)
    job, v2 = _promoting_job(j, store, tmp_path, "b", from_version=v1.number, step=2)
    if point == "switched":  # production symlink switched, the journal's promotion not committed
        store.set_production(v2.number)
    report = recover(j, store, intake, retry_seconds=0.0, publish=True)
    assert report.completed == [job.id] and report.requeued == []
    done = j.job(job.id)
    assert (done.state, done.version, done.step) == (JobState.PROMOTED, v2.number, 2)
    assert store.production().number == v2.number
    assert [(o.kind, o.version) for o in j.outbox_pending()] == [("publish", v2.number)]


def test_a_promotion_interrupted_after_production_moved_is_discarded_and_redone(tmp_path: Path):
    store = Store(tmp_path / "store").ensure()
    j = Journal.in_state_dir(tmp_path / "state")
    intake = Intake(j, tmp_path / "state" / "staged", lambda job, arrival: None)
    v1 = make_version(store, tmp_path, 98, None)
    v2 = make_version(store, tmp_path, 99, v1.number)
    store.set_production(v2.number)
    job, v3 = _promoting_job(j, store, tmp_path, "c", from_version=v1.number, step=2)  # merged from v1
    report = recover(j, store, intake, retry_seconds=0.0, publish=False)
    assert report.requeued == [job.id] and report.completed == []
    assert not v3.path.exists() and store.production().number == v2.number  # it continued nothing
    assert j.job(job.id).state == JobState.QUEUED and j.job(job.id).interruptions == 1


def test_a_journal_from_before_the_new_columns_is_upgraded_on_open(tmp_path: Path):
    import sqlite3

    from nufilt_daemon.journal import SCHEMA

    db = tmp_path / "journal.db"
    with sqlite3.connect(db) as con:  # the schema as released, without interruptions/child_failures/not_before
        con.executescript(SCHEMA)
        con.execute("INSERT INTO jobs (source, reference, state, created_at, updated_at) "
                    "VALUES ('folder', 'old', 'queued', 0, 0)")
    reader = Journal(db, create=False)  # `nufilt status` on an old journal: defaults, no upgrade
    assert (reader.job(1).interruptions, reader.job(1).not_before) == (0, None)
    reader.close()
    j = Journal(db)
    assert j.job(1).interruptions == 0 and j.job(1).child_failures == 0
    j.transition(1, JobState.MERGING)
    assert recover(j, Store(tmp_path / "store").ensure(), Intake(j, tmp_path / "staged", lambda *a: None),
                   retry_seconds=1.0, publish=False).requeued == [1]
    assert j.job(1).interruptions == 1


def test_job_states_and_gate_outcomes_are_named_only_in_the_states_module():
    """One vocabulary: the package compares and writes states through the enums, never literals."""
    import re

    package = Path(__file__).resolve().parent.parent / "daemon" / "nufilt_daemon"
    values = "|".join(["queued", "merging", "validating", "promoted", "rejected", "failed", "duplicate", "accepted"])
    literal = re.compile(rf"""["']({values})["']""")
    found = [f"{p.name}:{i}: {line.strip()}" for p in sorted(package.rglob("*.py")) if p.name != "states.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert found == []
