"""The interface every merge method implements.

The engine streams the model tensor by tensor. For each float tensor it hands the method the
base θ0, the previous merged model θ_{t-1}^m and the new checkpoint θ_t (fp32 or fp64, on the
compute device) and writes back what `merge` returns. Methods that need whole-model
statistics declare `passes` > 0: the engine first streams every float tensor through
`observe` that many times (calling `end_pass` after each), then runs the merge pass.

Two class-level hooks let callers that only hold a lineage record (the daemon's gate, the
benchmark) ask the method about a step instead of knowing each method's rules: `untouched`
(which float tensors the step leaves bit for bit as one of its inputs) and `scored` (which
matrices and ranks the stability/plasticity surrogates cover).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

T = TypeVar("T")
# The inputs of a step a tensor can be left equal to; "previous" is θ0 at step 1 (θ_0^m = θ0).
Source = Literal["base", "previous", "new"]
# (name, shape) of a float tensor → the input it must equal bit for bit, None when it may change.
UntouchedRule = Callable[[str, tuple[int, ...]], Source | None]
# (left [d_out, r], right [r, d_in]) whose product is a task vector of rank ≤ r
LowRank = tuple[torch.Tensor, torch.Tensor]
# (name, shape) of a 2-D float tensor → whether the surrogate scores cover it.
ScoredRule = Callable[[str, tuple[int, ...]], bool]


def source_input(source: Source, base: T, previous: T | None, new: T) -> T:
    """What a Source names among a step's inputs (checkpoints, tensors, ...); θ_0^m = θ0 at step 1."""
    return {"base": base, "previous": base if previous is None else previous, "new": new}[source]


def every_tensor(source: Source | None) -> UntouchedRule:
    """The rule of a step that leaves every float tensor as `source` (None: it may change them all)."""
    return lambda name, shape: source


class MethodSettings(BaseModel):
    """Base for method hyper-parameters: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # settings added after lineage records were first written, with the value a record that lacks them was
    # merged with (a profile may now default them otherwise: an upgrade never changes a running lineage)
    added_since_records: ClassVar[dict[str, Any]] = {}


@dataclass
class StepContext:
    step: int  # 1-based index of the checkpoint being merged
    seed: int
    device: torch.device
    names: list[str]  # every tensor name of the model, in storage order
    previous_state: dict[str, Any] = field(default_factory=dict)  # method_state of the previous record
    # per float tensor, the largest machine epsilon of the dtypes base, previous and new store it in: differences
    # between the models are exact only to that rounding (missing: the tensor's own dtype as given)
    eps: dict[str, float] = field(default_factory=dict)


S = TypeVar("S", bound=MethodSettings)


class MergeMethod(ABC, Generic[S]):
    """A merge method with its settings' type S (`Settings` is that class, for the registry)."""

    name: ClassVar[str]
    summary_line: ClassVar[str]  # one line for `--help`
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    passes: ClassVar[int] = 0

    def __init__(self, settings: S, ctx: StepContext):
        self.settings = settings
        self.ctx = ctx

    def observe(self, pass_index: int, name: str, base: torch.Tensor, previous: torch.Tensor,
                new: torch.Tensor) -> None:
        """Accumulate whole-model statistics (only called when `passes` > 0)."""

    def end_pass(self, pass_index: int) -> None:
        """Called after every float tensor went through `observe` in this pass."""

    @abstractmethod
    def merge(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The new merged value of one float tensor."""

    # whether `merge_low_rank` does less work than `merge`: the engine then hands it a LoRA arrival's factors
    low_rank_aware: ClassVar[bool] = False
    # whether `merge` may run for several tensors at once, from several threads (its state kept per tensor name,
    # its results not depending on the order): the engine then merges matrices in parallel
    parallel_safe: ClassVar[bool] = False

    def heavy(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether merging this tensor is worth a worker of a parallel pool: for a parallel-safe method the engine
        merges only such tensors on its workers, and the cheap rest (element-wise) in its own thread."""
        return True

    def merge_low_rank(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor,
                       factors: LowRank) -> torch.Tensor:
        """`merge` when the new task vector is also known as factors, new − base = left @ right (a LoRA
        adapter's update): a method whose work shrinks with the rank overrides it, with the same result as
        `merge` up to rounding."""
        return self.merge(name, base, previous, new)

    def merge_tensor(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor,
                     factors: LowRank | None = None) -> torch.Tensor:
        """`merge_low_rank` when the new task vector's factors are known, else `merge` (what the executors call)."""
        with torch.no_grad():  # grad mode is per thread
            if factors is not None:
                return self.merge_low_rank(name, base, previous, new, factors)
            return self.merge(name, base, previous, new)

    def tensor_state(self, name: str) -> Any:
        """What `merge` recorded about tensor `name` (a parallel-safe method's per-tensor state), for a copy of
        the method in another process to hand back: the step's own object then `keep_tensor_state`s it."""
        return None

    def keep_tensor_state(self, name: str, state: Any) -> None:
        """Record what another copy of this method's `merge` recorded about tensor `name` (`tensor_state`)."""

    def subspaces(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(V̂_{≤t-1}, V̂_t) of a tensor `merge` handled (asked once, after it), when the method computed them as
        the surrogate scores define them (the top right singular vectors of τ̃_{≤t-1} and τ_t at the ranks
        `scored` names), so the scores need not compute them again; None (the default) otherwise."""
        return None

    def state(self) -> dict[str, Any]:
        """What the next step needs to continue (stored in the lineage record)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Figures about this step worth recording (counts, losses)."""
        return {}

    @classmethod
    def untouched(cls, settings: MethodSettings, step: int, names: Sequence[str]) -> UntouchedRule:
        """Which float tensors step `step` leaves bit for bit as one of its inputs, and which input:
        the gate checks the candidate holds exactly that. `names`: every tensor of the model, in
        storage order. Declare only what `merge` guarantees bit for bit (it returns the input tensor
        itself, which the engine casts back losslessly); the default claims nothing."""
        return every_tensor(None)

    @classmethod
    def scored(cls, settings: MethodSettings, names: Sequence[str]) -> tuple[ScoredRule, int, int] | None:
        """(which matrices, r_p, r_v) the surrogate scores of this method's steps cover; a rank of 0
        means the paper's. None (the default): every Linear weight at the paper's ranks."""
        return None
