"""NUFILT: null-space filtering + a data-free LoRA adapter, fused back (arXiv 2509.21413, Alg. 1).

For each selected weight W [d_out, d_in]:
  V̂p = top-r_p right singular vectors of τ_{≤t-1} = W^m_{t-1} − W_0   (non-zero ones only)
  V̂t = top-r_v right singular vectors of τ_t = W_t − W_0
  P  = I − V̂p V̂pᵀ, never materialised: τ P = τ − (τ V̂p) V̂pᵀ
  A [r_l, d_in] = 0.02·randn (seeded per tensor and step), B [d_in, r_l] = 0
  L(A, B) = ‖𝒯 − (M + τ_t B A) V̂‖²_F,  V̂ = [V̂t, V̂p], 𝒯 = [τ_t V̂t, τ_{≤t-1} V̂p], M = τ_{≤t-1} + τ_t P
  Adam(lr) for `iters` steps, then W^m_t = W^m_{t-1} + τ_t (P + B A).

Speed-ups that keep the numbers (the gradients are the loss's, in exact arithmetic):
  * 𝒯 − M V̂ =: C is constant, so it is computed once;
  * with X = A V̂ the loss is ‖C − τ_t B X‖², whose gradients are written out by hand
    (no autograd): ∂B = 2 τ_tᵀ(τ_t B X − C) Xᵀ, ∂X = 2 (τ_t B)ᵀ(τ_t B X − C);
  * when d_in < 2 d_out they go through G = τ_tᵀτ_t and H = τ_tᵀC, formed once:
    ∂B = 2 (G B)(X Xᵀ) − 2 H Xᵀ, ∂X = 2 Bᵀ(G B) X − 2 Bᵀ H — one d_in × d_in × r_l product per
    Adam step instead of two d_out × d_in × r_l ones. G (in fp64) also yields V̂t (linalg.py).

Beyond the paper: the profiles (profiles.py) add two post-steps on each filtered matrix, rescaling
with a trust radius (trust_radius.py) and a flat spectrum where it shrank (flat_spectrum.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..interrupts import check_for_stop
from ..linalg import (
    adapter_seed,
    gram64,
    low_rank_right_singular_vectors,
    seeded_normal,
    top_right_singular_vectors,
)
from ..selection import Selection
from . import retired_settings
from .base import LowRank, MergeMethod, MethodSettings, ScoredRule, Source, StepContext, UntouchedRule, every_tensor
from .flat_spectrum import flatten_spectrum, rounding_floor
from .profiles import DEFAULT_PROFILE, PROFILES, Profile
from .trust_radius import TrustRadius

Policy = Literal["keep_base", "keep_previous", "average"]
Preset = Literal["auto", "all-linear", "clip", "vit", "bert", "t5", "llama"]  # selection.PRESETS and two rules


class NufiltSettings(MethodSettings):
    profile: Profile = Field(DEFAULT_PROFILE, description="named settings (profiles.py): plus-iso (the default), "
                             "plus, or paper (the paper's NUFILT); explicit settings override the profile's")
    null_rank: int = Field(128, ge=0, description="r_p: directions of earlier tasks filtered out")
    lora_rank: int = Field(64, ge=0, description="r_l: adapter rank (0 = null-space filter only)")
    task_rank: int = Field(8, ge=0, description="r_v: directions of the new task kept in the loss")
    iters: int = Field(50, ge=0, description="Adam steps per matrix")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    lambda_new: float = Field(1.0, ge=0, description="λ1: weight of the new-task (plasticity) block")
    lambda_old: float = Field(1.0, ge=0, description="λ2: weight of the earlier-task (stability) block")
    null_space: bool = Field(True, description="apply the filter P (False: P = I, adapter only)")
    include: tuple[str, ...] = Field((), description="regexes of tensors to filter (re.search)")
    preset: Preset = Field("auto", description="which tensors are filtered: auto (detected from the names), "
                           "all-linear, or an architecture's")
    policy: Policy = Field("keep_base", description="what the other float tensors become: θ0 (keep_base), the "
                           "first fine-tune's then frozen (keep_previous), or the running mean of the fine-tunes")
    first_step: Literal["paper", "published_code"] = Field(
        "paper", description="paper: θ_1^m = θ_1 (zero directions never filtered); published_code: filter the "
        "first r_p input coordinates at step 1, as the authors' code does through the SVD of a zero matrix")
    trust_radius: float | None = Field(None, ge=0, description="κ: rescale each filtered matrix's merged task "
                                       "vector to max(mean_i ‖τ_i‖, κ‖W0‖) when larger (trust_radius.py); None: "
                                       "fused at full size, as the paper does")
    flat_spectrum: bool = Field(False, description="flatten the spectrum of the merged task vectors the "
                                "rescaling shrank, their norm kept (flat_spectrum.py; needs trust_radius)")
    two_sided_filter: bool = Field(False, description="remove only τ_t's part on the earlier tasks' singular "
                                   "pairs, U_p U_pᵀ τ_t V̂p V̂pᵀ (as OPCM's projection), not every row's part along "
                                   "V̂p; needs lora_rank 0 (plus-iso's rule for adapter arrivals; on dense arrivals "
                                   "it did not lead on the dev split)")
    adapter_arrivals: Literal["as-full", "two-sided"] = Field(
        "as-full", description="how a matrix that arrives as a PEFT LoRA adapter's factors is merged: as a full "
        "fine-tune's, or two-sided: only its part on the earlier tasks' singular pairs removed, no data-free "
        "adapter, rescaled to the task vectors' mean norm (trust radius 0), no flat spectrum (plus-iso's; needs "
        "trust_radius)")

    added_since_records: ClassVar[dict[str, Any]] = {"adapter_arrivals": "as-full"}

    @field_validator("include")
    @classmethod
    def _valid_patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        # checked with the settings, before any tensor is read or hashed
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a valid regular expression: {e}") from None
        return patterns

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = retired_settings.translate(data)
            profile = data.get("profile", DEFAULT_PROFILE)
            if profile in PROFILES:
                return {**PROFILES[profile], **data}
        return data

    @model_validator(mode="after")
    def _two_sided_without_adapter(self) -> NufiltSettings:
        # the adapter's loss (Eq. 16-17) is written for the one-sided filter P
        if self.two_sided_filter and self.lora_rank:
            raise ValueError("two_sided_filter needs lora_rank 0 (the adapter's loss is defined for the one-sided "
                             "filter)")
        return self

    @model_validator(mode="after")
    def _flat_needs_a_radius(self) -> NufiltSettings:
        # the flat spectrum applies where the rescaling shrank a matrix: without rescaling it never would
        if self.flat_spectrum and self.trust_radius is None:
            raise ValueError("flat_spectrum needs trust_radius (it flattens the matrices the rescaling shrank)")
        # a lineage rescales from its first step or never (trust_radius.py): adapter arrivals cannot start it
        if self.adapter_arrivals == "two-sided" and self.trust_radius is None:
            raise ValueError("adapter_arrivals = 'two-sided' needs trust_radius (it rescales adapter arrivals)")
        return self

    def for_adapter_arrivals(self) -> NufiltSettings:
        """The settings a matrix that arrives as a LoRA adapter's factors is merged with."""
        if self.adapter_arrivals == "as-full":
            return self
        return self.model_copy(update={"lora_rank": 0, "two_sided_filter": True, "trust_radius": 0.0,
                                       "flat_spectrum": False})


@dataclass
class MatrixResult:
    update: torch.Tensor  # τ_t (P + B A), to be added to the previous merged weight
    v_prev: torch.Tensor  # V̂p [d_in, k_p]
    v_new: torch.Tensor  # V̂t [d_in, k_t]
    a: torch.Tensor  # [r_l, d_in]
    b: torch.Tensor  # [d_in, r_l]
    loss_before: float
    loss_after: float


# A starts as ADAPTER_INIT_SCALE·N(0, 1) and B at 0 (the published FilterLoRA's init): B A = 0 at the
# start, so the first Adam step moves B only, and the fused update begins as the filter alone.
ADAPTER_INIT_SCALE = 0.02


def adapter_init(lora_rank: int, d_in: int, seed: int, name: str, step: int) -> torch.Tensor | None:
    """A's start [r_l, d_in]: ADAPTER_INIT_SCALE·N(0, 1), seeded per (seed, tensor, step), fp32 on the CPU;
    None if r_l = 0."""
    if lora_rank <= 0:
        return None
    return seeded_normal((lora_rank, d_in), adapter_seed(seed, name, step)) * ADAPTER_INIT_SCALE


def paper_loss(tau_prev: torch.Tensor, tau_new: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               v_prev: torch.Tensor, v_new: torch.Tensor, s: NufiltSettings) -> torch.Tensor:
    """The paper's objective in its plain form, every matrix formed in full: the reference that
    `nufilt_matrix`'s fast path is tested against (tests, bench/speed). Differentiable in A and B.

      P = I − V̂p V̂pᵀ                                  (Eq. 8; P = I when null_space is off)
      M = τ_{≤t-1} + τ_t P,  𝒯 = [τ_t V̂t, τ_{≤t-1} V̂p],  V̂ = [V̂t, V̂p]     (Eq. 17)
      R = 𝒯 − (M + τ_t B A) V̂,  L = λ1 ‖R[:, :r_v]‖² + λ2 ‖R[:, r_v:]‖²     (Eq. 16, blocks weighted)
    """
    d_in = tau_new.shape[1]
    p = torch.eye(d_in, dtype=tau_new.dtype, device=tau_new.device)
    if s.null_space:
        p = p - v_prev @ v_prev.T
    m = tau_prev + tau_new @ p
    v_hat = torch.cat([v_new, v_prev], dim=1)
    target = torch.cat([tau_new @ v_new, tau_prev @ v_prev], dim=1)
    r = target - (m + tau_new @ b @ a) @ v_hat
    k = v_new.shape[1]
    return s.lambda_new * r[:, :k].square().sum() + s.lambda_old * r[:, k:].square().sum()


def earlier_task_directions(tau_prev: torch.Tensor, s: NufiltSettings) -> torch.Tensor:
    """V̂_{≤t-1} [d_in, k_p]: the top right singular directions of τ̃_{≤t-1} (Eq. 7), none for zero ones."""
    d_out, d_in = tau_prev.shape
    if s.first_step == "published_code" and not bool(tau_prev.any()):
        # the authors' code: SVD(0) returns V = I, so the first r_p input coordinates are "earlier directions"
        return torch.eye(d_in, dtype=tau_prev.dtype, device=tau_prev.device)[:, : min(s.null_rank, d_out, d_in)]
    if s.null_rank <= 0 or not bool(tau_prev.any()):
        return tau_prev.new_zeros((d_in, 0))
    gram = gram64(tau_prev) if tau_prev.dtype != torch.float64 else None  # fp64 keeps the SVD
    return top_right_singular_vectors(tau_prev, s.null_rank, gram=gram)


def new_task_directions(tau_new: torch.Tensor, s: NufiltSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """V̂t [d_in, k_t], and τ_tᵀτ_t in fp64 when it is the Gram matrix they came from (d_in ≤ d_out), which
    the Adam loop reuses."""
    d_out, d_in = tau_new.shape
    shared = d_in <= d_out  # the smaller side's Gram matrix is then G = τ_tᵀτ_t
    wanted = shared or (s.task_rank > 0 and bool(tau_new.any()))
    gram = gram64(tau_new) if wanted and tau_new.dtype != torch.float64 else None
    v_new = top_right_singular_vectors(tau_new, s.task_rank, gram=gram)
    return v_new, gram if shared else None


# torch.optim.Adam's defaults, which the published code uses
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def adam_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], moments: Sequence[torch.Tensor],
              squares: Sequence[torch.Tensor], step: int, lr: float) -> None:
    """One step of torch.optim.Adam (default settings), op for op as its single-tensor path, in place.

    Written out because the optimiser's first construction imports torch's compiler stack (≈ 1.5 s of a
    ≈ 20 s ViT-B/32 step in a fresh process) and its per-step bookkeeping costs as much as the update.
    tests/test_linalg_fast_paths.py checks it against torch.optim.Adam."""
    beta1, beta2 = ADAM_BETAS
    step_size = lr / (1 - beta1 ** float(step))
    bias_correction2_sqrt = (1 - beta2 ** float(step)) ** 0.5
    for p, g, m, v in zip(params, grads, moments, squares, strict=True):
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS), value=-step_size)


def fit_adapter(tau_new: torch.Tensor, residual: torch.Tensor, v_weighted: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, s: NufiltSettings, gram64_new: torch.Tensor | None,
                factors: LowRank | None = None) -> None:
    """Adam on L(A, B) = ‖C − τ_t B A V̂‖² (columns weighted), in place on a and b, hand-written gradients.
    With τ_t's factors (τ_t = L R, rank r), G B = Rᵀ((LᵀL)(R B)) costs O(d_in r r_l) instead of O(d_in² r_l)."""
    d_out, d_in = tau_new.shape
    moments, squares = [torch.zeros_like(a), torch.zeros_like(b)], [torch.zeros_like(a), torch.zeros_like(b)]
    # G costs d_in² per Adam step, the direct form 2·d_out·d_in, the factored one 2·d_in·r
    use_gram = factors is not None or d_in < 2 * d_out
    if factors is not None:
        left, right = factors
        core = left.T @ left  # [r, r]

        def gram_times(x: torch.Tensor) -> torch.Tensor:
            return right.T @ (core @ (right @ x))

        h = right.T @ (left.T @ residual)  # [d_in, k]
    elif use_gram:
        g = gram64_new.to(tau_new.dtype) if gram64_new is not None else tau_new.T @ tau_new

        def gram_times(x: torch.Tensor) -> torch.Tensor:
            return g @ x

        h = tau_new.T @ residual
    for step in range(1, s.iters + 1):
        check_for_stop()
        x = a @ v_weighted  # [r_l, k]
        if use_gram:
            gb = gram_times(b)  # the one large product of the step
            grad_b = 2 * (gb @ (x @ x.T) - h @ x.T)
            grad_x = 2 * ((b.T @ gb) @ x - b.T @ h)
        else:
            y = tau_new @ b
            err = y @ x - residual  # τ_t B X − C
            grad_b = 2 * (tau_new.T @ (err @ x.T))
            grad_x = 2 * (y.T @ err)
        adam_step((a, b), (grad_x @ v_weighted.T, grad_b), moments, squares, step, s.lr)


def nufilt_matrix(tau_prev: torch.Tensor, tau_new: torch.Tensor, a_init: torch.Tensor | None,
                  s: NufiltSettings, factors: LowRank | None = None) -> MatrixResult:
    """One NUFILT step on one weight matrix (all inputs on one device, fp32 or fp64). `factors`: τ_t = L R of
    rank r (a LoRA arrival), so that V̂t, τ_t V̂ and the Adam loop's products cost what the rank does."""
    d_in = tau_new.shape[1]
    v_prev = earlier_task_directions(tau_prev, s)
    if factors is not None:
        v_new, gram = low_rank_right_singular_vectors(*factors, s.task_rank), None
    else:
        v_new, gram = new_task_directions(tau_new, s)
    v_hat = torch.cat([v_new, v_prev], dim=1)  # V̂ (Eq. 17)
    k_t = v_new.shape[1]
    # each product once: 𝒯, M V̂ and P use their blocks
    tau_vhat = tau_new @ v_hat if factors is None else factors[0] @ (factors[1] @ v_hat)
    prev_vhat = tau_prev @ v_hat
    v_filter = v_prev if s.null_space else v_prev[:, :0]  # ablation "adapter only": P = I
    tau_vf = tau_vhat[:, k_t : k_t + v_filter.shape[1]]  # τ_t V̂p
    if s.two_sided_filter:  # only the part on the earlier singular pairs: U_p = τ_{≤t-1} V̂p / σ_p
        prev_vf = prev_vhat[:, k_t : k_t + v_filter.shape[1]]
        u_prev = prev_vf / prev_vf.norm(dim=0)
        filtered = tau_new - u_prev @ (u_prev.T @ tau_vf) @ v_filter.T
    else:
        filtered = tau_new - tau_vf @ v_filter.T  # τ_t P, P = I − V̂p V̂pᵀ (Eq. 8) never formed

    # 𝒯 − M V̂ (Eq. 16–17) with M V̂ = τ_{≤t-1} V̂ + τ_t V̂ − (τ_t V̂p)(V̂pᵀ V̂); with the filter on, its V̂p
    # block is 0 in exact arithmetic (P V̂p = 0): the adapter is only penalised there
    target = torch.cat([tau_vhat[:, :k_t], prev_vhat[:, k_t:]], dim=1)
    residual = target - (prev_vhat + tau_vhat - tau_vf @ (v_filter.T @ v_hat))
    # λ1, λ2 weigh the blocks' squared norms: scaling the columns of R (and of V̂) by √λ does exactly
    # that, ‖R diag(√λ)‖² = λ1 ‖R_t‖² + λ2 ‖R_p‖², so the loop below needs no weights of its own
    weights = torch.cat([residual.new_full((v_new.shape[1],), s.lambda_new),
                         residual.new_full((v_prev.shape[1],), s.lambda_old)]).sqrt()
    residual = residual * weights
    v_weighted = v_hat * weights

    r_l = 0 if a_init is None else a_init.shape[0]
    a = a_init if a_init is not None else tau_new.new_zeros((0, d_in))
    b = tau_new.new_zeros((d_in, r_l))
    loss_before = float(residual.square().sum())
    if r_l == 0 or s.iters == 0 or loss_before == 0.0 or v_hat.shape[1] == 0:
        return MatrixResult(filtered, v_prev, v_new, a, b, loss_before, loss_before)

    a, b = a.clone(), b.clone()
    with torch.no_grad():
        fit_adapter(tau_new, residual, v_weighted, a, b, s, gram, factors)
        tau_b = tau_new @ b if factors is None else factors[0] @ (factors[1] @ b)
        loss_after = float((residual - tau_b @ (a @ v_weighted)).square().sum())
        update = filtered + tau_b @ a  # τ_t (P + B A) (Eq. 9–10)
    return MatrixResult(update, v_prev, v_new, a, b, loss_before, loss_after)


class Nufilt(MergeMethod[NufiltSettings]):
    name = "nufilt"
    summary_line = "null-space filter + data-free LoRA adapter, fused (profiles: plus-iso, plus, paper)"
    Settings = NufiltSettings
    low_rank_aware = True
    parallel_safe = True  # per-matrix state only, kept by name

    def __init__(self, settings: NufiltSettings, ctx: StepContext):
        super().__init__(settings, ctx)
        self.selection = self.selection_of(settings, ctx.names)
        self.results: dict[str, tuple[float, float, int]] = {}  # per filtered matrix: adapter losses, dim of V̂p
        self._subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # V̂p, V̂t until `subspaces` takes them
        self.rescaling = (TrustRadius(settings.trust_radius, ctx.step, ctx.previous_state)
                          if settings.trust_radius is not None else None)
        self.adapter_rule = settings.for_adapter_arrivals()

    def is_filtered(self, name: str, shape: tuple[int, ...]) -> bool:
        return self.selection.is_filtered(name, shape)

    def heavy(self, name: str, shape: tuple[int, ...]) -> bool:
        return self.is_filtered(name, shape)  # the rest follows the policy: element-wise

    def _update(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor,
                factors: LowRank | None, rule: NufiltSettings) -> MatrixResult:
        a_init = adapter_init(rule.lora_rank, base.shape[1], self.ctx.seed, name, self.ctx.step)
        if a_init is not None:
            a_init = a_init.to(device=base.device, dtype=base.dtype)
        result = nufilt_matrix(previous - base, new - base, a_init, rule, factors)
        self.results[name] = (result.loss_before, result.loss_after, result.v_prev.shape[1])
        self._subspaces[name] = (result.v_prev, result.v_new)
        return result

    def merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return self._merge(name, base, previous, new, None)

    def merge_low_rank(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor,
                       factors: LowRank) -> torch.Tensor:
        return self._merge(name, base, previous, new, factors)

    def _merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor,
               factors: LowRank | None) -> torch.Tensor:
        if not self.is_filtered(name, tuple(base.shape)):
            return self._policy(base, previous, new)
        rule = self.settings if factors is None else self.adapter_rule
        update = self._update(name, base, previous, new, factors, rule).update
        if self.rescaling is None or rule.trust_radius is None:
            return previous + update  # the paper: fused at full size
        merged = self.rescaling.apply(name, base, previous, new, update, rule.trust_radius)
        if not rule.flat_spectrum or self.ctx.step == 1 or not self.rescaling.shrank(name):
            return merged  # nothing was shrunk: the merged task vector keeps every task at full size
        return base + flatten_spectrum(merged - base, self._floor(name, base))

    def _floor(self, name: str, base: torch.Tensor) -> float:
        """The singular value below which a difference of the step's models is rounding noise (flat_spectrum.py)."""
        return rounding_floor(base, self.ctx.eps.get(name, torch.finfo(base.dtype).eps))

    def _policy(self, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        t = self.ctx.step
        kept = self.policy_source(self.settings, t)
        if kept is not None:
            return {"base": base, "previous": previous, "new": new}[kept]
        return previous * ((t - 1) / t) + new / t  # average: running mean of the fine-tuned models

    @staticmethod
    def policy_source(settings: NufiltSettings, step: int) -> Source | None:
        """The input an unfiltered float tensor is left as, None where the policy computes it (average)."""
        if settings.policy == "keep_base":
            return "base"
        if settings.policy == "keep_previous":  # θ_1^m = θ_1 (paper), then frozen
            return "new" if step == 1 else "previous"
        return None

    @staticmethod
    def selection_of(settings: NufiltSettings, names: Sequence[str]) -> Selection:
        return Selection.resolve(names, settings.include, settings.preset)

    @classmethod
    def untouched(cls, settings: MethodSettings, step: int, names: Sequence[str]) -> UntouchedRule:
        assert isinstance(settings, NufiltSettings)
        kept = cls.policy_source(settings, step)
        if kept is None:
            return every_tensor(None)
        selection = cls.selection_of(settings, names)
        return lambda name, shape: None if selection.is_filtered(name, shape) else kept

    @classmethod
    def scored(cls, settings: MethodSettings, names: Sequence[str]) -> tuple[ScoredRule, int, int] | None:
        assert isinstance(settings, NufiltSettings)
        return cls.selection_of(settings, names).is_filtered, settings.null_rank, settings.task_rank

    def tensor_state(self, name: str) -> Any:
        if name not in self.results:
            return None
        rescaled = (self.rescaling.lambdas[name], self.rescaling.norms[name]) if self.rescaling is not None else None
        return self.results[name], self._subspaces.get(name), rescaled

    def keep_tensor_state(self, name: str, state: Any) -> None:
        if state is None:
            return
        self.results[name], subspaces, rescaled = state
        if subspaces is not None:
            self._subspaces[name] = subspaces
        if rescaled is not None and self.rescaling is not None:
            self.rescaling.lambdas[name], self.rescaling.norms[name] = rescaled

    def subspaces(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        got = self._subspaces.pop(name, None)
        return None if self.settings.first_step == "published_code" else got

    def state(self) -> dict[str, Any]:
        return self.rescaling.state() if self.rescaling is not None else {}

    def summary(self) -> dict[str, Any]:
        done = [self.results[n] for n in self.ctx.names if n in self.results]  # summed in the model's order
        out: dict[str, Any] = {
            "selection": self.selection.source,
            "patterns": list(self.selection.patterns),
            "filtered_tensors": len(done),
            "null_space_dims": sum(r[2] for r in done),
            "adapter_loss_before": sum((r[0] for r in done), 0.0),
            "adapter_loss_after": sum((r[1] for r in done), 0.0),
        }
        if self.rescaling is not None and self.rescaling.lambdas:
            out["lambda_mean"] = fmean(self.rescaling.lambdas.values())
        return out
