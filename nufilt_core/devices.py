"""Which device computes: `auto` takes CUDA when present; the CPU result is the reference."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import SettingsError

CPU = torch.device("cpu")


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise SettingsError(f"--device {spec!r} is not a device (use auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingsError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise SettingsError(f"--device {spec}: only cpu and cuda are supported")
    return device


def set_threads(threads: int | None) -> None:
    """CPU threads for torch. On a shared host, give the cores that are really free: torch's threads
    spin-wait for each other, and with busy cores a step was measured 27× slower than on one thread."""
    if threads is None:
        return
    if threads < 1:
        raise SettingsError(f"--threads {threads}: must be at least 1")
    torch.set_num_threads(threads)


def cpu_workers(requested: int | None) -> int:
    """How many matrices a CPU merge works on at once: `requested`, else the cores this process may use."""
    if requested is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested < 1:
        raise SettingsError(f"--threads {requested}: must be at least 1")
    return requested


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block (threads started there see it too), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
