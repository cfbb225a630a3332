"""Where a merge step's matrices are merged while the step reads and writes in order: threads of this process
(the local executor), Ray tasks (ray_executor.py), or none (one worker: in the caller's thread)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Literal, Protocol

import torch

from .devices import CPU
from .methods.base import LowRank, MergeMethod
from .ray_executor import RayPool

Executor = Literal["local", "ray"]
EXECUTORS: tuple[Executor, ...] = ("local", "ray")


class MatrixPool(Protocol):
    @property
    def slots(self) -> int:
        """Matrices worth having in flight."""

    def submit(self, name: str, loaded: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               factors: LowRank | None) -> Callable[[], torch.Tensor]:
        """Start one matrix's merge; the call returned waits for it."""

    def close(self) -> None:
        """Drop work not started; running merges finish or are cancelled."""


class ThreadPool:
    """`workers` threads of this process (merge_step holds torch and BLAS to one thread each)."""

    def __init__(self, method: MergeMethod, workers: int):
        self.method, self.slots = method, workers
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="nufilt-merge")

    def submit(self, name: str, loaded: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               factors: LowRank | None) -> Callable[[], torch.Tensor]:
        return self.executor.submit(self.method.merge_tensor, name, *loaded, factors).result

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)  # a stop reaches running loops: interrupts.py


@contextmanager
def matrix_pool(method: MergeMethod, executor: Executor, workers: int, ray_address: str | None,
                ray_device: torch.device = CPU) -> Iterator[MatrixPool | None]:
    """The step's pool, closed on the way out (on an error too); `ray_device`: where Ray tasks merge."""
    pool: MatrixPool
    if executor == "ray":
        pool = RayPool(ray_address, method, ray_device)
    elif workers > 1:
        pool = ThreadPool(method, workers)
    else:
        yield None
        return
    try:
        yield pool
    finally:
        pool.close()
