"""Task arithmetic, continual form: θ_t^m = θ_{t-1}^m + λ τ_t (θ_0^m = θ0), every parameter."""

from __future__ import annotations

import torch
from pydantic import Field

from .base import MergeMethod, MethodSettings


class ScaleSettings(MethodSettings):
    scale: float = Field(0.3, description="λ (0.3 for 8 tasks, 0.1 for 14 or 20 in the paper)")


class TaskArithmetic(MergeMethod[ScaleSettings]):
    name = "task_arithmetic"
    summary_line = "add λ × each task vector"
    Settings = ScaleSettings

    def merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return previous + self.settings.scale * (new - base)
