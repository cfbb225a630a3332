"""Reading the next tensor while the current one is worked on, so that reading overlaps the work.

The engine's passes are sequential: read a tensor, hash or merge it, write it, then read the next. A
helper thread that reads (and hashes) the next tensor meanwhile takes the reads off the critical path:
on a warm page cache that is the copy out of the kernel and the sha256 of the check pass, on a cold disk
the wait for it. Reading (`os.preadv`) and hashing (`hashlib`) release the GIL, so the helper runs beside
the computation. Memory holds one item more, and only items of at most `max_bytes` are read ahead, so
the peak stays near one layer (a model's embeddings are read when their turn comes, as without it).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Llama-7B's q/k/v/o triple in bf16 (96 MiB) is read ahead, its gate/up/down (258 MiB) and embeddings are not
READ_AHEAD_BYTES = 128 * 1024**2


def read_ahead(items: Sequence[T], load: Callable[[T], R], size: Callable[[T], int],
               max_bytes: int = READ_AHEAD_BYTES) -> Generator[tuple[T, R | None], None, None]:
    """(item, load(item)) in order, each loaded on a helper thread while the caller works on the one before;
    (item, None) for an item bigger than `max_bytes`, which the caller loads itself when it gets there.
    A failed load raises in the caller, at its item."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nufilt-read-ahead") as pool:

        def submit(i: int) -> Future[R] | None:
            return pool.submit(load, items[i]) if i < len(items) and size(items[i]) <= max_bytes else None

        ahead = submit(0)
        for i, item in enumerate(items):
            current, ahead = ahead, submit(i + 1)
            box = [current.result() if current is not None else None]
            current = None  # a future keeps its result: drop it, so the caller alone holds this item
            yield item, box.pop()
