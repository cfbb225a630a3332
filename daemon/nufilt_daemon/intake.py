"""`emit`: turn a source's Arrival into a journaled job, durably, before the source lets go of it.

For each arrival: copy the checkpoint where the source left it into a hidden partial folder in
STATE/staged/, computing the layout-independent content hash from the very bytes being copied
(Checkpoint.copy_to: the checkpoint is read once). Then, under one lock so two copies of the same
content cannot both be queued, either record a duplicate (and remove the copy) or move the copy into
place and journal the job as queued. The copy is a real, private one, never a hard link: deleting,
moving or rewriting the inbox entry in place cannot change or lose a queued job. The merge later
re-hashes the staged copy and fails the job if it no longer matches.

An arrival that cannot be opened or read is journaled as rejected with the reason, so people see
it in `nufilt history` instead of it vanishing. Arrivals are opened strictly: links, FIFOs,
devices and sockets anywhere in the entry are refused, so nothing outside it is ever read or
copied. Intake is all or nothing: a failure (full disk, journal error) removes the staged copy
and raises IntakeError; the source retries with back-off, and the `max_failures`-th failure is
journaled as failed (not rejected: not the checkpoint's fault, so the same content dropped again is no
duplicate). Names are stored as printable text (names.py).
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.errors import CheckpointError, NufiltError
from nufilt_core.fsguard import check_tree
from nufilt_core.fsutil import fsync_dir

from .journal import Job, Journal
from .names import printable, staged_name
from .sources.base import Arrival
from .states import ACTIVE_STATES, JobState

log = structlog.get_logger("nufilt.intake")

DEFAULT_MAX_FAILURES = 5  # failed intakes of one entry (disk, journal) before it is journaled as failed


def content_hash(path: Path, strict: bool = False) -> str:
    """The same layout-independent hash merge_step records for its inputs."""
    checkpoint = Checkpoint.open(path, strict=strict)
    return checkpoint.content_hash(digest for _, _, digest in checkpoint.scan())


class IntakeError(NufiltError):
    """Staging or journaling one arrival failed (not the checkpoint's fault: disk, journal); retried."""


class Intake:
    def __init__(self, journal: Journal, staged_dir: Path, on_journaled: Callable[[Job, Arrival], None],
                 max_failures: int = DEFAULT_MAX_FAILURES):
        self.journal = journal
        self.staged_dir = Path(staged_dir)
        self.on_journaled = on_journaled  # metrics, waking the worker
        self.max_failures = max_failures
        self._lock = threading.Lock()
        self._failures: dict[tuple[str, str], int] = {}  # (source, reference) -> intakes failed in a row

    def emit(self, arrival: Arrival) -> None:
        """Journal the arrival. The checkpoint's own faults are journaled as rejected at once; any other
        failure leaves nothing behind and raises IntakeError (the source retries with back-off) until
        the `max_failures`-th, which is journaled as failed with the error."""
        reference = printable(arrival.reference)
        key = (arrival.source, reference)
        try:
            self._emit(arrival, reference)
        except Exception as e:
            n = self._failures.get(key, 0) + 1
            self._failures[key] = n
            error = f"{type(e).__name__}: {printable(str(e))}"
            log.warning("intake_failed", source=arrival.source, checkpoint=reference, failures=n, error=error)
            if n < self.max_failures:
                raise IntakeError(f"{reference}: intake failed ({n} of {self.max_failures}): {error}") from e
            # failed, not rejected: the daemon's own fault (a full disk), so dropping it again later merges it
            job = self.journal.add_job(arrival.source, reference, None, None, JobState.FAILED,
                                       f"intake failed {n} times, last: {error}")
            self._failures.pop(key, None)
            self.on_journaled(job, arrival)
            return
        self._failures.pop(key, None)

    def _emit(self, arrival: Arrival, reference: str) -> None:
        bound = log.bind(source=arrival.source, checkpoint=reference)
        if arrival.refused is not None:
            self._reject(arrival, reference, arrival.refused, bound)
            return
        self.staged_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:12]
        partial = self.staged_dir / f".{token}.partial"
        final = self.staged_dir / token
        try:  # all or nothing: the staged copy exists afterwards only if a queued job owns it
            try:  # outside the lock: copying is the slow part, and a duplicate is only known from the hash
                sha = self._copy(arrival, partial)
            except CheckpointError as e:  # the checkpoint's own fault: journaled at once, not retried
                _remove(partial)
                self._reject(arrival, reference, str(e), bound)
                return
            with self._lock:  # one arrival at a time from here: two copies of new content cannot both queue
                job = self.journal.add_if_duplicate(arrival.source, reference, sha)
                if job is not None:
                    _remove(partial)
                else:
                    os.rename(partial, final)  # a crash before the commit below leaves an orphan: gc_staged
                    fsync_dir(self.staged_dir)
                    staged = final / staged_name(arrival.path.name)
                    job = self.journal.add_job(arrival.source, reference, sha, str(staged), JobState.QUEUED)
        except BaseException:
            _remove(partial)
            _remove(final)
            raise
        event = "checkpoint_duplicate" if job.state == JobState.DUPLICATE else "checkpoint_queued"
        bound.info(event, job=job.id, sha256=sha[:16], duplicate_of=job.duplicate_of)
        self.on_journaled(job, arrival)

    @staticmethod
    def _copy(arrival: Arrival, partial: Path) -> str:
        """The private copy in `partial`, and its content hash, from one read of the checkpoint."""
        checkpoint = Checkpoint.open(arrival.path, strict=True)
        if checkpoint.path != Path(arrival.path):  # an index alone opens as its folder, maybe the inbox itself
            raise CheckpointError(arrival.path, "is an index file on its own: drop the folder that holds it and "
                                  "its shards")
        partial.mkdir()
        sha = checkpoint.copy_to(partial / staged_name(arrival.path.name))
        check_tree(partial)  # made of our own regular files; checked as the merge will trust it
        return sha

    def _reject(self, arrival: Arrival, reference: str, reason: str, bound: Any) -> None:
        reason = printable(reason)
        job = self.journal.add_job(arrival.source, reference, None, None, JobState.REJECTED, reason)
        bound.warning("checkpoint_unreadable", job=job.id, reason=reason)
        self.on_journaled(job, arrival)

    def gc_staged(self) -> list[Path]:
        """Remove staged copies no queued or running job refers to (crash leftovers)."""
        if not self.staged_dir.is_dir():
            return []
        wanted = {Path(j.staged_path).parent for j in self.journal.jobs(limit=1_000_000)
                  if j.staged_path and j.state in ACTIVE_STATES}
        removed = []
        for p in self.staged_dir.iterdir():
            if p not in wanted:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
        return removed


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
