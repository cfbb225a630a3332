"""The interface every merge method implements.

The engine streams the model tensor by tensor. For each float tensor it hands the method the
base θ0, the previous merged model θ_{t-1}^m and the new checkpoint θ_t (fp32 or fp64, on the
compute device) and writes back what `merge` returns. Methods that need whole-model
statistics declare `passes` > 0: the engine first streams every float tensor through
`observe` that many times (calling `end_pass` after each), then runs the merge pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict


class MethodSettings(BaseModel):
    """Base for method hyper-parameters: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StepContext:
    step: int  # 1-based index of the checkpoint being merged
    seed: int
    device: torch.device
    names: list[str]  # every tensor name of the model, in storage order
    previous_state: dict[str, Any] = field(default_factory=dict)  # method_state of the previous record


class MergeMethod(ABC):
    name: ClassVar[str]
    summary_line: ClassVar[str]  # one line for `--help`
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    passes: ClassVar[int] = 0

    def __init__(self, settings: MethodSettings, ctx: StepContext):
        self.settings = settings
        self.ctx = ctx

    def observe(self, pass_index: int, name: str, base: torch.Tensor, previous: torch.Tensor,
                new: torch.Tensor) -> None:
        """Accumulate whole-model statistics (only called when `passes` > 0)."""

    def end_pass(self, pass_index: int) -> None:
        """Called after every float tensor went through `observe` in this pass."""

    @abstractmethod
    def merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The new merged value of one float tensor."""

    def state(self) -> dict[str, Any]:
        """What the next step needs to continue (stored in the lineage record)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Figures about this step worth recording (counts, losses)."""
        return {}
