"""Child process of the speed benchmark: runs one merge step and reports its time and peak RSS.

    worker.py engine    --base B [--previous P] --checkpoint C --output DIR  [--device D]
    worker.py reference --base B --previous P --checkpoint C --output FILE [--variant paper|published]

The engine runs through `nufilt_core.merge.merge_step` exactly as `nufilt merge` does (checks,
hashing, streaming, atomic write); the reference loads everything, computes, and saves the
merged filtered matrices with `safetensors.torch.save_file`. Both report wall and CPU seconds
from just before the inputs are opened to just after the output is on disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from measure import cpu_seconds, report


def run_engine(args: argparse.Namespace) -> None:
    from nufilt_core.merge import MergeRequest, merge_step

    if args.overwrite and args.output.exists():
        shutil.rmtree(args.output)
    req = MergeRequest(base=args.base, previous=args.previous, checkpoint=args.checkpoint, output=args.output,
                       device=args.device, seed=args.seed, options=dict(args.option))
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = merge_step(req)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    extra = {}
    if result.record.device.startswith("cuda"):
        extra["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    report(role="engine", seconds=wall, cpu_seconds=cpu, phases=result.seconds, device=result.record.device,
           step=result.record.step, threads=torch.get_num_threads(), summary=result.record.summary, **extra)


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


def parse_option(text: str) -> tuple[str, int | float]:
    key, _, value = text.partition("=")
    return key, float(value) if "." in value or "e" in value else int(value)


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
    eng.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                     help="a NUFILT setting, e.g. iters=5 (step 1 only; later steps inherit)")
    ref = sub.choices["reference"]
    ref.add_argument("--step", type=int, default=2, help="1-based index of the checkpoint being merged")
    ref.add_argument("--variant", choices=["paper", "published"], default="paper")
    args = ap.parse_args(argv)
    (run_engine if args.role == "engine" else run_reference)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
