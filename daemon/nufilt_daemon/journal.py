"""The durable journal: one SQLite file (`STATE/journal.db`, WAL) that the daemon resumes from.

Every job (one arriving checkpoint) moves queued → merging → validating → promoted | rejected |
failed, and each transition is its own committed transaction, also logged in `transitions`.
Arrivals whose content hash matches an earlier job are recorded as `duplicate` and never merged.
Also here: production changes (promotions, rollbacks), the publishing outbox (work for MLflow
that must survive restarts) and a small key/value table for sources' cursors.

One connection per Journal, shared by the daemon's threads under a lock; other processes (the
CLI) open their own, which WAL allows while the daemon writes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nufilt_core.errors import NufiltError

from .states import (
    ACTIVE_STATES,
    ALLOWED,
    DUPLICATE_OF_STATES,
    FINAL_STATES,
    OUTCOME_STATES,
    JobState,
    OutboxKind,
    OutboxState,
    ProductionChangeKind,
)

JOURNAL_NAME = "journal.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    reference TEXT NOT NULL,
    sha256 TEXT,                 -- content hash (layout-independent); NULL when unreadable
    staged_path TEXT,            -- the daemon's own copy, removed once the job is final
    state TEXT NOT NULL,
    reason TEXT,
    duplicate_of INTEGER REFERENCES jobs(id),
    attempts INTEGER NOT NULL DEFAULT 0,   -- merges started (names candidates and logs; never fails a job)
    from_version INTEGER,        -- production version the merge started from (NULL: step 1)
    version INTEGER,             -- store version once promoted
    step INTEGER,                -- continual step of the candidate
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, id);
CREATE INDEX IF NOT EXISTS jobs_by_sha ON jobs(sha256);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS production_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,          -- promote | rollback
    from_version INTEGER,
    to_version INTEGER NOT NULL,
    job_id INTEGER,
    reason TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,          -- publish | set_production
    version INTEGER NOT NULL,    -- store version
    state TEXT NOT NULL,         -- pending | done | skipped
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    registry_version TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Columns added after the first release: (name, declaration), added to older journals on open.
ADDED_JOB_COLUMNS = (
    ("interruptions", "INTEGER NOT NULL DEFAULT 0"),   # daemon stops/crashes that interrupted the job
    ("child_failures", "INTEGER NOT NULL DEFAULT 0"),  # merge processes of this job that ended abnormally
    ("not_before", "REAL"),                            # back-off: not started again before this time
)


class JournalError(NufiltError):
    """The journal is missing, unreadable, or asked for a transition that is not allowed."""


@dataclass(frozen=True)
class Job:
    id: int
    source: str
    reference: str
    sha256: str | None
    staged_path: str | None
    state: JobState
    reason: str | None
    duplicate_of: int | None
    attempts: int
    from_version: int | None
    version: int | None
    step: int | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    interruptions: int = 0
    child_failures: int = 0
    not_before: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(**{**dict(row), "state": JobState(row["state"])})


@dataclass(frozen=True)
class ProductionChange:
    id: int
    kind: ProductionChangeKind
    from_version: int | None
    to_version: int
    job_id: int | None
    reason: str | None
    at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ProductionChange:
        return cls(**{**dict(row), "kind": ProductionChangeKind(row["kind"])})


@dataclass(frozen=True)
class OutboxItem:
    id: int
    # a kind this daemon does not know (written by a newer one) stays a plain string: the outbox skips it
    kind: OutboxKind | str
    version: int
    state: OutboxState
    attempts: int
    last_error: str | None
    registry_version: str | None
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> OutboxItem:
        kind = row["kind"]
        return cls(**{**dict(row), "kind": OutboxKind(kind) if kind in tuple(OutboxKind) else kind,
                      "state": OutboxState(row["state"])})


def _add_transition(db: sqlite3.Connection, job_id: int, from_state: JobState | None, to_state: JobState,
                    reason: str | None, at: float) -> None:
    db.execute("INSERT INTO transitions (job_id, from_state, to_state, reason, at) VALUES (?,?,?,?,?)",
               (job_id, from_state, to_state, reason, at))


def _add_production_change(db: sqlite3.Connection, kind: ProductionChangeKind, from_version: int | None,
                           to_version: int, job_id: int | None, reason: str | None, at: float) -> None:
    db.execute("INSERT INTO production_changes (kind, from_version, to_version, job_id, reason, at) "
               "VALUES (?,?,?,?,?,?)", (kind, from_version, to_version, job_id, reason, at))


def _add_outbox(db: sqlite3.Connection, kind: OutboxKind, version: int, now: float) -> None:
    db.execute("INSERT INTO outbox (kind, version, state, created_at, updated_at) VALUES (?,?,?,?,?)",
               (kind, version, OutboxState.PENDING, now, now))


def _inserted_id(cur: sqlite3.Cursor) -> int:
    """The id of the row an INSERT just added (`lastrowid` is None only for other statements)."""
    if cur.lastrowid is None:
        raise JournalError("an INSERT added no row")
    return cur.lastrowid


def _move(db: sqlite3.Connection, job_id: int, to_state: JobState, reason: str | None, now: float,
          fields: dict[str, Any], transition_reason: str | None = None) -> None:
    """Within the caller's transaction: the lifecycle check (ALLOWED), the job's new state with
    `fields`, and its transition row (with `transition_reason` where it differs from the job's)."""
    row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JournalError(f"no job {job_id}")
    from_state = JobState(row["state"])
    if to_state not in ALLOWED.get(from_state, set()):
        raise JournalError(f"job {job_id}: {from_state} → {to_state} is not allowed")
    cols = {**fields, "state": to_state, "reason": reason, "updated_at": now}
    if to_state == JobState.MERGING:
        cols["started_at"] = now
    if to_state in FINAL_STATES:
        cols["finished_at"] = now
    sets = ", ".join(f"{k} = ?" for k in cols)
    db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*cols.values(), job_id))
    _add_transition(db, job_id, from_state, to_state, transition_reason or reason, now)


class Journal:
    def __init__(self, path: Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise JournalError(f"{self.path}: no journal here (has the daemon run with this state_dir?)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed transition survives power loss
            self._db.execute("PRAGMA foreign_keys=ON")
            if create:
                self._db.executescript(SCHEMA)
                self._add_columns()
        except sqlite3.DatabaseError as e:
            raise JournalError(f"{self.path}: cannot open the journal ({e})") from e

    def _add_columns(self) -> None:
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for name, decl in ADDED_JOB_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")

    @classmethod
    def in_state_dir(cls, state_dir: Path, *, create: bool = True) -> Journal:
        return cls(Path(state_dir) / JOURNAL_NAME, create=create)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction; BEGIN IMMEDIATE so a writer never deadlocks on upgrade."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- jobs -----------------------------------------------------------------------------

    def add_job(self, source: str, reference: str, sha256: str | None, staged_path: str | None,
                state: JobState = JobState.QUEUED, reason: str | None = None) -> Job:
        """Record an arrival as it is. Whether its content is a duplicate is `add_if_duplicate`'s
        question, asked first under the intake's lock, so it is never asked twice here."""
        now = time.time()
        final = now if state in FINAL_STATES else None
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO jobs (source, reference, sha256, staged_path, state, reason, created_at, updated_at, "
                "finished_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (source, reference, sha256, staged_path, state, reason, now, now, final))
            job_id = _inserted_id(cur)
            _add_transition(db, job_id, None, state, reason, now)
        return self._job_or_error(job_id)

    def add_if_duplicate(self, source: str, reference: str, sha256: str) -> Job | None:
        """Record the arrival as a duplicate if its content is known, atomically; None if it is new."""
        now = time.time()
        marks = ",".join("?" * len(DUPLICATE_OF_STATES))
        with self._tx() as db:
            row = db.execute(f"SELECT id FROM jobs WHERE sha256 = ? AND state IN ({marks}) ORDER BY id LIMIT 1",
                             (sha256, *DUPLICATE_OF_STATES)).fetchone()
            if row is None:
                return None
            reason = f"same content as job {row['id']}"
            cur = db.execute(
                "INSERT INTO jobs (source, reference, sha256, state, reason, duplicate_of, created_at, updated_at, "
                "finished_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (source, reference, sha256, JobState.DUPLICATE, reason, row["id"], now, now, now))
            job_id = _inserted_id(cur)
            _add_transition(db, job_id, None, JobState.DUPLICATE, reason, now)
        return self._job_or_error(job_id)

    def transition(self, job_id: int, to_state: JobState, reason: str | None = None, **fields: Any) -> Job:
        """Move a job to `to_state` (checked against the lifecycle), setting extra columns."""
        allowed_fields = {"staged_path", "from_version", "version", "step", "attempts", "interruptions",
                          "child_failures", "not_before"}
        unknown = set(fields) - allowed_fields
        if unknown:
            raise JournalError(f"transition cannot set {sorted(unknown)}")
        with self._tx() as db:
            _move(db, job_id, to_state, reason, time.time(), fields)
        return self._job_or_error(job_id)

    def job(self, job_id: int) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def _job_or_error(self, job_id: int) -> Job:
        """A job this connection has just written (so it exists)."""
        job = self.job(job_id)
        if job is None:
            raise JournalError(f"no job {job_id}")
        return job

    def next_queued(self) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE state = ? ORDER BY id LIMIT 1", (JobState.QUEUED,))
        return Job.from_row(rows[0]) if rows else None

    def jobs(self, limit: int = 50, states: tuple[JobState, ...] | None = None) -> list[Job]:
        """Most recent first."""
        if states:
            marks = ",".join("?" * len(states))
            rows = self._query(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id DESC LIMIT ?",
                               (*states, limit))
        else:
            rows = self._query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return [Job.from_row(r) for r in rows]

    def latest_with_content(self, sha256: str, after_id: int = 0) -> Job | None:
        """The newest job for this content hash with an id above `after_id` (None: not journaled yet)."""
        rows = self._query("SELECT * FROM jobs WHERE sha256 = ? AND id > ? ORDER BY id DESC LIMIT 1",
                           (sha256, after_id))
        return Job.from_row(rows[0]) if rows else None

    def in_flight(self) -> list[Job]:
        return list(reversed(self.jobs(limit=1_000_000, states=(JobState.MERGING, JobState.VALIDATING))))

    def counts(self) -> dict[JobState, int]:
        rows = self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        out = dict.fromkeys((*ACTIVE_STATES, *FINAL_STATES), 0)
        out.update({JobState(r["state"]): r["n"] for r in rows})
        return out

    def last_finished(self) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE state IN (?,?,?) ORDER BY finished_at DESC, id DESC LIMIT 1",
                           OUTCOME_STATES)
        return Job.from_row(rows[0]) if rows else None

    def transitions(self, job_id: int) -> list[tuple[JobState | None, JobState, str | None, float]]:
        rows = self._query("SELECT from_state, to_state, reason, at FROM transitions WHERE job_id = ? ORDER BY id",
                           (job_id,))
        return [(JobState(r["from_state"]) if r["from_state"] is not None else None, JobState(r["to_state"]),
                 r["reason"], r["at"]) for r in rows]

    def mark_started(self, job_id: int, from_version: int | None) -> Job:
        """queued → merging, counting the attempt in the same transaction."""
        job = self.job(job_id)
        if job is None:
            raise JournalError(f"no job {job_id}")
        return self.transition(job_id, JobState.MERGING, from_version=from_version, attempts=job.attempts + 1)

    def clear_staged(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET staged_path = NULL WHERE id = ?", (job_id,))

    def max_version(self) -> int:
        rows = self._query("SELECT MAX(version) AS v FROM jobs")
        return int(rows[0]["v"] or 0)

    # --- production changes ---------------------------------------------------------------

    def record_promotion(self, job_id: int, from_version: int | None, version: int, step: int,
                         publish: bool) -> Job:
        """validating → promoted, the production change and (with a registry) the publish work item,
        in one transaction: a crash cannot leave a promotion that is never published."""
        now = time.time()
        with self._tx() as db:
            # the job's reason stays empty (a promotion needs none); its transition says which version
            _move(db, job_id, JobState.PROMOTED, None, now, {"version": version, "step": step},
                  transition_reason=f"version {version}")
            _add_production_change(db, ProductionChangeKind.PROMOTE, from_version, version, job_id, None, now)
            if publish:
                _add_outbox(db, OutboxKind.PUBLISH, version, now)
        return self._job_or_error(job_id)

    def record_rollback(self, from_version: int | None, to_version: int, reason: str | None, publish: bool,
                        kind: ProductionChangeKind = ProductionChangeKind.ROLLBACK) -> None:
        """A production change made outside a promotion: a rollback, or (RECONCILE) a production link the
        daemon found moved by hand or by a rollback that died before this record."""
        now = time.time()
        with self._tx() as db:
            _add_production_change(db, kind, from_version, to_version, None, reason, now)
            # this store publishes to a registry even if the caller (`nufilt rollback` in a shell
            # without the MLflow settings) does not know it: the alias must follow all the same
            published = db.execute("SELECT 1 FROM outbox WHERE kind = ? LIMIT 1",
                                   (OutboxKind.PUBLISH,)).fetchone() is not None
            if publish or published:
                _add_outbox(db, OutboxKind.SET_PRODUCTION, to_version, now)

    def production_changes(self, limit: int = 50) -> list[ProductionChange]:
        rows = self._query("SELECT * FROM production_changes ORDER BY id DESC LIMIT ?", (limit,))
        return [ProductionChange.from_row(r) for r in rows]

    def count_rollbacks(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM production_changes WHERE kind = ?",
                               (ProductionChangeKind.ROLLBACK,))[0]["n"])

    # --- outbox (publishing that must survive restarts) ------------------------------------

    def next_outbox(self) -> OutboxItem | None:
        rows = self._query("SELECT * FROM outbox WHERE state = ? ORDER BY id LIMIT 1", (OutboxState.PENDING,))
        return OutboxItem.from_row(rows[0]) if rows else None

    def finish_outbox(self, item_id: int, state: OutboxState, registry_version: str | None = None,
                      note: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET state = ?, registry_version = COALESCE(?, registry_version), "
                       "last_error = ?, updated_at = ? WHERE id = ?",
                       (state, registry_version, note, time.time(), item_id))

    def outbox_failed_attempt(self, item_id: int, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ?, updated_at = ? WHERE id = ?",
                       (error, time.time(), item_id))

    def registry_version_of(self, version: int) -> str | None:
        rows = self._query("SELECT registry_version FROM outbox WHERE kind = ? AND version = ? "
                           "AND state = ? ORDER BY id DESC LIMIT 1", (OutboxKind.PUBLISH, version, OutboxState.DONE))
        return rows[0]["registry_version"] if rows else None

    def outbox_pending(self) -> list[OutboxItem]:
        rows = self._query("SELECT * FROM outbox WHERE state = ? ORDER BY id", (OutboxState.PENDING,))
        return [OutboxItem.from_row(r) for r in rows]

    # --- key/value for sources' cursors -----------------------------------------------------

    def get_state(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM kv WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_state(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO kv (key, value) VALUES (?, ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))
