"""The engine's I/O shortcuts against the plain ways: the read-ahead thread and the finite check."""

from __future__ import annotations

import threading

import pytest
import torch

from nufilt_core.checkpoint import all_finite
from nufilt_core.readahead import read_ahead


def test_read_ahead_keeps_the_order_and_loads_on_another_thread():
    main = threading.get_ident()
    loaded_on: dict[int, int] = {}

    def load(i: int) -> int:
        loaded_on[i] = threading.get_ident()
        return i * i

    sizes = {3: 10_000}  # item 3 is too big to read ahead: the caller gets None and loads it itself
    got = list(read_ahead(list(range(6)), load, lambda i: sizes.get(i, 1), max_bytes=100))
    assert got == [(0, 0), (1, 1), (2, 4), (3, None), (4, 16), (5, 25)]
    assert 3 not in loaded_on and all(t != main for t in loaded_on.values())


def test_read_ahead_raises_at_the_failed_item():
    def load(i: int) -> int:
        if i == 2:
            raise OSError("disk gone")
        return i

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item, _ in read_ahead(list(range(5)), load, lambda i: 1):
            seen.append(item)
    assert seen == [0, 1]  # items before the failure arrive, the failure comes where item 2 would


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_is_isfinite(dtype):
    x = torch.randn(1000).to(dtype)
    assert all_finite(x) and all_finite(x[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[517] = bad
        assert not all_finite(y)
    y = x.clone()
    y[0], y[1] = float("inf"), -float("inf")  # their sum is NaN: still caught
    assert not all_finite(y)
    big = torch.full((100,), torch.finfo(dtype).max / 2, dtype=dtype)  # finite values whose sum overflows
    assert all_finite(big)
