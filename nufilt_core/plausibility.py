"""A data-free plausibility check: was this checkpoint fine-tuned from our base at all?

The statistic: for every 2-D floating-point tensor (the weight matrices, which hold nearly all
parameters; biases and norms are small and noisy), the relative distance

    r = ‖θ_t − θ0‖_F / ‖θ0‖_F

and the median over those tensors. Fine-tuning moves weights a little: on the quality
benchmark's MiniLM fine-tunes (3 epochs, embeddings frozen) the median is 0.007-0.012 at lr 1e-4
and 0.031-0.049 at lr 5e-4 (largest single matrix 0.096). A model with the same names and
shapes but unrelated values is about as far from θ0 as θ0 is from zero: r ≈ √2 ≈ 1.41 for
independent weights of the same scale (measured on MiniLM: 1.414 for fresh values with each
tensor's mean and std, 1.414 for each tensor's values permuted, 1.39 for the trained layers
rotated by one position). The default bound, 0.5, is 10x the strongest real fine-tune and ~2.8x
under an unrelated model. The median (not the maximum) keeps one heavily retrained matrix (a new
classifier, a resized embedding) from failing an otherwise genuine fine-tune. What it cannot
tell: a fine-tune of a *sibling* base (two models fine-tuned from one pre-training) may be close.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import CheckpointError

DEFAULT_MAX_RELATIVE_DISTANCE = 0.5


@dataclass(frozen=True)
class Distance:
    median: float
    max: float
    max_tensor: str | None
    tensors: int  # how many 2-D float tensors were compared

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {"median": round(self.median, 6), "max": round(self.max, 6), "max_tensor": self.max_tensor,
                "tensors": self.tensors}


def relative_distance(base: torch.Tensor, new: torch.Tensor) -> float | None:
    """r of one matrix, in fp64; None for a zero (or non-finite) base, which has no scale to compare against."""
    b = base.to(torch.float64)
    norm = float(torch.linalg.vector_norm(b))
    if norm == 0.0 or not math.isfinite(norm):
        return None
    return float(torch.linalg.vector_norm(new.to(torch.float64) - b)) / norm


def relative_distances(base: Checkpoint, new: Checkpoint) -> dict[str, float]:
    """r per 2-D float tensor present in both with the same shape (the layout check is the pre-flight's); an
    adapter's from the tensors it changes."""
    out: dict[str, float] = {}
    for name, info in base.tensors.items():
        other = info if new.adapter is not None else new.tensors.get(name)
        if not info.is_float or len(info.shape) != 2 or other is None or other.shape != info.shape:
            continue
        r = relative_distance(base.read(name), new.model_tensor(name, base))
        if r is not None:
            out[name] = r
    return out


def summarise(r: dict[str, float]) -> Distance:
    if not r:
        return Distance(0.0, 0.0, None, 0)
    worst = max(r, key=lambda k: r[k])
    return Distance(statistics.median(r.values()), r[worst], worst, len(r))


def distance_from_base(base: Checkpoint, new: Checkpoint) -> Distance:
    return summarise(relative_distances(base, new))


class DistanceObserver:
    """The same check riding along the merge pass (observers.py): it refuses the step before the output
    is published when the median is above `bound`."""

    def __init__(self, checkpoint: Path, bound: float = DEFAULT_MAX_RELATIVE_DISTANCE):
        self.checkpoint, self.bound = checkpoint, bound
        self.distances: dict[str, float] = {}

    def wants(self, name: str, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2

    def observe(self, name: str, base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor,
                merged: torch.Tensor, subspaces: object) -> None:
        r = relative_distance(base, new)
        if r is not None:
            self.distances[name] = r

    def finish(self) -> None:
        d = self.distance()
        if d.median > self.bound:
            raise CheckpointError(self.checkpoint, f"implausibly far from the base: the median relative distance "
                                  f"‖θ_t − θ0‖/‖θ0‖ over its {d.tensors} weight matrices is {d.median:.4g} (bound "
                                  f"gate.max_relative_distance = {self.bound:g}; fine-tunes are typically 0.005-0.05, "
                                  f"unrelated weights ≈ 1.41); was it fine-tuned from another base?")

    def distance(self) -> Distance:
        return summarise(self.distances)
