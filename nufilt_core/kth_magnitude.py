"""Exact k-th smallest magnitude over a stream of tensors, in two passes and O(2^16) memory.

TIES trims each task vector with one magnitude threshold for the whole model. Concatenating or
sorting the model is what a streaming engine must not do. Instead, a radix select: |x| written
as an fp32 bit pattern is a non-negative int32 that orders exactly like |x|, so
  pass 1 counts the high 16 bits of every key and picks the bucket holding the k-th smallest;
  pass 2 counts the low 16 bits of the keys inside that bucket, which pins the exact value.
Values from fp16/bf16/fp32 checkpoints are exact in fp32; fp64 values are ranked by their fp32
rounding (ties can appear there that fp64 would break).
"""

from __future__ import annotations

import torch

HIGH_BINS = 1 << 15  # the sign bit of |x| is 0, so high halves are below 0x8000
LOW_BINS = 1 << 16
CHUNK = 1 << 22  # values per piece: temporaries stay O(16 MiB) however large the tensor


def flat_chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of x, flattened, in pieces of at most CHUNK values."""
    return x.reshape(-1).split(CHUNK)


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """|x| as fp32 bit patterns (int32, flat): key order is magnitude order."""
    return x.detach().abs().to(torch.float32).contiguous().view(torch.int32).flatten()


def bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


class KthMagnitude:
    """Streaming selection of the k-th smallest |x| (1-based) over all tensors fed to it.

    Use: `count_high(x)` for every tensor, `choose(k)`, `count_low(x)` for every tensor (same
    tensors, any order), then `threshold_bits` / `threshold`. `keep(x)` masks |x| ≥ threshold.
    """

    def __init__(self) -> None:
        self.numel = 0
        self._high = torch.zeros(HIGH_BINS, dtype=torch.int64)
        self._low = torch.zeros(LOW_BINS, dtype=torch.int64)
        self._bucket: int | None = None  # high half of the answer
        self._rank_in_bucket = 0
        self._bits: int | None = None

    def count_high(self, x: torch.Tensor) -> None:
        for piece in flat_chunks(x):
            self._high += torch.bincount(magnitude_keys(piece) >> 16, minlength=HIGH_BINS).cpu()
        self.numel += x.numel()

    def choose(self, k: int) -> None:
        """Fix the rank after pass 1. k ≤ 0 means "no threshold": every value is kept."""
        if k > self.numel:
            raise ValueError(f"k={k} exceeds the {self.numel} values counted")
        if k <= 0:
            self._bits = 0
            return
        cumulative = self._high.cumsum(0)
        bucket = int(torch.searchsorted(cumulative, torch.tensor(k)))  # first bucket whose cumulative count ≥ k
        self._bucket = bucket
        self._rank_in_bucket = k - (int(cumulative[bucket - 1]) if bucket else 0)

    def count_low(self, x: torch.Tensor) -> None:
        if self._bits is not None:  # already decided (k ≤ 0)
            return
        if self._bucket is None:
            raise RuntimeError("choose(k) must come between the two passes")
        for piece in flat_chunks(x):
            keys = magnitude_keys(piece)
            inside = keys[(keys >> 16) == self._bucket] & 0xFFFF
            if inside.numel():
                self._low += torch.bincount(inside, minlength=LOW_BINS).cpu()

    @property
    def threshold_bits(self) -> int:
        if self._bits is None:
            if self._bucket is None:
                raise RuntimeError("threshold asked before both passes")
            low = int(torch.searchsorted(self._low.cumsum(0), torch.tensor(self._rank_in_bucket)))
            if low >= LOW_BINS:
                raise RuntimeError("the second pass saw other tensors than the first")
            self._bits = (self._bucket << 16) | low
        return self._bits

    @property
    def threshold(self) -> float:
        return bits_to_float(self.threshold_bits)

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask (shape of x) of the entries with |x| ≥ the threshold."""
        return (magnitude_keys(x) >= self.threshold_bits).view(x.shape)
