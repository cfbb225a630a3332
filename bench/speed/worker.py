"""Child process of the speed benchmark: runs one merge step and reports its time and peak RSS.

    worker.py engine    --base B [--previous P] --checkpoint C --output DIR  [--device D] [--timeline]
                        [--profile STATS [--clock cpu|wall]]
    worker.py reference --base B --previous P --checkpoint C --output FILE [--variant paper|published]

The engine runs through `nufilt_core.merge.merge_step` exactly as `nufilt merge` does (checks,
hashing, streaming, atomic write); the reference loads everything, computes, and saves the
merged filtered matrices with `safetensors.torch.save_file`. Both report wall and CPU seconds
from just before the inputs are opened to just after the output is on disk. `--timeline` adds one
row per tensor of the engine's progress: phase, name, seconds since the step began, and the peak
RSS while that tensor was processed (llm_step.py turns them into time and memory per layer).
`--profile` runs the step under cProfile and writes its stats (profile_step.py reads them).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from measure import cpu_seconds, peak_rss_bytes, report

from nufilt_core.cli import parse_assignment  # loads the engine too (the reference loads it anyway)
from nufilt_core.merge import MergeRequest, Progress, merge_step


class Timeline:
    """The engine's progress, one row per tensor: [phase, name, seconds since the step began, peak RSS bytes
    since the previous row]. After each reading the kernel's high-water mark is reset ("5" into
    /proc/self/clear_refs), so a row's peak is its own tensor's, not the step's so far. That reset also
    lowers the process's peak (nufilt_core.peak_memory), so the step's peak is kept here (`peak`), and the
    lineage record's peak_rss_bytes of a run with --timeline under-reports."""

    def __init__(self) -> None:
        self.rows: list[list[object]] = []
        self.peak = peak_rss_bytes()  # imports and opening, before the first reset
        self.resets = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:  # not Linux, or not allowed: rows then hold the running peak
            return False

    def __call__(self, p: Progress) -> None:
        hwm = peak_rss_bytes()
        self.peak = max(self.peak, hwm)
        self.rows.append([p.phase, p.name, round(p.elapsed, 4), hwm])
        if self.resets:
            self._reset()

    def final_peak(self) -> int:
        return max(self.peak, peak_rss_bytes())  # the end of the step (index, lineage record) since the last row


def run_engine(args: argparse.Namespace) -> None:
    if args.overwrite and args.output.exists():
        shutil.rmtree(args.output)
    # as `nufilt merge --threads N`: the threads the parent gave (OMP_NUM_THREADS, else every core) are the workers
    req = MergeRequest(base=args.base, previous=args.previous, checkpoint=args.checkpoint, output=args.output,
                       device=args.device, seed=args.seed, options=dict(args.option), workers=torch.get_num_threads())
    timeline = Timeline() if args.timeline else None
    profiler = None
    if args.profile:  # profile_step.py groups these by function; the thread's CPU clock ignores the neighbours
        profiler = cProfile.Profile(time.thread_time if args.clock == "cpu" else time.perf_counter)
    t0, c0, m0 = time.perf_counter(), cpu_seconds(), time.thread_time()
    if profiler:
        profiler.enable()
    result = merge_step(req, timeline)
    if profiler:
        profiler.disable()
    wall, cpu, main_cpu = time.perf_counter() - t0, cpu_seconds() - c0, time.thread_time() - m0
    if profiler:
        profiler.dump_stats(args.profile)
    extra: dict[str, object] = {}
    if timeline:
        extra |= {"timeline": timeline.rows, "peak_rss_bytes": timeline.final_peak(),
                  "per_tensor_peaks": timeline.resets}
    if result.record.device.startswith("cuda"):
        extra["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    report(role="engine", seconds=wall, cpu_seconds=cpu, main_thread_cpu_seconds=main_cpu, phases=result.seconds,
           device=result.record.device, step=result.record.step, threads=torch.get_num_threads(),
           summary=result.record.summary, **extra)


def run_reference(args: argparse.Namespace) -> None:
    from reference_nufilt import reference_step
    from safetensors.torch import save_file

    t0, c0 = time.perf_counter(), cpu_seconds()
    merged = reference_step(args.base, args.previous, args.checkpoint, seed=args.seed, step=args.step,
                            variant=args.variant)
    tmp = args.output.with_name(f".{args.output.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp))
    os.replace(tmp, args.output)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    report(role=f"reference-{args.variant}", seconds=wall, cpu_seconds=cpu, tensors=len(merged),
           threads=torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="role", required=True)
    for role in ("engine", "reference"):
        p = sub.add_parser(role)
        p.add_argument("--base", type=Path, required=True)
        p.add_argument("--previous", type=Path, required=role == "reference")
        p.add_argument("--checkpoint", type=Path, required=True)
        p.add_argument("--output", type=Path, required=True)
        p.add_argument("--seed", type=int, default=0)
    eng = sub.choices["engine"]
    eng.add_argument("--device", default="cpu")
    eng.add_argument("--overwrite", action="store_true")
    eng.add_argument("--timeline", action="store_true", help="report time and peak RSS per tensor")
    eng.add_argument("--profile", type=Path, help="run the step under cProfile and write its stats here")
    eng.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                     help="--profile's clock: this thread's CPU time, or wall time")
    eng.add_argument("--option", action="append", type=parse_assignment, default=[], metavar="KEY=VALUE",
                     help="a NUFILT setting, e.g. iters=5 (step 1 only; later steps inherit)")
    ref = sub.choices["reference"]
    ref.add_argument("--step", type=int, default=2, help="1-based index of the checkpoint being merged")
    ref.add_argument("--variant", choices=["paper", "published"], default="paper")
    args = ap.parse_args(argv)
    (run_engine if args.role == "engine" else run_reference)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
