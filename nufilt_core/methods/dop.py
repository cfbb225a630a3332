"""DOP, Dual Orthogonal Projection (NeurIPS 2025), data-free continual merging, as FusionBench's
`dop/dop.yaml` runs it (tests/test_baselines.py checks it against a transcription of FusionBench's loop).

Steps ≥ 2, per Linear weight (`selection.is_linear_weight`), with targets i ∈ {m, n} (the previous
merged weight W_m and the new fine-tuned one W_n) and τ_i = W_i − W_0 = U diag(s) Vᵀ:
  r_i  = #{k : cumsum(s)_k / sum(s) < ε}  (sum of s, not s²; FusionBench's `searchsorted`);
  L_i(W) = ‖diag(s_r) U_rᵀ Δ_i‖²_F + ‖Δ_i V_r diag(s_r)‖²_F,  Δ_i = W − W_i  (`uv`; `u`/`v` keep one);
  W starts at ½(W_m + W_n); Adam(lr) for `iters` steps, a fresh optimiser per weight.
  MGDA: ĝ_i = ∇L_i / L_i; a = ⟨ĝ_m,ĝ_m⟩, b = ⟨ĝ_m,ĝ_n⟩, c = ⟨ĝ_n,ĝ_n⟩;
        γ = 0.999 if b ≥ a, 0.001 if b ≥ c, else (c − b)/(a + c − 2b)  (the two-point min-norm element);
  EMA:  α_0 = alpha, α_k = β α_{k−1} + (1 − β) γ_k; each Adam step descends α_k L_m + (1 − α_k) L_n.
  (mgda off: fixed α = alpha; ema off: α_k = γ_k.)
Every other float tensor becomes the pair mean ½(previous + new). Step 1: θ_1^m = θ_1.

Cost: with F = U_r diag(s_r) (so F Fᵀ = U_r diag(s_r²) U_rᵀ), ‖Fᵀ Δ‖² = ⟨Δ, F Fᵀ Δ⟩ and its
gradient is 2 F Fᵀ Δ: one product serves loss and gradient. Each side applies F Fᵀ either as the
d × d Gram matrix (one product) or through the factor (two), whichever is cheaper; the V side
likewise with Δ G, G = V_r diag(s_r²) V_rᵀ. Same gradients as autograd on L_i (tested).

Interpretations: a zero τ_i (a tensor one fine-tune left untouched) has no directions, r_i = 0,
L_i = 0; its normalised gradient is taken as 0 (FusionBench would divide by zero). Parameters held
directly by a non-leaf module (CLIP's class_embedding) stay at θ0 in FusionBench, an artefact of
walking leaf modules that a state dict cannot see: here they take the pair mean like the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from ..interrupts import check_for_stop
from ..selection import is_linear_weight
from .base import MergeMethod, MethodSettings, StepContext, UntouchedRule, every_tensor


class DopSettings(MethodSettings):
    iters: int = Field(200, ge=0, description="Adam steps per matrix (num_steps)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    mgda: bool = Field(True, description="weigh the two losses by their min-norm (MGDA) element each step")
    ema: bool = Field(True, description="smooth the MGDA weight with an exponential moving average")
    alpha: float = Field(0.8, ge=0, le=1, description="α_0: initial (or, without MGDA, fixed) stability weight")
    ema_beta: float = Field(0.999, ge=0, le=1, description="β of the moving average")
    svd_epsilon: float = Field(0.99999, ge=0, le=1, description="ε: keep singular values while cumsum(s)/sum(s) < ε")
    svd_proj_space: Literal["uv", "u", "v"] = Field("uv", description="which sides of τ_i the loss projects on")


def energy_rank(s: torch.Tensor, epsilon: float) -> int:
    """Leading singular values whose cumulative share of sum(s) stays strictly below ε."""
    total = s.sum()
    if not bool(total > 0):
        return 0
    return int(torch.searchsorted(s.cumsum(0) / total, torch.tensor([epsilon], dtype=s.dtype, device=s.device)))


@dataclass
class _Projection:
    """Applies the Gram matrix of one side of one target's loss: Δ ↦ F Fᵀ Δ (left) or Δ G (right)."""

    factor: torch.Tensor  # U_r diag(s_r) [d_out, r] or V_r diag(s_r) [d_in, r]
    gram: torch.Tensor | None  # F Fᵀ, when one d × d product is cheaper than two thin ones
    left: bool

    @classmethod
    def of(cls, factor: torch.Tensor, left: bool) -> _Projection:
        d, r = factor.shape
        return cls(factor, factor @ factor.T if d < 2 * r else None, left)

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        f, g = self.factor, self.gram
        if self.left:
            return g @ delta if g is not None else f @ (f.T @ delta)
        return delta @ g if g is not None else (delta @ f) @ f.T


class _Target:
    """L_i(W) and ∇L_i for one target weight W_i, from the SVD of its task vector τ_i."""

    def __init__(self, weight: torch.Tensor, tau: torch.Tensor, s: DopSettings):
        self.weight = weight
        u, sv, vh = torch.linalg.svd(tau, full_matrices=False)
        r = energy_rank(sv, s.svd_epsilon)
        self.rank = r
        self.sides = []
        if s.svd_proj_space in ("uv", "u"):
            self.sides.append(_Projection.of(u[:, :r] * sv[:r], left=True))
        if s.svd_proj_space in ("uv", "v"):
            self.sides.append(_Projection.of(vh[:r].T * sv[:r], left=False))

    def loss_and_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        delta = w - self.weight
        applied = self.sides[0].apply(delta)
        for side in self.sides[1:]:
            applied = applied + side.apply(delta)
        return float((delta * applied).sum()), 2 * applied


def min_norm_weight(gm: torch.Tensor, gn: torch.Tensor) -> float:
    """γ of the min-norm point γ ĝ_m + (1 − γ) ĝ_n (FusionBench's two-vector MinNormSolver)."""
    a, b, c = float((gm * gm).sum()), float((gm * gn).sum()), float((gn * gn).sum())
    if b >= a:
        return 0.999
    if b >= c:
        return 0.001
    return (c - b) / (a + c - 2 * b)


def dop_matrix(w0: torch.Tensor, w_prev: torch.Tensor, w_new: torch.Tensor,
               s: DopSettings) -> tuple[torch.Tensor, dict]:
    """DOP on one weight matrix: (merged weight, figures: ranks, losses before/after, final α)."""
    targets = [_Target(w_prev, w_prev - w0, s), _Target(w_new, w_new - w0, s)]
    w = ((w_prev + w_new) / 2).clone()
    before = [t.loss_and_grad(w)[0] for t in targets]
    alpha = s.alpha
    opt = torch.optim.Adam([w], lr=s.lr)
    for _ in range(s.iters):
        check_for_stop()
        (lm, gm), (ln, gn) = (t.loss_and_grad(w) for t in targets)
        if s.mgda:
            gamma = min_norm_weight(gm / lm if lm else torch.zeros_like(gm), gn / ln if ln else torch.zeros_like(gn))
            alpha = s.ema_beta * alpha + (1 - s.ema_beta) * gamma if s.ema else gamma
        w.grad = alpha * gm + (1 - alpha) * gn
        opt.step()
    w.grad = None
    after = [t.loss_and_grad(w)[0] for t in targets]
    return w.detach(), {"ranks": [t.rank for t in targets], "loss_before": before, "loss_after": after,
                        "alpha": alpha}


class Dop(MergeMethod[DopSettings]):
    name = "dop"
    summary_line = "Adam on two projected losses (previous, new) weighed by MGDA (DOP, FusionBench's dop.yaml)"
    Settings = DopSettings

    def __init__(self, settings: DopSettings, ctx: StepContext):
        super().__init__(settings, ctx)
        self.optimized = 0
        self.alphas: list[float] = []
        self.loss_before = [0.0, 0.0]
        self.loss_after = [0.0, 0.0]

    def merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if self.ctx.step == 1:
            return new
        if not is_linear_weight(name, tuple(base.shape)):
            return (previous + new) / 2
        merged, figures = dop_matrix(base, previous, new, self.settings)
        self.optimized += 1
        self.alphas.append(figures["alpha"])
        for i in range(2):
            self.loss_before[i] += figures["loss_before"][i]
            self.loss_after[i] += figures["loss_after"][i]
        return merged

    @classmethod
    def untouched(cls, settings: MethodSettings, step: int, names: Sequence[str]) -> UntouchedRule:
        return every_tensor("new" if step == 1 else None)  # merge returns `new` itself at step 1

    def summary(self) -> dict[str, Any]:
        return {"optimized_tensors": self.optimized,
                "mean_alpha": sum(self.alphas) / len(self.alphas) if self.alphas else None,
                "stability_loss_before": self.loss_before[0], "stability_loss_after": self.loss_after[0],
                "plasticity_loss_before": self.loss_before[1], "plasticity_loss_after": self.loss_after[1]}
