"""Weight averaging, continual form: θ_t^m = ((t−1) θ_{t-1}^m + θ_t) / t, every parameter."""

from __future__ import annotations

import torch

from .base import MergeMethod, MethodSettings


class WeightAverage(MergeMethod[MethodSettings]):
    name = "weight_average"
    summary_line = "running mean of all fine-tuned models"

    def merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        t = self.ctx.step
        return previous * ((t - 1) / t) + new / t
