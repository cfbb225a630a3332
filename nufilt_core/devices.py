"""Which device computes: `auto` takes CUDA when present; the CPU result is the reference."""

from __future__ import annotations

import torch

from .errors import SettingsError


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
