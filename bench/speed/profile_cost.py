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
import sys
from pathlib import Path

from make_models import CACHE, ensure_models
from measure import add_run_args, run_child, side_by_side
from nufilt_step import engine_args

from nufilt_core.lineage import LineageRecord
from nufilt_core.methods.nufilt import NufiltSettings


def first_step(models: dict[str, Path], work: Path, profile: str, threads: int) -> Path:
    """Step 1 of a lineage with NUFILT profile `profile` (fine-tune 1 into the base), made once under `work`."""
    first = work / f"merged-1-profile-{profile}"
    if first.exists() and LineageRecord.read(first).settings != NufiltSettings(profile=profile).model_dump(mode="json"):
        shutil.rmtree(first)  # made by a version whose profile differed: its lineage would go on with those settings
    if not first.exists():
        print(f"step 1 of the {profile} lineage (once): {first}", file=sys.stderr)
        run_child(engine_args(models["base"], models["ft-1"], first, None, "cpu", [f"profile={profile}"]), threads)
    return first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="plus-iso", help="the profile measured against the paper's (plus, plus-iso)")
    ap.add_argument("--shape", default="vit-b-32")
    add_run_args(ap, "profile")
    args = ap.parse_args(argv)

    models = ensure_models(args.shape, 2, args.seed)
    work = CACHE / f"{args.shape}-s{args.seed}"
    profiles = ["paper", args.profile]
    firsts = {p: first_step(models, work, p, args.threads) for p in profiles}
    outs = {p: work / f"merged-2-profile-{p}" for p in profiles}
    runs: dict[str, list[dict]] = {p: [] for p in profiles}
    for r in range(args.repeats):
        for p in profiles if r % 2 == 0 else profiles[::-1]:
            step = engine_args(models["base"], models["ft-2"], outs[p], firsts[p], "cpu", [])
            runs[p].append(run_child(step, args.threads))
    print(f"{args.shape} step 2, {args.threads} thread(s), {args.repeats} run(s) each, alternating:")
    med, ratio = side_by_side(runs, "paper", args.profile)
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": med, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
