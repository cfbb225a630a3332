"""Speed and memory of one NUFILT step (step 2) through the real engine, next to a straightforward implementation.

Inputs (written once under bench/cache/, see make_models.py): a CLIP-ViT-shaped base θ0, two
fine-tunes, and the engine's step-1 output (θ_1^m). Then, each in a fresh process:
  engine      nufilt_core.merge.merge_step(base, previous = θ_1^m, checkpoint = θ_2)
  reference   bench/speed/reference_nufilt.py on the same three inputs (paper's loop structure,
              or the published code's with --reference published)
and the relative difference of their merged filtered matrices (compare.py).

    .venv/bin/python bench/speed/nufilt_step.py --shape vit-b-32 --threads 1
    .venv/bin/python bench/speed/nufilt_step.py --shape vit-l-14 --reference none
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compare import relative_difference
from make_models import CACHE, ensure_models
from measure import run_child

TARGET_SPEEDUP = 3.0
TARGET_REL_DIFF = 1e-3
TARGET_RSS_BYTES = 1.5e9


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def engine_args(base: Path, ckpt: Path, out: Path, previous: Path | None, device: str,
                options: list[str]) -> list[str]:
    args = ["engine", "--base", str(base), "--checkpoint", str(ckpt), "--output", str(out),
            "--device", device, "--overwrite"]
    if previous:
        args += ["--previous", str(previous)]
    elif not any(o.startswith("profile=") for o in options):
        # a new lineage: the paper's NUFILT, the step reference_nufilt.py computes and the figures here measure
        # (a later step inherits it); `--option profile=plus-iso` measures the default
        options = ["profile=paper", *options]
    for opt in options:
        args += ["--option", opt]
    return args


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="vit-b-32", help="vit-b-32, vit-b-16, vit-l-14, vit-tiny")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic models")
    ap.add_argument("--threads", type=int, help="CPU threads for both runs (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="the engine's --device (the reference runs on the CPU)")
    ap.add_argument("--reference", choices=["paper", "published", "both", "none"], default="paper")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="NUFILT setting for the chain, e.g. iters=5 (the reference keeps the paper's)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    models = ensure_models(args.shape, 2, args.seed)
    work = CACHE / f"{args.shape}-s{args.seed}"
    tag = "" if not args.option else "-" + "-".join(o.replace("=", "") for o in args.option)
    merged1 = work / f"merged-1{tag}"
    if not merged1.exists():
        print(f"step 1 (engine, once): {merged1}", file=sys.stderr)
        run_child(engine_args(models["base"], models["ft-1"], merged1, None, "cpu", args.option), args.threads)
    inputs = sum(folder_bytes(p) for p in (models["base"], merged1, models["ft-2"]))
    print(f"shape {args.shape}: base + previous + checkpoint = {gb(inputs)} on disk; threads "
          f"{args.threads or 'default'}")

    results: dict[str, dict] = {}
    ours = work / f"merged-2{tag}-{args.device.replace(':', '')}"
    results["engine"] = run_child(engine_args(models["base"], models["ft-2"], ours, merged1, args.device, []),
                                  args.threads)
    variants = {"both": ["paper", "published"], "none": []}.get(args.reference, [args.reference])
    for variant in variants:
        ref_file = work / f"reference-2-{variant}.safetensors"
        results[variant] = run_child(["reference", "--base", str(models["base"]), "--previous", str(merged1),
                                      "--checkpoint", str(models["ft-2"]), "--output", str(ref_file),
                                      "--variant", variant], args.threads)
        diff = relative_difference(ours, ref_file, previous=merged1)
        results[variant]["difference"] = diff.__dict__

    eng = results["engine"]
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in eng["phases"].items())
    print(f"{'run':<22}{'wall s':>9}{'CPU s':>9}{'peak RSS':>11}")
    for key, r in results.items():
        name = "engine" if key == "engine" else f"reference ({key})"
        print(f"{name:<22}{r['seconds']:>9.1f}{r['cpu_seconds']:>9.1f}{gb(r['peak_rss_bytes']):>11}")
    print(f"engine phases: {phases}; device {eng['device']}")
    ok = eng["peak_rss_bytes"] < TARGET_RSS_BYTES
    print(f"engine peak RSS {gb(eng['peak_rss_bytes'])} < 1.5 GB: {verdict(ok)}")
    for variant in variants:
        r, d = results[variant], results[variant]["difference"]
        speed_wall, speed_cpu = r["seconds"] / eng["seconds"], r["cpu_seconds"] / eng["cpu_seconds"]
        r["speedup_wall"], r["speedup_cpu"] = speed_wall, speed_cpu
        print(f"vs reference ({variant}): speed-up {speed_wall:.1f}x wall, {speed_cpu:.1f}x CPU "
              f"(>= {TARGET_SPEEDUP:g}x: {verdict(min(speed_wall, speed_cpu) >= TARGET_SPEEDUP)})")
        print(f"  relative difference over {d['tensors']} filtered matrices: weights {d['weights']:.2e} "
              f"(max {d['weights_max']:.2e}), this step's update {d['update']:.2e} (max {d['update_max']:.2e}, "
              f"{d['update_worst']}) (max <= 1e-3: {verdict(d['weights_max'] <= TARGET_REL_DIFF)})")
        ok = ok and min(speed_wall, speed_cpu) >= TARGET_SPEEDUP and d["weights_max"] <= TARGET_REL_DIFF
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "input_bytes": inputs, "threads": args.threads,
                                         **results}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
