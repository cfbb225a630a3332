"""One engine step from two versions of the code, side by side in one run, so each change is measured.

The inputs are nufilt_step.py's (make_models.ensure_models and the engine's step-1 output). `--before REV`
is exported from git (`git archive REV nufilt_core bench/speed`) into a temporary folder; `--after` is the
working tree, or another REV. Each version runs `worker.py engine` (step 2) in a fresh process with its own
code first on the import path, alternating before/after `--repeats` times (ABBA…, so a drift in the
neighbours' load falls on both); the medians and the after/before ratios are printed, with the relative
difference of the two outputs (and whether their bytes are equal). `--cold` evicts the three inputs from
the page cache before each run (posix_fadvise DONTNEED on the files: only these files, nothing else on the
machine), so the step reads them from the disk.

    .venv/bin/python bench/speed/ab_step.py --before HEAD~1                # this change against the last commit
    .venv/bin/python bench/speed/ab_step.py --before a709784~1 --repeats 3  # everything since a709784
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from compare import relative_difference
from make_models import CACHE, ensure_models
from measure import HERE, evict, run_child
from nufilt_step import engine_args

from nufilt_core.lineage import LineageRecord

REPO = HERE.parents[1]


def export(rev: str, into: Path) -> Path:
    """The engine and this folder as they are at `rev`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "nufilt_core", "bench/speed"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="git revision of the 'before' code")
    ap.add_argument("--after", help="git revision of the 'after' code (default: the working tree)")
    ap.add_argument("--shape", default="vit-b-32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each version")
    ap.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before each run")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    models = ensure_models(args.shape, 2, args.seed)
    work = CACHE / f"{args.shape}-s{args.seed}"
    merged1 = work / "merged-1"
    if not merged1.exists():
        run_child(engine_args(models["base"], models["ft-1"], merged1, None, "cpu", []), args.threads)
    inputs = [models["base"], merged1, models["ft-2"]]
    with tempfile.TemporaryDirectory(prefix="nufilt-ab-") as tmp:
        trees = {"before": export(args.before, Path(tmp) / "before"),
                 "after": export(args.after, Path(tmp) / "after") if args.after else REPO}
        outs = {side: work / f"merged-2-ab-{side}" for side in trees}
        runs: dict[str, list[dict]] = {side: [] for side in trees}
        order = [("before", "after"), ("after", "before")]
        for r in range(args.repeats):
            for side in order[r % 2]:
                if args.cold:
                    evict(inputs)
                step = engine_args(models["base"], models["ft-2"], outs[side], merged1, "cpu", [])
                runs[side].append(run_child(step, args.threads, script=trees[side] / "bench/speed/worker.py",
                                            env={"PYTHONPATH": str(trees[side])}))
    med = {side: {k: statistics.median(x[k] for x in rs) for k in ("seconds", "cpu_seconds", "peak_rss_bytes")}
           for side, rs in runs.items()}
    diff = relative_difference(outs["after"], outs["before"], previous=merged1)
    same = LineageRecord.read(outs["after"]).model_sha256 == LineageRecord.read(outs["before"]).model_sha256
    print(f"{args.shape} step 2, {args.threads} thread(s), {args.repeats} run(s) each, alternating"
          f"{', inputs evicted from the page cache before each run' if args.cold else ''}:")
    print(f"  {'':<8}{'wall s':>9}{'CPU s':>9}{'peak RSS GB':>13}   runs (wall / CPU)")
    for side, m in med.items():
        each = ", ".join(f"{x['seconds']:.1f}/{x['cpu_seconds']:.1f}" for x in runs[side])
        print(f"  {side:<8}{m['seconds']:>9.1f}{m['cpu_seconds']:>9.1f}{m['peak_rss_bytes'] / 1e9:>13.2f}   {each}")
    ratio = {k: med["after"][k] / med["before"][k] for k in ("seconds", "cpu_seconds", "peak_rss_bytes")}
    print(f"  after/before: wall {ratio['seconds']:.2f}x, CPU {ratio['cpu_seconds']:.2f}x, peak RSS "
          f"{ratio['peak_rss_bytes']:.2f}x (before = {args.before}, after = {args.after or 'working tree'})")
    print(f"  outputs: {'the same bytes' if same else 'different bytes'}; relative difference over the "
          f"{diff.tensors} float tensors: weights {diff.weights_max:.1e} (max), this step's update "
          f"{diff.update_max:.1e} (max)")
    for side in outs:
        shutil.rmtree(outs[side], ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": med, "ratio": ratio, "same_bytes": same,
                                         "difference": diff.__dict__}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
