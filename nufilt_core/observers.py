"""Work that rides along the merge pass instead of reading the models again, so each input byte is read once.

A caller that wants figures about the step (the gate's surrogate scores, the distance from the base)
hands the engine observers: the merge pass shows each one the tensors it wants, already decoded on
the device — (θ0, θ_{t-1}^m, θ_t) and the merged value as written — so nothing is read twice.
`finish` runs after the last tensor, before the output is published: an observer that raises there
stops the step and nothing is written.
"""

from __future__ import annotations

from typing import Protocol

import torch

# (V̂_{≤t-1}, V̂_t) of one matrix, when the method computed them (MergeMethod.subspaces)
Subspaces = tuple[torch.Tensor, torch.Tensor]


class TensorObserver(Protocol):
    def wants(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether to be shown this float tensor (asked once per tensor)."""
        ...

    def observe(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor,
                merged: torch.Tensor, subspaces: Subspaces | None) -> None:
        """One wanted tensor: the inputs in fp32 (fp64 stays fp64), `merged` as it is written, in the same dtype."""
        ...

    def finish(self) -> None:
        """After the last tensor, before the output is published; raise to stop the step."""
        ...
