"""Start-up repair after a crash, a kill -9 or a power cut: make the journal and the store agree.

- Candidates and merge temporaries are half-done work: deleted (the merge is redone).
- A job found merging or validating is re-queued, unless its promotion had already renamed the
  candidate into versions/ (found by job id and attempt in validation.json): then the promotion
  is completed (symlink, journal) instead of merging the same checkpoint twice.
- A job interrupted `max_attempts` times fails: a checkpoint that kills the daemon every time
  must not keep it in a crash loop.
- Staged copies that no live job refers to are deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from .intake import Intake
from .journal import FAILED, QUEUED, VALIDATING, Job, Journal
from .store import Store, Version, remove_tree

log = structlog.get_logger("nufilt.recovery")


@dataclass
class RecoveryReport:
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)  # promotions finished after the crash
    removed: list[str] = field(default_factory=list)


def find_version_of(store: Store, job: Job) -> Version | None:
    for v in reversed(store.versions()):
        r = v.report()
        if r.get("job_id") == job.id and r.get("attempt") == job.attempts:
            return v
    return None


def recover(journal: Journal, store: Store, intake: Intake, max_attempts: int, publish: bool) -> RecoveryReport:
    out = RecoveryReport()
    out.removed += [str(p) for p in store.clean_candidates()]
    for job in journal.in_flight():
        version = find_version_of(store, job) if job.state == VALIDATING else None
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
        if job.attempts >= max_attempts:
            reason = (f"interrupted {job.attempts} time(s) while {job.state} (the daemon crashed or was killed); "
                      "giving up")
            journal.transition(job.id, FAILED, reason)
            journal.clear_staged(job.id)  # gc_staged below deletes the copy
            out.failed.append(job.id)
            log.error("job_failed_after_restarts", job=job.id, checkpoint=job.reference, attempts=job.attempts)
        else:
            journal.transition(job.id, QUEUED, f"the daemon stopped while {job.state}; redone from the start")
            out.requeued.append(job.id)
            log.warning("job_requeued_after_restart", job=job.id, checkpoint=job.reference, was=job.state)
    out.removed += [str(p) for p in intake.gc_staged()]
    return out
