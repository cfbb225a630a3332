"""OPCM (Tang et al. 2025), continual orthogonal-projection merging with adaptive scaling.

Per Linear weight (`selection.is_linear_weight`), with U S Vᵀ = SVD(τ_{≤t-1}):
  split = first index where cumsum(S)/sum(S) > α (0 if none), as the published code;
  C = Uᵀ τ_t V; zero C's diagonal and its top-left split×split block; cleaned τ_t = U C Vᵀ.
Only the top-left min(d_out, d_in) block of C is touched, so with the thin SVD (U_r, V_r):
  cleaned τ_t = τ_t − U_r (Mask ∘ U_rᵀ τ_t V_r) V_rᵀ,
which is the full-SVD result without building the d_out × d_out and d_in × d_in bases. The
diagonal really is zeroed (the old `.diag().fill_(0)` no-op on a copy is not reproduced).
Every other float tensor uses cleaned τ_t = τ_t. Then, over the whole model,
  u = λ_{t-1} τ_{≤t-1} + cleaned τ_t,   λ_t = ‖u‖ / mean_{i≤t} ‖τ_i‖,   θ_t^m = θ0 + u / λ_t,
so the stored merged task vector always has the mean task-vector norm. τ_{≤t-1} is the stored
(already rescaled) previous merged task vector. The statistics pass computes ‖u‖ and ‖τ_t‖; the
merge pass recomputes u per tensor (one more SVD each) instead of holding the model.

Step 1: θ_1^m = θ_1, λ_1 = 1 (the pass only records ‖τ_1‖).
Continual state (lineage record): {"lambda": λ_t, "task_vector_norms": [‖τ_1‖, …, ‖τ_t‖]}.

Interpretation: only directions with a numerically non-zero singular value (the tolerance of
`torch.linalg.matrix_rank`) are projected. For a full-rank τ_{≤t-1} this is exactly the
published rule; for a rank-deficient one the published code zeroes the diagonal in an arbitrary
basis of the null space (for τ_{≤t-1} = 0 it zeroes the diagonal of τ_t itself, via SVD(0) = I),
which carries no information about earlier tasks and is not reproducible across devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean
from typing import Any

import torch
from pydantic import Field

from ..errors import LineageError
from ..selection import is_linear_weight
from .base import MergeMethod, MethodSettings, StepContext, UntouchedRule, every_tensor


class OpcmSettings(MethodSettings):
    alpha: float = Field(0.5, ge=0, le=1, description="α: split rank = first k with cumsum(S)/sum(S) > α")


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """The published rule: first index where cumsum(S)/sum(S) > α, 0 where none is."""
    above = torch.nonzero(s.cumsum(0) / s.sum() > alpha)
    return int(above[0, 0]) if above.numel() else 0


def orthogonal_clean(tau_prev: torch.Tensor, tau_new: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ_t with its components on τ_{≤t-1}'s singular pairs removed (diagonal + top split×split block)."""
    if tau_prev.numel() == 0:
        return tau_new
    u, s, vh = torch.linalg.svd(tau_prev, full_matrices=False)
    tol = s.max() * max(tau_prev.shape) * torch.finfo(s.dtype).eps  # as torch.linalg.matrix_rank
    rank = int((s > tol).sum())
    if rank == 0:  # no earlier directions at all: nothing to project out
        return tau_new
    split = min(split_rank(s, alpha), rank)
    u, vh = u[:, :rank], vh[:rank]
    mask = torch.eye(rank, dtype=torch.bool, device=s.device)
    mask[:split, :split] = True
    coords = (u.T @ tau_new) @ vh.T  # [rank, rank]: τ_t in the previous singular bases
    return tau_new - (u @ (coords * mask)) @ vh


class Opcm(MergeMethod[OpcmSettings]):
    name = "opcm"
    summary_line = "orthogonal projection onto earlier singular directions + norm rescaling (OPCM)"
    Settings = OpcmSettings
    passes = 1

    def __init__(self, settings: OpcmSettings, ctx: StepContext):
        super().__init__(settings, ctx)
        self.norms: list[float] = []
        self.previous_lambda = 1.0
        if ctx.step > 1:
            state = ctx.previous_state
            norms = state.get("task_vector_norms")
            if not isinstance(state.get("lambda"), int | float) or not isinstance(norms, list) \
                    or len(norms) != ctx.step - 1:
                raise LineageError(
                    f"the previous merged model's lineage record lacks a valid OPCM state for step {ctx.step} "
                    f"(expected 'lambda' and {ctx.step - 1} 'task_vector_norms', got {state!r})")
            self.previous_lambda = float(state["lambda"])
            self.norms = [float(n) for n in norms]
        self.new_sq = 0.0  # ‖τ_t‖²
        self.merged_sq = 0.0  # ‖λ_{t-1} τ_{≤t-1} + cleaned τ_t‖²
        self.lambda_t = 1.0
        self.projected = 0

    def unscaled(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        tau_prev, tau_new = previous - base, new - base
        if is_linear_weight(name, tuple(base.shape)):
            tau_new = orthogonal_clean(tau_prev, tau_new, self.settings.alpha)
        return self.previous_lambda * tau_prev + tau_new

    def observe(self, pass_index: int, name: str, base: torch.Tensor, previous: torch.Tensor,
                new: torch.Tensor) -> None:
        self.new_sq += float((new - base).double().square().sum())
        if self.ctx.step > 1:
            self.merged_sq += float(self.unscaled(name, base, previous, new).double().square().sum())

    def end_pass(self, pass_index: int) -> None:
        self.norms.append(math.sqrt(self.new_sq))
        if self.ctx.step > 1 and self.merged_sq > 0:
            self.lambda_t = math.sqrt(self.merged_sq) / fmean(self.norms)
        # else: step 1 (λ_1 = 1), or u = 0 everywhere (θ_t^m = θ0 whatever λ_t is)

    def merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if self.ctx.step == 1:
            return new
        if is_linear_weight(name, tuple(base.shape)):
            self.projected += 1
        return base + self.unscaled(name, base, previous, new) / self.lambda_t

    def state(self) -> dict[str, Any]:
        return {"lambda": self.lambda_t, "task_vector_norms": self.norms}

    @classmethod
    def untouched(cls, settings: MethodSettings, step: int, names: Sequence[str]) -> UntouchedRule:
        return every_tensor("new" if step == 1 else None)  # merge returns `new` itself at step 1

    def summary(self) -> dict[str, Any]:
        return {"lambda": self.lambda_t, "mean_task_vector_norm": fmean(self.norms) if self.norms else 0.0,
                "projected_tensors": self.projected}
