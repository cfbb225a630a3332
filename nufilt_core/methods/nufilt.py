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

Beyond the paper (issue 9; the defaults are the paper's method, profile "plus" a named combination):
  * rescale = model | matrix: U = λ_{t-1} τ_{≤t-1} + fused update, W^m_t = W_0 + U / λ_t with
    λ_t = max(1, ‖U‖ / target), target = max(mean_i ‖τ_i‖ · t^growth, κ‖W0‖) (OPCM's rule when
    growth = κ = 0); κ = rescale_radius is a trust radius: updates that stay within κ‖W0‖ of θ0
    (gentle fine-tunes) are never shrunk. λ_t and the norms per unit live in the lineage record.
    `matrix` needs no extra pass; `model` needs ‖U‖ over the whole model first, so its statistics
    pass runs the NUFILT step of every matrix and the merge pass runs it again (twice the work);
  * rescale = clip: per matrix, U = τ_{≤t-1} + fused update; when ‖U‖ exceeds the same target, its
    singular values are clipped at the level c where ‖min(σ, c)‖ = target, instead of all divided
    by λ_t: the dominant directions shrink, the directions few tasks hold keep their size;
  * null_energy: r_p = the fewest directions holding that share of ‖τ_{≤t-1}‖²;
  * task_energy: τ_t → τ_t V_k V_kᵀ, its fewest top right singular directions holding that share of
    ‖τ_t‖², before anything else: fine-tuning's small high-rank rest helps its task little and,
    summed over tasks, reaches every other task's inputs (the low-rank task vectors of TSV / CART);
  * adapter_span: A projected onto span([V̂t, V̂p]) after the loop (the loss only sees A V̂);
  * policy sum: other float tensors take θ^m + τ_t (rescaled with the rest when rescale is on);
  * spectrum_power p: from step 2, each filtered matrix's merged task vector U Σ Vᵀ becomes
    c · U Σ^p Vᵀ with c keeping its Frobenius norm (p = 0: a flat spectrum, Iso-C's isotropic merge):
    directions few tasks share are no longer drowned by the dominant ones; spectrum_when = shrunk
    does it only where the rescaling shrank the matrix (λ_t > 1), the case it compensates. Singular
    values below the weights' rounding noise (rounding_floor) are dropped, not raised: a low-rank task
    vector (LoRA fine-tunes) would otherwise be flattened into noise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..errors import LineageError
from ..interrupts import check_for_stop
from ..linalg import (
    adapter_seed,
    gram64,
    low_rank_right_singular_vectors,
    seeded_normal,
    top_right_singular_vectors,
)
from ..selection import Selection
from .base import LowRank, MergeMethod, MethodSettings, ScoredRule, Source, StepContext, UntouchedRule, every_tensor

Policy = Literal["keep_base", "keep_previous", "average", "sum"]
Preset = Literal["auto", "all-linear", "clip", "vit", "bert", "t5", "llama"]  # selection.PRESETS and two rules
Rescale = Literal["none", "model", "matrix", "clip"]
# Named settings: "paper" is the paper's method (what the parity tests check); "plus" is the
# combination chosen on the quality benchmark's dev split (bench/quality/README.md, issue 9):
# every Linear weight filtered, the other tensors averaged, a trust radius of 0.03‖W0‖ per matrix
# below which the merged task vector is never shrunk (OPCM's λ_t above it), and r_p = 32.
# "plus-iso" is plus with a flat spectrum (spectrum_power 0, Iso-C's) on the merged task vectors its
# rescaling shrank: the best of the 8-task dev study in both regimes (flattening every matrix led with
# strong fine-tunes but cost 0.3 with gentle ones, where little is shrunk).
PLUS = {"preset": "all-linear", "policy": "average", "rescale": "matrix", "rescale_radius": 0.03, "null_rank": 32}
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {},
    "plus": PLUS,
    "plus-iso": {**PLUS, "spectrum_power": 0.0, "spectrum_when": "shrunk"},
}
Profile = Literal["paper", "plus", "plus-iso"]


class NufiltSettings(MethodSettings):
    profile: Profile = Field("paper", description="named settings: paper (the paper's NUFILT), plus or plus-iso "
                             "(beyond the paper, see PROFILES); explicit settings override it")
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
    policy: Policy = Field("keep_base", description="what other float tensors become; sum (beyond the paper): "
                           "θ^m_{t-1} + τ_t, unfiltered but rescaled with the rest when rescale is on")
    first_step: Literal["paper", "published_code"] = Field(
        "paper", description="paper: θ_1^m = θ_1 (zero directions never filtered); published_code: filter the "
        "first r_p input coordinates at step 1, as the authors' code does through the SVD of a zero matrix")
    # beyond the paper (issue 9's levers); the defaults above are the paper's method
    rescale: Rescale = Field("none", description="none: fuse at full size (paper); model / matrix: OPCM's rule on the "
                             "filtered tensors, U = λ_{t-1} τ_{≤t-1} + update, θ^m = θ0 + U / λ_t, λ_t = ‖U‖ / target, "
                             "over the whole model or per matrix; clip: per matrix, the same target reached by "
                             "clipping the largest singular values (only the dominant directions shrink)")
    rescale_growth: float = Field(0.0, ge=-1, le=1, description="target = mean_i ‖τ_i‖ · t^growth (0: OPCM's mean "
                                  "norm; 0.5: the norm of t orthogonal task vectors; < 0: shrinking with t); λ_t ≥ 1 "
                                  "(never amplified)")
    rescale_radius: float = Field(0.0, ge=0, description="κ: never shrink below κ‖W0‖ (a trust radius around θ0, "
                                  "relative to the base weights): target = max(mean_i ‖τ_i‖ · t^growth, κ‖W0‖)")
    adapter_span: bool = Field(False, description="keep the adapter inside span([V̂t, V̂p]), the only directions its "
                               "loss sees: A's random start outside them is dropped (the loss is unchanged)")
    null_energy: float | None = Field(None, gt=0, le=1, description="r_p by energy: the fewest directions holding this "
                                      "share of ‖τ_{≤t-1}‖², at most null_rank (None: null_rank directions)")
    task_energy: float | None = Field(None, gt=0, le=1, description="low-rank τ_t: keep only its top right singular "
                                      "directions holding this share of ‖τ_t‖² before filtering (None: all of τ_t)")
    spectrum_power: float | None = Field(None, ge=0, le=1, description="from step 2, the merged task vector's "
                                         "singular values σ → σ^p per filtered matrix, its norm kept (0: flat, "
                                         "Iso-C's isotropic spectrum; None: as merged)")
    spectrum_when: Literal["always", "shrunk"] = Field("always", description="always: every filtered matrix from "
                                                       "step 2; shrunk: only where the rescaling shrank it (λ_t > 1)")

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
        if isinstance(data, dict) and data.get("profile") in PROFILES:
            return {**PROFILES[data["profile"]], **data}
        return data

    @model_validator(mode="after")
    def _shrunk_needs_a_shrinking_rescale(self) -> NufiltSettings:
        # "shrunk" reads λ_t, which only model and matrix record (clip reaches its target without one):
        # with any other rescale the spectrum would silently never be shaped
        if self.spectrum_when == "shrunk" and self.rescale not in ("model", "matrix"):
            raise ValueError(f"spectrum_when 'shrunk' needs rescale 'model' or 'matrix' (it reads their λ_t), "
                             f"not {self.rescale!r}; use spectrum_when 'always'")
        return self


@dataclass
class MatrixResult:
    update: torch.Tensor  # τ_t (P + B A), to be added to the previous merged weight
    v_prev: torch.Tensor  # V̂p [d_in, k_p]
    v_new: torch.Tensor  # V̂t [d_in, k_t]
    a: torch.Tensor  # [r_l, d_in]
    b: torch.Tensor  # [d_in, r_l]
    loss_before: float
    loss_after: float


def rounding_floor(base: torch.Tensor, eps: float) -> float:
    """The singular value below which a difference of two [m, n] models stored with machine epsilon `eps`
    at `base`'s scale is rounding noise: eps · rms(base) · (√m + √n), about 3× the largest singular value
    of the rounding errors (0.2-0.33× that, measured for fp32, bf16 and fp16)."""
    m, n = base.shape
    return eps * float(base.double().norm()) / math.sqrt(m * n) * (math.sqrt(m) + math.sqrt(n))


def shape_spectrum(delta: torch.Tensor, power: float, floor: float = 0.0) -> torch.Tensor:
    """delta = U Σ Vᵀ → c · U Σ^power Vᵀ over its singular values above `floor` (and 1e-7 σ_1), c keeping
    ‖delta‖_F. Below the floor is rounding noise: a power < 1 would raise it towards the signal (a low-rank
    task vector flattened over every direction is mostly noise).

    fp32 and narrower go through the eigendecomposition of the fp64 Gram matrix of the smaller side, as
    top_right_singular_vectors does (1.5-3.9× cheaper than an fp64 SVD, bench/speed/flatten.py; fp32's
    rounding floor is far above fp64's √eps), with U Σ^p Vᵀ = delta V Σ^(p-1) Vᵀ; fp64 keeps the SVD."""
    x = delta.double()
    wide = x.shape[1] > x.shape[0]
    if wide:
        x = x.T  # [long side, short side]: V spans the short one
    if delta.dtype == torch.float64:
        _, sigma, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.T
    else:
        evals, v = torch.linalg.eigh(gram64(x))  # x is already fp64 with the short side last
        sigma = evals.clamp_min(0).sqrt()
    keep = sigma > max(float(sigma.max()) * 1e-7, floor) if sigma.numel() else sigma.bool()
    if not bool(keep.any()):
        return delta
    shaped = sigma[keep] ** power
    shaped = shaped * (x.norm() / shaped.norm())
    vk = v[:, keep]
    out = ((x @ vk) * (shaped / sigma[keep])) @ vk.T
    return (out.T if wide else out).to(delta.dtype)


def clip_spectrum(delta: torch.Tensor, target: float) -> torch.Tensor:
    """delta = U Σ Vᵀ → U min(Σ, c) Vᵀ with c such that ‖min(σ, c)‖ = target (delta itself if within it)."""
    u, sigma, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if float(sigma.norm()) <= target:
        return delta
    # with the top k clipped: k c² + Σ_{i≥k} σ_i² = target², valid when σ_k ≤ c ≤ σ_{k-1}
    tail = sigma.square().flip(0).cumsum(0).flip(0)  # tail[k] = Σ_{i≥k} σ_i²
    tail = torch.cat([tail, tail.new_zeros(1)])
    c = 0.0
    for k in range(1, sigma.numel() + 1):
        rest = target**2 - float(tail[k])
        if rest >= 0 and (k == sigma.numel() or math.sqrt(rest / k) >= float(sigma[k])):
            c = math.sqrt(rest / k)
            break
    return ((u * sigma.clamp(max=c)) @ vh).to(delta.dtype)


def energy_count(projected: torch.Tensor, total: float, share: float) -> int:
    """Fewest leading columns of τ V̂ (in singular order) whose energy reaches `share` of ‖τ‖²."""
    cumulative = projected.double().square().sum(0).cumsum(0)
    return min(int((cumulative < share * total).sum()) + 1, projected.shape[1])


def low_rank_by_energy(tau: torch.Tensor, share: float) -> torch.Tensor:
    """τ V_k V_kᵀ with V_k the fewest top right singular vectors of τ holding `share` of ‖τ‖²."""
    v = top_right_singular_vectors(tau, min(tau.shape))
    if v.shape[1] == 0:
        return tau
    projected = tau @ v
    k = energy_count(projected, float(tau.double().square().sum()), share)
    return projected[:, :k] @ v[:, :k].T


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
    v_prev = top_right_singular_vectors(tau_prev, s.null_rank, gram=gram)
    if s.null_energy is not None and v_prev.shape[1]:
        v_prev = v_prev[:, : energy_count(tau_prev @ v_prev, float(tau_prev.square().sum()), s.null_energy)]
    return v_prev


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
    if s.task_energy is not None:  # beyond the paper: the new task vector's low-rank part only
        tau_new, factors = low_rank_by_energy(tau_new, s.task_energy), None
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
        if s.adapter_span:
            # ∂L/∂A = (∂L/∂X) V̂ᵀ lies in span(V̂), so A's part outside it is its random start, unseen by the
            # loss (A Q Qᵀ V̂ = A V̂): dropping it leaves the loss as it is and adds nothing the loss did not check
            q = torch.linalg.qr(v_hat).Q
            a = (a @ q) @ q.T
        tau_b = tau_new @ b if factors is None else factors[0] @ (factors[1] @ b)
        loss_after = float((residual - tau_b @ (a @ v_weighted)).square().sum())
        update = filtered + tau_b @ a  # τ_t (P + B A) (Eq. 9–10)
    return MatrixResult(update, v_prev, v_new, a, b, loss_before, loss_after)


class Nufilt(MergeMethod):
    name = "nufilt"
    summary_line = "null-space filter + data-free LoRA adapter, fused (the paper's method)"
    Settings = NufiltSettings
    low_rank_aware = True

    def __init__(self, settings: NufiltSettings, ctx: StepContext):
        super().__init__(settings, ctx)
        self.selection = self.selection_of(settings, ctx.names)
        self.filtered = 0
        self.loss_before = 0.0
        self.loss_after = 0.0
        self.null_dims = 0
        self._subspaces: tuple[str, torch.Tensor, torch.Tensor] | None = None  # the last filtered tensor's V̂p, V̂t
        self._factors: tuple[str, LowRank] | None = None  # the tensor being merged's τ_t as factors (merge_low_rank)
        # rescaling (beyond the paper): λ_{t-1} and ‖τ_1‖…‖τ_{t-1}‖ per unit ("" = the whole model)
        self.scales: dict[str, tuple[float, list[float]]] = {}
        self.new_sq: dict[str, float] = {}
        self.merged_sq: dict[str, float] = {}
        self.base_sq: dict[str, float] = {}
        self.lambdas: dict[str, float] = {}
        if settings.rescale != "none" and ctx.step > 1:
            self.scales = self._read_state(ctx.previous_state)
        self.passes = 1 if settings.rescale == "model" and ctx.step > 1 else 0  # ‖U‖ over the model first

    def _read_state(self, state: dict[str, Any]) -> dict[str, tuple[float, list[float]]]:
        scales = state.get("rescale")
        ok = isinstance(scales, dict) and all(
            isinstance(v, dict) and isinstance(v.get("lambda"), int | float)
            and isinstance(v.get("norms"), list) and len(v["norms"]) == self.ctx.step - 1 for v in scales.values())
        if not ok or not scales:
            raise LineageError(f"the previous merged model's lineage record lacks a valid NUFILT rescale state for "
                               f"step {self.ctx.step} (expected 'rescale' with 'lambda' and {self.ctx.step - 1} "
                               f"'norms' per unit, got {state.get('rescale')!r}); a setting that rescales "
                               f"(rescale={self.settings.rescale!r}) needs every step of the lineage merged with one, "
                               f"so start a new lineage (step 1) with it")
        return {k: (float(v["lambda"]), [float(n) for n in v["norms"]]) for k, v in scales.items()}

    def is_filtered(self, name: str, shape: tuple[int, ...]) -> bool:
        return self.selection.is_filtered(name, shape)

    def _unit(self, name: str) -> str:
        return "" if self.settings.rescale == "model" else name  # type: ignore[attr-defined]

    def _update(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> MatrixResult:
        s: NufiltSettings = self.settings  # type: ignore[assignment]
        a_init = adapter_init(s.lora_rank, base.shape[1], self.ctx.seed, name, self.ctx.step)
        if a_init is not None:
            a_init = a_init.to(device=base.device, dtype=base.dtype)
        factors = self._factors[1] if self._factors is not None and self._factors[0] == name else None
        return nufilt_matrix(previous - base, new - base, a_init, s, factors)

    def _unscaled(self, name: str, base: torch.Tensor, previous: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """U = λ_{t-1} τ_{≤t-1} + update (the merged task vector before this step's λ_t)."""
        lam = self.scales[self._unit(name)][0] if self.scales else 1.0
        return lam * (previous - base) + update

    def _lambda(self, unit: str) -> float:
        """λ_t = ‖U‖ / target (at least 1), target = max(mean_i ‖τ_i‖ · t^growth, κ‖W0‖)."""
        s: NufiltSettings = self.settings  # type: ignore[assignment]
        norms = [*self.scales.get(unit, (1.0, []))[1], math.sqrt(self.new_sq[unit])]
        target = max(fmean(norms) * self.ctx.step ** s.rescale_growth, s.rescale_radius * math.sqrt(self.base_sq[unit]))
        return max(1.0, math.sqrt(self.merged_sq[unit]) / target) if target > 0 else 1.0

    def _accumulate(self, unit: str, base: torch.Tensor, new: torch.Tensor, u: torch.Tensor) -> None:
        for acc, x in ((self.new_sq, new - base), (self.merged_sq, u), (self.base_sq, base)):
            acc[unit] = acc.get(unit, 0.0) + float(x.double().square().sum())

    def _fused(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor | None:
        """This step's addition to the merged task vector, None for tensors the policy sets directly."""
        if self.is_filtered(name, tuple(base.shape)):
            result = self._update(name, base, previous, new)
            self.filtered += 1
            self.loss_before += result.loss_before
            self.loss_after += result.loss_after
            self.null_dims += result.v_prev.shape[1]
            self._subspaces = (name, result.v_prev, result.v_new)
            return result.update
        return new - base if self.settings.policy == "sum" else None  # type: ignore[attr-defined]

    def observe(self, pass_index: int, name: str, base: torch.Tensor, previous: torch.Tensor,
                new: torch.Tensor) -> None:
        update = self._fused(name, base, previous, new)
        if update is not None:
            self._accumulate("", base, new, self._unscaled(name, base, previous, update))

    def end_pass(self, pass_index: int) -> None:
        if "" in self.new_sq:
            self.lambdas[""] = self._lambda("")
        self.filtered, self.loss_before, self.loss_after, self.null_dims = 0, 0.0, 0.0, 0  # counted in the merge pass

    def merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        s: NufiltSettings = self.settings  # type: ignore[assignment]
        update = self._fused(name, base, previous, new)
        if update is None:
            return self._policy(base, previous, new)
        merged = self._rescaled(name, base, previous, new, update)
        if s.spectrum_power is None or self.ctx.step == 1:
            return merged
        if s.spectrum_when == "shrunk" and self.lambdas.get(self._unit(name), 1.0) <= 1.0:
            return merged  # nothing was shrunk: the merged task vector keeps every task at full size
        floor = rounding_floor(base, self.ctx.eps.get(name, torch.finfo(base.dtype).eps))
        return base + shape_spectrum(merged - base, s.spectrum_power, floor)

    def merge_low_rank(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor,
                       factors: LowRank) -> torch.Tensor:
        self._factors = (name, factors)
        try:
            return self.merge(name, base, previous, new)
        finally:
            self._factors = None

    def _rescaled(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor,
                  update: torch.Tensor) -> torch.Tensor:
        """W^m_t of a filtered matrix: θ^m_{t-1} + update, or θ0 + U / λ_t when rescale is on."""
        s: NufiltSettings = self.settings  # type: ignore[assignment]
        if s.rescale == "none":
            return previous + update
        u = self._unscaled(name, base, previous, update)
        unit = self._unit(name)
        if s.rescale == "clip":  # λ stays 1: the next step adds to the clipped merged task vector as it is
            self._accumulate(unit, base, new, u)
            self.lambdas[unit] = 1.0
            shrink = 1.0 if self.ctx.step == 1 else self._lambda(unit)
            return base + (clip_spectrum(u, math.sqrt(self.merged_sq[unit]) / shrink) if shrink > 1 else u)
        if s.rescale == "matrix" or self.ctx.step == 1:  # step 1: λ_1 = 1, only ‖τ_1‖ is recorded
            self._accumulate(unit, base, new, u)
            self.lambdas[unit] = 1.0 if self.ctx.step == 1 else self._lambda(unit)
        return base + u / self.lambdas[unit]

    def _policy(self, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        t = self.ctx.step
        kept = self.policy_source(self.settings, t)  # type: ignore[arg-type]
        if kept is not None:
            return {"base": base, "previous": previous, "new": new}[kept]
        return previous * ((t - 1) / t) + new / t  # average: running mean of the fine-tuned models

    @staticmethod
    def policy_source(settings: NufiltSettings, step: int) -> Source | None:
        """The input an unfiltered float tensor is left as, None where the policy computes it (average, sum)."""
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
        kept = cls.policy_source(settings, step)  # type: ignore[arg-type]
        if kept is None:
            return every_tensor(None)
        selection = cls.selection_of(settings, names)  # type: ignore[arg-type]
        return lambda name, shape: None if selection.is_filtered(name, shape) else kept

    @classmethod
    def scored(cls, settings: MethodSettings, names: Sequence[str]) -> tuple[ScoredRule, int, int] | None:
        s: NufiltSettings = settings  # type: ignore[assignment]
        return cls.selection_of(s, names).is_filtered, s.null_rank, s.task_rank

    def subspaces(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        s: NufiltSettings = self.settings  # type: ignore[assignment]
        plain = s.null_energy is None and s.task_energy is None and s.first_step != "published_code"
        last = self._subspaces
        return (last[1], last[2]) if plain and last is not None and last[0] == name else None

    def state(self) -> dict[str, Any]:
        if self.settings.rescale == "none":  # type: ignore[attr-defined]
            return {}
        return {"rescale": {unit: {"lambda": lam, "norms": [*self.scales.get(unit, (1.0, []))[1],
                                                            math.sqrt(self.new_sq[unit])]}
                            for unit, lam in self.lambdas.items()}}

    def summary(self) -> dict[str, Any]:
        out = {
            "selection": self.selection.source,
            "patterns": list(self.selection.patterns),
            "filtered_tensors": self.filtered,
            "null_space_dims": self.null_dims,
            "adapter_loss_before": self.loss_before,
            "adapter_loss_after": self.loss_after,
        }
        if self.lambdas:
            out["lambda_mean"] = fmean(self.lambdas.values())
        return out
