"""WUDI-Merging (Cheng et al. 2025), continual form: two task vectors per step, τ_{≤t-1} and τ_t.

Linear weights (`selection.is_linear_weight`) start at τ_m = τ_{≤t-1} + τ_t and take `iters` Adam
steps (lr, default betas, no weight decay, a fresh optimiser per matrix) on
  L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F,   i ∈ {≤t-1, t};
every other float tensor takes the pair mean (τ_{≤t-1} + τ_t) / 2. θ_t^m = θ0 + τ_m.

Cost: ‖X τᵀ‖²_F = tr(X G Xᵀ) with G = τᵀτ. The gradient is 2 Σ_i w_i (τ_m − τ_i) τ_iᵀ τ_i, i.e.
2 (τ_m G_w − C) with G_w = Σ w_i τ_iᵀτ_i and C = Σ w_i τ_i τ_iᵀ τ_i, both constant. G_w has rank
≤ min(d_in, n·d_out), so each Adam step applies it through the cheaper factor: G_w itself
(d_in × d_in) or the n stacked task vectors S, G_w = Sᵀ diag(w) S (n·d_out rows, for matrices
more than 2n times wider than tall). Same gradients as autograd on L (the published code), with
fewer and smaller products.

Step 1: only τ_1 exists, so θ_1^m = θ_1 (as the published code starts from the first model).
A zero task vector (a tensor a fine-tune left untouched) has no directions and ‖τ_i‖ = 0 would
divide by zero: it is left out of the loss (the published code would produce NaN there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from ..interrupts import check_for_stop
from ..selection import is_linear_weight
from .base import MergeMethod, MethodSettings, StepContext, UntouchedRule, every_tensor


class WudiSettings(MethodSettings):
    iters: int = Field(50, ge=0, description="Adam steps per matrix")
    lr: float = Field(1e-5, gt=0, description="Adam learning rate")


def interference_loss(merged: torch.Tensor, task_vectors: list[torch.Tensor], weights: list[float]) -> float:
    """Σ_i w_i ‖(τ_m − τ_i) τ_iᵀ‖²_F, through the Gram matrix on the smaller side."""
    total = 0.0
    for tau, w in zip(task_vectors, weights, strict=True):
        x = merged - tau
        if tau.shape[1] <= tau.shape[0]:
            total += w * float(((x @ (tau.T @ tau)) * x).sum())
        else:
            total += w * float((x @ tau.T).square().sum())
    return total


def wudi_matrix(task_vectors: list[torch.Tensor], iters: int, lr: float) -> tuple[torch.Tensor, float, float]:
    """WUDI on one weight matrix: (merged task vector, loss before, loss after)."""
    start = torch.stack(task_vectors).sum(dim=0)
    active = [tau for tau in task_vectors if bool(tau.any())]
    if not active:
        return start, 0.0, 0.0
    weights = [1.0 / float(tau.square().sum()) for tau in active]
    loss_before = interference_loss(start, active, weights)
    if iters == 0 or loss_before == 0.0:
        return start, loss_before, loss_before
    # gradient 2 (τ_m G − C), G = Σ w_i τ_iᵀτ_i: τ_m G costs d_out·d_in² multiply-adds through G,
    # 2·n·d_out²·d_in through the stacked task vectors S (G = Sᵀ diag(w) S); take the cheaper
    d_out, d_in = start.shape
    const = sum(w * ((tau @ tau.T) @ tau if d_out < d_in else tau @ (tau.T @ tau))
                for w, tau in zip(weights, active, strict=True))
    if d_in <= 2 * len(active) * d_out:
        gram = sum(w * (tau.T @ tau) for w, tau in zip(weights, active, strict=True))

        def gradient(m: torch.Tensor) -> torch.Tensor:
            return 2 * (m @ gram - const)
    else:
        stacked = torch.cat(active)
        weighted = torch.cat([w * tau for w, tau in zip(weights, active, strict=True)])

        def gradient(m: torch.Tensor) -> torch.Tensor:
            return 2 * ((m @ stacked.T) @ weighted - const)

    merged = start.clone()
    opt = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    for _ in range(iters):
        check_for_stop()
        merged.grad = gradient(merged)
        opt.step()
    return merged, loss_before, interference_loss(merged, active, weights)


class Wudi(MergeMethod[WudiSettings]):
    name = "wudi"
    summary_line = "Adam on the data-free interference loss of [merged, new] task vectors (WUDI)"
    Settings = WudiSettings

    def __init__(self, settings: WudiSettings, ctx: StepContext):
        super().__init__(settings, ctx)
        self.optimized = 0
        self.loss_before = 0.0
        self.loss_after = 0.0

    def merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if self.ctx.step == 1:
            return new
        tau_prev, tau_new = previous - base, new - base
        if not is_linear_weight(name, tuple(base.shape)):
            return base + (tau_prev + tau_new) / 2
        merged, before, after = wudi_matrix([tau_prev, tau_new], self.settings.iters, self.settings.lr)
        self.optimized += 1
        self.loss_before += before
        self.loss_after += after
        return base + merged

    @classmethod
    def untouched(cls, settings: MethodSettings, step: int, names: Sequence[str]) -> UntouchedRule:
        return every_tensor("new" if step == 1 else None)  # merge returns `new` itself at step 1

    def summary(self) -> dict[str, Any]:
        return {"optimized_tensors": self.optimized, "loss_before": self.loss_before, "loss_after": self.loss_after}
