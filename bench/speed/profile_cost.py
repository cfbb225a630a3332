"""What a NUFILT profile costs against the paper's, one engine step side by side in one run.

The inputs are nufilt_step.py's (make_models.ensure_models). Each profile gets its own lineage: step 1
(once, cached under bench/cache/) is made with `--option profile=P`, and step 2 inherits the lineage's
settings, as the daemon's steps do. Step 2 of each profile runs in a fresh process, alternating
(ABBA…, so a drift in the neighbours' load falls on both) `--repeats` times; the medians and the
ratios to the paper's profile are printed.

    .venv/bin/python bench/speed/profile_cost.py                       # plus-iso against paper, ViT-B/32
    .venv/bin/python bench/speed/profile_cost.py --profile plus --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from make_models import CACHE, ensure_models
from measure import run_child
from nufilt_step import engine_args

FIGURES = ("seconds", "cpu_seconds", "peak_rss_bytes")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="plus-iso", help="the profile measured against the paper's (plus, plus-iso)")
    ap.add_argument("--shape", default="vit-b-32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="step-2 runs of each profile")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    models = ensure_models(args.shape, 2, args.seed)
    work = CACHE / f"{args.shape}-s{args.seed}"
    profiles = ["paper", args.profile]
    firsts = {p: work / f"merged-1-profile-{p}" for p in profiles}
    for p, first in firsts.items():
        if not first.exists():
            print(f"step 1 of the {p} lineage (once): {first}", file=sys.stderr)
            run_child(engine_args(models["base"], models["ft-1"], first, None, "cpu", [f"profile={p}"]),
                      args.threads)
    outs = {p: work / f"merged-2-profile-{p}" for p in profiles}
    runs: dict[str, list[dict]] = {p: [] for p in profiles}
    for r in range(args.repeats):
        for p in profiles if r % 2 == 0 else profiles[::-1]:
            step = engine_args(models["base"], models["ft-2"], outs[p], firsts[p], "cpu", [])
            runs[p].append(run_child(step, args.threads))
    med = {p: {k: statistics.median(x[k] for x in rs) for k in FIGURES} for p, rs in runs.items()}
    print(f"{args.shape} step 2, {args.threads} thread(s), {args.repeats} run(s) each, alternating:")
    print(f"  {'profile':<10}{'wall s':>9}{'CPU s':>9}{'peak RSS GB':>13}   runs (wall / CPU)")
    for p, m in med.items():
        each = ", ".join(f"{x['seconds']:.1f}/{x['cpu_seconds']:.1f}" for x in runs[p])
        print(f"  {p:<10}{m['seconds']:>9.1f}{m['cpu_seconds']:>9.1f}{m['peak_rss_bytes'] / 1e9:>13.2f}   {each}")
    ratio = {k: med[args.profile][k] / med["paper"][k] for k in FIGURES}
    print(f"  {args.profile}/paper: wall {ratio['seconds']:.2f}x, CPU {ratio['cpu_seconds']:.2f}x, "
          f"peak RSS {ratio['peak_rss_bytes']:.2f}x")
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": med, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
