"""TIES-Merging, continual form: θ_t^m = θ_{t-1}^m + λ · TIES([τ_{≤t-1}, τ_t]), every float parameter.

TIES of the two task vectors, as the TIES code does on the flattened model:
  trim   each task vector keeps the entries with |τ| ≥ its own threshold, the
         (d − ⌊d·topk⌋)-th smallest |value| over the *whole* model (d values), i.e. the top
         ⌊d·topk⌋ + 1 (the code's `kthvalue` rank, kept as is), ties at the threshold included;
  elect  per entry σ = sign(sum of the trimmed values); where that sum is 0, σ is the global
         majority sign(Σ_entries σ) (0 if that is 0 too, as the code);
  merge  per entry the mean (or sum) of the trimmed values whose sign agrees with σ.

Streaming: the thresholds come from an exact two-pass radix select (`KthMagnitude`), the
global majority sign from a third pass; the merge pass then recomputes everything per tensor,
in flat pieces of at most `CHUNK` values so that the elementwise temporaries stay small.

Step 1 (τ_{≤0} = 0): `first_step="formula"` applies the same formula, so θ_1^m = θ0 + λ·trim(τ_1)
(TIES of a single task vector is its trim). `first_step="published_code"` does what the NUFILT
repository's continual TIES script does: θ_1^m = θ0 + λ τ_1, untrimmed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from ..kth_magnitude import KthMagnitude, flat_chunks
from .base import MergeMethod, StepContext
from .task_arithmetic import ScaleSettings


class TiesSettings(ScaleSettings):
    topk: float = Field(0.2, gt=0, le=1, description="fraction of each task vector kept by magnitude (20 %)")
    merge_func: Literal["mean", "sum"] = Field(
        "mean", description="disjoint mean (TIES paper, algorithms.md) or sum (the NUFILT repository's script)")
    first_step: Literal["formula", "published_code"] = Field(
        "formula", description="formula: θ_1^m = θ0 + λ·trim(τ_1); published_code: θ0 + λ τ_1")


def elect_and_merge(trimmed: list[torch.Tensor], majority: float, merge_func: str) -> torch.Tensor:
    """TIES' sign election and disjoint merge of already-trimmed task vectors (same shape)."""
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(dim=0))
    sign = torch.where(sign == 0, torch.full_like(sign, majority), sign)
    agrees = torch.where(sign > 0, stacked > 0, stacked < 0)
    selected = stacked * agrees
    total = selected.sum(dim=0)
    if merge_func == "sum":
        return total
    return total / (selected != 0).sum(dim=0).clamp(min=1)


class Ties(MergeMethod[TiesSettings]):
    name = "ties"
    summary_line = "trim, elect sign, disjoint mean of [merged, new] task vectors, added × λ"
    Settings = TiesSettings
    passes = 3  # 0, 1: radix select of both thresholds; 2: global majority sign

    def __init__(self, settings: TiesSettings, ctx: StepContext):
        super().__init__(settings, ctx)
        self.selectors = (KthMagnitude(), KthMagnitude())  # τ_{≤t-1}, τ_t
        self.sign_balance = 0  # Σ sign(trimmed sum) over all entries
        self.kept = [0, 0]
        self.plain_first_step = ctx.step == 1 and settings.first_step == "published_code"

    def trimmed(self, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> list[torch.Tensor]:
        return [tau * sel.keep(tau) for sel, tau in zip(self.selectors, (previous - base, new - base), strict=True)]

    def observe(self, pass_index: int, name: str, base: torch.Tensor, previous: torch.Tensor,
                new: torch.Tensor) -> None:
        if self.plain_first_step:
            return
        if pass_index < 2:
            for sel, tau in zip(self.selectors, (previous - base, new - base), strict=True):
                (sel.count_high if pass_index == 0 else sel.count_low)(tau)
            return
        for b, p, n in zip(*map(flat_chunks, (base, previous, new)), strict=True):
            summed = torch.zeros_like(b)
            for i, (sel, tau) in enumerate(zip(self.selectors, (p - b, n - b), strict=True)):
                mask = sel.keep(tau)
                summed += tau * mask
                self.kept[i] += int(mask.sum())
            self.sign_balance += int((summed > 0).sum()) - int((summed < 0).sum())

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0 and not self.plain_first_step:
            topk = self.settings.topk
            for sel in self.selectors:
                sel.choose(sel.numel - int(sel.numel * topk))  # the k of the TIES code's kthvalue

    @property
    def majority(self) -> float:
        return float((self.sign_balance > 0) - (self.sign_balance < 0))

    def merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        lam = self.settings.scale
        if self.plain_first_step:
            return previous + lam * (new - base)
        merge_func = self.settings.merge_func
        out = base.new_empty(base.numel())
        for o, b, p, n in zip(flat_chunks(out), *map(flat_chunks, (base, previous, new)), strict=True):
            o.copy_(p + lam * elect_and_merge(self.trimmed(b, p, n), self.majority, merge_func))
        return out.view(base.shape)

    def summary(self) -> dict[str, Any]:
        if self.plain_first_step:
            return {"trimmed": False}
        n = max(self.selectors[0].numel, 1)
        return {
            "thresholds": [sel.threshold for sel in self.selectors],
            "kept_fraction": [k / n for k in self.kept],
            "majority_sign": self.majority,
        }
