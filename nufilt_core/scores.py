"""Data-free stability and plasticity surrogates of one merge step (paper Eq. 13–14).

The paper bounds the data-level losses by a term restricted to the singular subspaces plus a
spectral-norm term that depends on the (unknown) activations. Without data we report the
subspace terms, summed over the matrices the method filters:

  stab = Σ_l ‖(τ̃_≤t − τ̃_≤t−1) V̂_≤t−1‖²_F   how much the update moves earlier tasks' directions
  plas = Σ_l ‖(τ̃_≤t − τ_t) V̂_t‖²_F          how far the merged model is from θ_t on its directions

with τ̃_≤t = θ_t^m − θ0, τ̃_≤t−1 = θ_{t−1}^m − θ0, τ_t = θ_t − θ0, V̂_≤t−1 the top-r_p right singular
vectors of τ̃_≤t−1 and V̂_t the top-r_v of τ_t (numerically zero directions dropped, as the merge).

Normalised, so a threshold means the same for any model size:
  stability  = stab / Σ_l ‖τ̃_≤t−1 V̂_≤t−1‖²_F   0: earlier directions untouched; 1: moved by their own size
  plasticity = plas / Σ_l ‖τ_t V̂_t‖²_F          0: the new task fully kept; 1: as if it was not merged
Both are losses (lower is better). At step 1 there are no earlier directions: stability is 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .checkpoint import Checkpoint
from .linalg import top_right_singular_vectors
from .lineage import LineageRecord
from .methods import MergeMethod, MethodSettings, recorded
from .observers import Subspaces
from .selection import is_linear_weight

DEFAULT_NULL_RANK, DEFAULT_TASK_RANK = 128, 8


@dataclass
class MatrixTerms:
    stab: float  # ‖(τ̃_≤t − τ̃_≤t−1) V̂p‖²
    stab_ref: float  # ‖τ̃_≤t−1 V̂p‖²
    plas: float  # ‖(τ̃_≤t − τ_t) V̂t‖²
    plas_ref: float  # ‖τ_t V̂t‖²


@dataclass
class SurrogateScores:
    stability: float
    plasticity: float
    stability_raw: float
    plasticity_raw: float
    stability_ref: float
    plasticity_ref: float
    matrices: int
    null_rank: int  # r_p and r_v the terms were computed at
    task_rank: int

    @property
    def harmonic_mean(self) -> float:
        """As the paper's Fig. 5 combines the two (0 when either is 0)."""
        s, p = self.stability, self.plasticity
        return 0.0 if s <= 0 or p <= 0 else 2 * s * p / (s + p)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "harmonic_mean": self.harmonic_mean}


def matrix_terms(tau_prev: torch.Tensor, tau_new: torch.Tensor, tau_merged: torch.Tensor,
                 null_rank: int, task_rank: int, subspaces: Subspaces | None = None) -> MatrixTerms:
    """The four sums of squares for one weight matrix [d_out, d_in] (all on one device, fp32/64);
    `subspaces` (V̂_{≤t-1}, V̂_t) when the merge already computed them at these ranks."""
    if subspaces is None:
        subspaces = (top_right_singular_vectors(tau_prev, null_rank), top_right_singular_vectors(tau_new, task_rank))
    v_prev, v_new = subspaces
    return MatrixTerms(
        stab=float(((tau_merged - tau_prev) @ v_prev).square().sum()),
        stab_ref=float((tau_prev @ v_prev).square().sum()),
        plas=float(((tau_merged - tau_new) @ v_new).square().sum()),
        plas_ref=float((tau_new @ v_new).square().sum()),
    )


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def method_scope(method_cls: type[MergeMethod], settings: MethodSettings, names: list[str],
                 ) -> tuple[Callable[[str, tuple[int, ...]], bool], int, int]:
    """Which matrices a method's steps are scored on, and r_p, r_v: what the method says (NUFILT: its
    own selection and ranks, the paper's where a rank is 0), else every Linear weight with the
    paper's ranks (what the daemon's gate and the benchmark both use)."""
    scope = method_cls.scored(settings, names)
    if scope is None:
        return is_linear_weight, DEFAULT_NULL_RANK, DEFAULT_TASK_RANK
    selected, null_rank, task_rank = scope
    return selected, null_rank or DEFAULT_NULL_RANK, task_rank or DEFAULT_TASK_RANK


def record_scope(record: LineageRecord, names: list[str]) -> tuple[Callable[[str, tuple[int, ...]], bool], int, int]:
    """`method_scope` of the method and settings a step was merged with."""
    return method_scope(*recorded(record), names)


class ScoreObserver:
    """Sums the terms over the selected matrices as the merge pass (or `surrogate_scores`) shows them.
    `reuse`: the merge's own V̂ are the top-r_p / top-r_v right singular vectors at these ranks, so the
    eigen work is not done twice."""

    def __init__(self, selected: Callable[[str, tuple[int, ...]], bool], null_rank: int, task_rank: int,
                 reuse: bool = False):
        self.selected, self.null_rank, self.task_rank, self.reuse = selected, null_rank, task_rank, reuse
        self.totals = MatrixTerms(0.0, 0.0, 0.0, 0.0)
        self.count = 0

    def wants(self, name: str, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and self.selected(name, shape)

    def observe(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor,
                merged: torch.Tensor, subspaces: Subspaces | None) -> None:
        terms = matrix_terms(previous - base, new - base, merged - base, self.null_rank, self.task_rank,
                             subspaces if self.reuse else None)
        for field in ("stab", "stab_ref", "plas", "plas_ref"):
            setattr(self.totals, field, getattr(self.totals, field) + getattr(terms, field))
        self.count += 1

    def finish(self) -> None:
        pass

    def scores(self) -> SurrogateScores:
        t = self.totals
        return SurrogateScores(
            stability=_ratio(t.stab, t.stab_ref), plasticity=_ratio(t.plas, t.plas_ref), stability_raw=t.stab,
            plasticity_raw=t.plas, stability_ref=t.stab_ref, plasticity_ref=t.plas_ref, matrices=self.count,
            null_rank=self.null_rank, task_rank=self.task_rank)


def surrogate_scores(base: Checkpoint, previous: Checkpoint | None, new: Checkpoint, merged: Checkpoint,
                     selected: Callable[[str, tuple[int, ...]], bool], null_rank: int = DEFAULT_NULL_RANK,
                     task_rank: int = DEFAULT_TASK_RANK,
                     device: torch.device | str = "cpu") -> SurrogateScores:
    """The scores of a step already on disk: streams the selected 2-D float tensors of the four models.

    `previous` None means step 1 (θ_0^m = θ0). Memory: four copies of one matrix at a time. (The daemon
    gets them from the merge pass itself: `MergeRequest.scores`.)
    """
    observer = ScoreObserver(selected, null_rank, task_rank)
    with torch.no_grad():
        for name, info in base.tensors.items():
            if not info.is_float or not observer.wants(name, info.shape):
                continue
            compute = torch.float64 if info.torch_dtype == torch.float64 else torch.float32
            w0, w_prev, w_new, w_merged = (c.model_tensor(name, base).to(device=device, dtype=compute)
                                           for c in (base, previous or base, new, merged))
            observer.observe(name, w0, w_prev, w_new, w_merged, None)
    return observer.scores()
