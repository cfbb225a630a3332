"""The contract between sources and the daemon: an Arrival, the emit callback, the Source protocol
and what a source reports about itself (its health, the inbox entries it holds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NotRequired, Protocol, TypedDict, runtime_checkable


@dataclass(frozen=True)
class Arrival:
    path: Path  # a checkpoint as nufilt_core.checkpoint.Checkpoint.open accepts (file or folder)
    source: str  # "folder", "mlflow", ... (metric label nufilt_checkpoints_detected_total{source})
    reference: str  # where it came from, for people: inbox file name, "models:/name/7"
    refused: str | None = None  # the source could not get it (its artifacts are gone): journaled rejected, why


# Thread-safe; returns once the arrival is durably journaled (copied into the state dir and
# committed), so the source may then delete or move its own copy.
Emit = Callable[[Arrival], None]


class SourceHealth(TypedDict):
    """A source's health for `nufilt status` (STATE/inbox.json)."""

    healthy: bool
    errors_in_a_row: int
    errors_total: int
    last_error: str | None
    failing_version: NotRequired[int | None]  # the registry's version that keeps failing (MLflow)


class InboxEntry(TypedDict):
    """Something a source has seen and not journaled (or could not move away): `nufilt status`, the gauge."""

    name: str
    state: str  # waiting | ignored | error (metrics.INBOX_STATES)
    reason: str | None
    seen_at: float | None
    failures: int


@runtime_checkable
class Source(Protocol):
    name: str

    def start(self, emit: Emit) -> None:
        """Start the source's own thread(s); return at once."""

    def stop(self) -> None:
        """Stop and join the threads; safe to call twice."""

    def healthy(self) -> bool:
        """False makes the supervisor restart the source (stop, then start)."""

    def health(self) -> SourceHealth:
        """What `nufilt status` shows about the source."""

    def entries(self) -> list[InboxEntry]:
        """What waits in the source's own inbox, not journaled yet (empty for sources without one)."""
