"""Measuring a run in a fresh child process: wall seconds, CPU seconds and peak RSS.

Each measured run gets its own interpreter so that its peak RSS is its own and not the high-water
mark of whatever ran before it in the same process (the kernel's VmHWM: `ru_maxrss` would carry the
parent's RSS at the fork over, nufilt_core/peak_memory.py). CPU seconds (user +
system) are printed next to wall seconds because this benchmark often runs on shared machines,
where wall time mostly measures the neighbours.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from nufilt_core.peak_memory import peak_rss_bytes

HERE = Path(__file__).resolve().parent
REPORT_PREFIX = "BENCH-RESULT "


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def report(**fields: object) -> None:
    """What a child prints last: one JSON line the parent picks up (a `peak_rss_bytes` field given wins)."""
    print(REPORT_PREFIX + json.dumps({"peak_rss_bytes": peak_rss_bytes(), **fields}), flush=True)


def evict(folders: list[Path]) -> None:
    """Drop these models' weight files from the page cache, so that their next reads hit storage (`--cold`).
    Each is fsynced first: only clean pages can be dropped (a copy written just before has dirty ones)."""
    for folder in folders:
        for f in folder.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        # OpenMP/MKL read these before torch starts; torch.set_num_threads alone leaves MKL's pool as is
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    return env


def run_child(args: list[str], threads: int | None = None, timeout: float | None = None,
              script: str | Path = "worker.py", env: dict[str, str] | None = None) -> dict:
    """Run `python bench/speed/SCRIPT ARGS` (or an absolute SCRIPT, with `env` added) and return its report
    (raises with its stderr on failure)."""
    cmd = [sys.executable, str(HERE / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**child_env(threads), **(env or {})},
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(REPORT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(REPORT_PREFIX):])
