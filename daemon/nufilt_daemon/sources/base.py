"""The contract between sources and the daemon: an Arrival, the emit callback, the Source protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Arrival:
    path: Path  # a checkpoint as nufilt_core.checkpoint.Checkpoint.open accepts (file or folder)
    source: str  # "folder", "mlflow", ... (metric label nufilt_checkpoints_detected_total{source})
    reference: str  # where it came from, for people: inbox file name, "models:/name/7"
    refused: str | None = None  # the source could not get it (its artifacts are gone): journaled rejected, why


# Thread-safe; returns once the arrival is durably journaled (copied into the state dir and
# committed), so the source may then delete or move its own copy.
Emit = Callable[[Arrival], None]


@runtime_checkable
class Source(Protocol):
    name: str

    def start(self, emit: Emit) -> None:
        """Start the source's own thread(s); return at once."""

    def stop(self) -> None:
        """Stop and join the threads; safe to call twice."""

    def healthy(self) -> bool:
        """False makes the supervisor restart the source (stop, then start)."""
