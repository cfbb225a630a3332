"""Start-up repair after a crash, a kill -9 or a power cut: make the journal and the store agree.

- Candidates and merge temporaries are half-done work: deleted (the merge is redone).
- A job found merging or validating is re-queued, unless its promotion had already renamed the
  candidate into versions/ (found by job id and attempt in validation.json): then the promotion
  is completed (symlink, journal) instead of merging the same checkpoint twice.
- A daemon stop, crash or kill -9 is never the checkpoint's fault (the merge runs in a child
  process that dies with the daemon): the job is re-queued, never failed, with its
  `interruptions` counted (journal, metric nufilt_queued_job_interruptions) and a back-off
  (`not_before`, doubling per interruption) so that a crash loop does not spin.
- Staged copies that no live job refers to are deleted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog

from .intake import Intake
from .journal import Job, Journal
from .states import JobState
from .store import Store, Version, remove_tree

log = structlog.get_logger("nufilt.recovery")

MAX_BACKOFF_SECONDS = 300.0


@dataclass
class RecoveryReport:
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)  # always empty: kept for the start-up log line
    completed: list[int] = field(default_factory=list)  # promotions finished after the crash
    removed: list[str] = field(default_factory=list)


def find_version_of(store: Store, job: Job) -> Version | None:
    for v in reversed(store.versions()):
        r = v.report()
        if r.get("job_id") == job.id and r.get("attempt") == job.attempts:
            return v
    return None


def interruption_backoff(n: int, retry_seconds: float) -> float:
    """Seconds before a job interrupted `n` times starts again: retry_seconds, doubling, at most MAX_BACKOFF."""
    return min(MAX_BACKOFF_SECONDS, retry_seconds * 2 ** (n - 1))


def recover(journal: Journal, store: Store, intake: Intake, retry_seconds: float, publish: bool) -> RecoveryReport:
    out = RecoveryReport()
    out.removed += [str(p) for p in store.clean_candidates()]
    for job in journal.in_flight():
        version = find_version_of(store, job) if job.state == JobState.VALIDATING else None
        if version is not None:
            with store.lock():
                prod = store.production()
                if prod is None or prod.number == job.from_version:
                    store.set_production(version.number)
                    prod = version
                if prod.number == version.number:
                    step = int(version.lineage().step)
                    journal.record_promotion(job.id, job.from_version, version.number, step, publish)
                    out.completed.append(job.id)
                    log.warning("promotion_completed_after_restart", job=job.id, version=version.number)
                    continue
            remove_tree(version.path)  # production moved on meanwhile: this version continues nothing
        n = job.interruptions + 1
        delay = interruption_backoff(n, retry_seconds)
        journal.transition(job.id, JobState.QUEUED, f"the daemon stopped while {job.state} (interruption {n}); "
                           f"redone from the start in {delay:g}s", interruptions=n, not_before=time.time() + delay)
        out.requeued.append(job.id)
        log.warning("job_requeued_after_restart", job=job.id, checkpoint=job.reference, was=job.state,
                    interruptions=n, retry_in=delay)
    out.removed += [str(p) for p in intake.gc_staged()]
    return out
