"""The promoter: the only code that moves production (promotion, rollback) or quarantines.

Each production change happens under the store's file lock (the daemon and `nufilt rollback`
may run at the same time), in the order: version folder complete → symlink switched → journal
committed (with the registry work item in the same transaction). A crash between the steps is
repaired at start by recovery.py, which finds the version by its job id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .journal import Job, Journal
from .states import JobState, ProductionChangeKind
from .store import Store, StoreError, Version, version_name

log = structlog.get_logger("nufilt.promoter")


@dataclass(frozen=True)
class Rollback:
    from_version: int
    to_version: int


class Promoter:
    def __init__(self, store: Store, journal: Journal, keep_versions: int, keep_quarantine: int, publish: bool):
        self.store = store
        self.journal = journal
        self.keep_versions = keep_versions
        self.keep_quarantine = keep_quarantine
        self.publish = publish  # a registry is configured: record publishing work in the outbox

    def promote(self, job: Job, candidate: Path, report: dict[str, Any], step: int) -> Version | None:
        """Make the candidate the next version and production. None when production moved while
        this job merged (a rollback): the candidate no longer continues production."""
        with self.store.lock():
            prod = self.store.production()
            current = prod.number if prod else None
            if current != job.from_version:
                return None
            version = self.store.add_version(candidate, report, floor=self.journal.max_version())
            self.store.set_production(version.number)
            self.journal.record_promotion(job.id, current, version.number, step, self.publish)
            removed = self.store.prune(self.keep_versions)
        if removed:
            log.info("versions_pruned", versions=removed, keep=self.keep_versions)
        return version

    def reject(self, job: Job, candidate: Path | None, report: dict[str, Any], reason: str) -> Path:
        where = self.store.quarantine(job.id, candidate, report, self.keep_quarantine)
        self.journal.transition(job.id, JobState.REJECTED, reason)
        return where

    def reconcile(self) -> str | None:
        """The production link against the journal's last production change, at start and before each merge, so
        that no merge continues from anything but the production the journal knows of. A missing link is put
        back (merging from the base would drop every earlier merge); a link moved outside the daemon (by hand,
        or by a rollback killed between its link switch and its record) is followed and recorded as a production
        change of kind "reconcile". Returns what was done, None when they agree; raises StoreError when the
        journal's production version is gone too (the worker then waits instead of merging)."""
        with self.store.lock():
            changes = self.journal.production_changes(limit=1)
            expected = changes[0].to_version if changes else None
            try:
                prod = self.store.production()
            except StoreError as e:  # a link to a missing version, or not a link
                if expected is None:
                    raise
                prod, broken = None, str(e)
            else:
                broken = f"{self.store.production_link}: missing"
            actual = prod.number if prod else None
            if actual == expected:
                return None
            if actual is None:
                assert expected is not None
                if self.store.version(expected) is None:
                    raise StoreError(f"{broken}, and the journal's production {version_name(expected)} is not in "
                                     f"{self.store.versions_dir}: restore it, or point the link at a version with "
                                     "`ln -sfn versions/vNNNNNN production` (merges wait until then)")
                self.store.set_production(expected)
                what = f"{broken}; restored to {version_name(expected)}, the journal's production"
            else:
                what = (f"production was moved outside the daemon from "
                        f"{version_name(expected) if expected else 'none'} to {version_name(actual)}; merges "
                        "continue from it")
                self.journal.record_rollback(expected, actual, what, self.publish, kind=ProductionChangeKind.RECONCILE)
        log.warning("production_reconciled", what=what)
        return what

    def rollback(self, reason: str | None = None) -> Rollback:
        """Production back to the version it was merged from; later merges continue from there."""
        with self.store.lock():
            current, target = self.store.rollback_target()
            self.store.set_production(target.number)
            self.journal.record_rollback(current.number, target.number, reason, self.publish)
        log.info("rolled_back", from_version=current.number, version=target.number, reason=reason,
                 at=time.time())
        return Rollback(current.number, target.number)
