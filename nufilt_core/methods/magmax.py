"""MagMax-Ind, continual form: per entry keep whichever of τ_{≤t-1}/λ and τ_t is larger in
magnitude (ties go to the new one), θ_t^m = θ0 + λ · that."""

from __future__ import annotations

import torch
from pydantic import Field

from .base import MergeMethod, MethodSettings


class MagMaxSettings(MethodSettings):
    scale: float = Field(0.5, gt=0, description="λ")


class MagMax(MergeMethod[MagMaxSettings]):
    name = "magmax"
    summary_line = "per-entry maximum-magnitude task vector, scaled by λ"
    Settings = MagMaxSettings

    def merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        lam = self.settings.scale
        old = (previous - base) / lam  # the unscaled running maximum
        tau = new - base
        return base + lam * torch.where(tau.abs() >= old.abs(), tau, old)
