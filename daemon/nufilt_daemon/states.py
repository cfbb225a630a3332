"""The daemon's one vocabulary: job states (what the journal stores) and gate outcomes.

StrEnums, so the journal, JSON logs, metrics labels and `status` carry the plain values
("queued", "promoted", ...), while the code names every state and never compares a bare string.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    MERGING = "merging"
    VALIDATING = "validating"
    PROMOTED = "promoted"
    REJECTED = "rejected"  # the checkpoint's fault (bad input, a check or threshold said no): quarantined
    FAILED = "failed"  # the daemon could not decide (crash, OOM, broken command, bad settings): may be retried
    DUPLICATE = "duplicate"  # same content as an earlier job: recorded, never merged


ACTIVE_STATES = (JobState.QUEUED, JobState.MERGING, JobState.VALIDATING)
FINAL_STATES = (JobState.PROMOTED, JobState.REJECTED, JobState.FAILED, JobState.DUPLICATE)
# Content already seen in one of these states is a duplicate; a failed job (crash, OOM, bad
# config) may be retried by dropping the same checkpoint again.
DUPLICATE_OF_STATES = (*ACTIVE_STATES, JobState.PROMOTED, JobState.REJECTED)
ALLOWED = {
    JobState.QUEUED: {JobState.MERGING, JobState.FAILED},
    JobState.MERGING: {JobState.VALIDATING, JobState.REJECTED, JobState.FAILED, JobState.QUEUED},
    JobState.VALIDATING: {JobState.PROMOTED, JobState.REJECTED, JobState.FAILED, JobState.QUEUED},
}
# the outcomes a merge ends in (metrics label values)
OUTCOME_STATES = (JobState.PROMOTED, JobState.REJECTED, JobState.FAILED)


class GateOutcome(StrEnum):
    """What validation decides about a candidate (the merge process's own errors use the last two)."""

    ACCEPTED = "accepted"  # promoted next
    REJECTED = "rejected"  # the job ends JobState.REJECTED, the candidate quarantined
    FAILED = "failed"  # the job ends JobState.FAILED (or is retried when its merge process died)

    def job_state(self) -> JobState:
        """The final job state of a settled outcome (ACCEPTED becomes PROMOTED once promoted)."""
        return {GateOutcome.ACCEPTED: JobState.PROMOTED, GateOutcome.REJECTED: JobState.REJECTED,
                GateOutcome.FAILED: JobState.FAILED}[self]


class ProductionChangeKind(StrEnum):
    """Why production moved (journal `production_changes.kind`)."""

    PROMOTE = "promote"  # a job's candidate became production
    ROLLBACK = "rollback"  # `nufilt rollback`
    RECONCILE = "reconcile"  # the daemon found the production link moved outside a record (by hand, a dead rollback)


class OutboxKind(StrEnum):
    """The registry work an outbox item asks for (journal `outbox.kind`; metrics label values)."""

    PUBLISH = "publish"  # upload a store version as a new registry version
    SET_PRODUCTION = "set_production"  # move the production alias back (a rollback)


class OutboxState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    SKIPPED = "skipped"  # can never succeed (the version was pruned, or never published): the note says why
