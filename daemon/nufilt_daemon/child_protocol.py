"""The typed boundary between the worker and its merge child (merge_process.py).

The worker writes one `ChildRequest` as JSON to the child's stdin; the child answers with
`ChildEvent` JSON lines on the events pipe. Both sides build and read these models, so a field
renamed or an event name misspelt on one side is a validation error on the other instead of a
key that silently reads as missing.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from nufilt_core.matrix_pool import Executor

from .config import GateSettings
from .states import GateOutcome


class _Message(BaseModel):
    # NaN/Inf written as JSON's common extension (as json.dumps does), not silently turned into null
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class ChildRequest(_Message):
    """One job's merge and checks, as the worker resolved them from the daemon's settings."""

    base: Path
    checkpoint: Path  # the staged copy (STATE/staged/...)
    output: Path  # the candidate folder (STORE/candidates/...)
    previous: Path | None  # production's folder; None at step 1
    method: str
    options: dict[str, Any]  # the method's settings
    seed: int
    device: str
    threads: int | None
    executor: Executor
    ray_address: str | None
    max_shard_bytes: int | None  # None: sharded as the base
    gate: GateSettings


class EventName(StrEnum):
    PROGRESS = "progress"  # a merge phase's progress (throttled)
    MERGED = "merged"  # the candidate is written: the job becomes validating
    VALIDATED = "validated"  # the built-in checks and scores are done
    ERROR = "error"  # the child stopped with an exception; no further events


class Progress(_Message):
    event: Literal[EventName.PROGRESS] = EventName.PROGRESS
    phase: str  # nufilt_core.merge.Progress.phase: check, statistics, merge
    index: int
    total: int
    elapsed: float


class Merged(_Message):
    event: Literal[EventName.MERGED] = EventName.MERGED
    record: dict[str, Any]  # the candidate's lineage record, as written beside it
    seconds: dict[str, float]  # per merge phase
    gpu_peak_bytes: int | None


class Validated(_Message):
    event: Literal[EventName.VALIDATED] = EventName.VALIDATED
    report: dict[str, Any]  # gate.check_candidate's {"problems", "checks", "scores"}
    seconds: float


class ChildError(_Message):
    event: Literal[EventName.ERROR] = EventName.ERROR
    stage: Literal["request", "merge", "validate"]
    kind: Literal[GateOutcome.REJECTED, GateOutcome.FAILED]  # the input's fault, or anything else
    type: str  # the exception's class name
    message: str


class ChildEvent(RootModel[Annotated[Progress | Merged | Validated | ChildError, Field(discriminator="event")]]):
    """One line of the events pipe: `ChildEvent.model_validate_json(line).root` is the typed event."""
