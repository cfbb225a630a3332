"""Measuring a run in a fresh child process: wall seconds, CPU seconds and peak RSS.

Each measured run gets its own interpreter so that its peak RSS is its own and not the high-water
mark of whatever ran before it in the same process (the kernel's VmHWM: `ru_maxrss` would carry the
parent's RSS at the fork over, nufilt_core/peak_memory.py). CPU seconds (user +
system) are printed next to wall seconds because this benchmark often runs on shared machines,
where wall time mostly measures the neighbours.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


FIGURES = ("seconds", "cpu_seconds", "peak_rss_bytes")


def side_by_side(runs: dict[str, list[dict]], reference: str, other: str) -> tuple[dict, dict]:
    """Print the medians of each side's runs (and the runs) and the ratios other / reference; return both."""
    med = {side: {k: statistics.median(x[k] for x in rs) for k in FIGURES} for side, rs in runs.items()}
    print(f"  {'':<10}{'wall s':>9}{'CPU s':>9}{'peak RSS GB':>13}   runs (wall / CPU)")
    for side, m in med.items():
        each = ", ".join(f"{x['seconds']:.1f}/{x['cpu_seconds']:.1f}" for x in runs[side])
        print(f"  {side:<10}{m['seconds']:>9.1f}{m['cpu_seconds']:>9.1f}{m['peak_rss_bytes'] / 1e9:>13.2f}   {each}")
    ratio = {k: med[other][k] / med[reference][k] for k in FIGURES}
    print(f"  {other}/{reference}: wall {ratio['seconds']:.2f}x, CPU {ratio['cpu_seconds']:.2f}x, "
          f"peak RSS {ratio['peak_rss_bytes']:.2f}x")
    return med, ratio


def add_run_args(ap: argparse.ArgumentParser, each: str) -> None:
    """The options of a side-by-side comparison of steps: --seed, --threads, --repeats (runs of `each`), --json."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help=f"step-2 runs of each {each}")
    ap.add_argument("--json", type=Path, help="also write the figures here")

