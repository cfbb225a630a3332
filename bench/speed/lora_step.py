"""What a LoRA arrival's step costs against a dense arrival's, on the same base, side by side in one run.

The dense inputs are make_models.py's (base, fine-tunes 1 and 2). Step 1 merges the dense fine-tune 1 (once,
cached); step 2 merges either the dense fine-tune 2 or a LoRA adapter of rank r on every attention and MLP
projection (q/k/v/o_proj, gate/up/down_proj), in PEFT's layout (`adapter_config.json` +
`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`), its update ΔW = (α/r)·B·A
of the size of the dense fine-tune's task vector. Each step 2 runs in a fresh process (worker.py), the two
alternating (ABBA…) `--repeats` times; the medians and the ratio LoRA / dense are printed.

    .venv/bin/python bench/speed/lora_step.py --shape llama-tiny              # smoke run, seconds
    .venv/bin/python bench/speed/lora_step.py --shape llama-1b --repeats 2    # the 1B-class figure

The LoRA step reads the adapter (MBs) instead of a dense model, makes each targeted base tensor from its
factors, and NUFILT's work on τ_t goes through the factors (V̂t from the r × r problem, the adapter loop's
products through L·R); V̂p of the dense merged task vector and the writing stay as they are.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from make_models import CACHE, ensure_models, generator
from measure import add_run_args, run_child, side_by_side
from nufilt_step import engine_args
from profile_cost import first_step
from safetensors.torch import save_file

from nufilt_core.checkpoint import Checkpoint

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(base: Path, dense: Path, folder: Path, rank: int, seed: int) -> Path:
    """A rank-`rank` LoRA adapter of `base` on every projection, in PEFT's layout, each ΔW scaled to the norm of
    the dense fine-tune's task vector of that matrix; written once."""
    if folder.is_dir():
        return folder
    b, d = Checkpoint.open(base), Checkpoint.open(dense)
    tensors = {}
    for name, info in b.tensors.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        d_out, d_in = info.shape
        g = generator(seed, "lora", name)
        a = torch.randn(rank, d_in, generator=g) / math.sqrt(d_in)
        up = torch.randn(d_out, rank, generator=g)
        target = float((d.read(name).float() - b.read(name).float()).norm())
        scale = 2.0  # lora_alpha / r below
        up *= target / float((scale * up @ a).norm())
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(info.torch_dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = up.to(info.torch_dtype)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "adapter_model.safetensors")
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS),
        "base_model_name_or_path": str(base)}, indent=2) + "\n")
    tmp.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--profile", default="plus-iso", help="the lineage's NUFILT profile (default: the daemon's)")
    add_run_args(ap, "arrival")
    args = ap.parse_args(argv)

    models = ensure_models(args.shape, 2, args.seed)
    work = CACHE / f"{args.shape}-s{args.seed}"
    adapter = write_adapter(models["base"], models["ft-2"], work / f"lora-r{args.rank}", args.rank, args.seed)
    first = first_step(models, work, args.profile, args.threads)
    arrivals = {"dense": models["ft-2"], "lora": adapter}
    runs: dict[str, list[dict]] = {k: [] for k in arrivals}
    for r in range(args.repeats):
        for kind in arrivals if r % 2 == 0 else list(arrivals)[::-1]:
            out = work / f"merged-2-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            runs[kind].append(run_child(engine_args(models["base"], arrivals[kind], out, first, "cpu", []),
                                        args.threads))
            shutil.rmtree(out, ignore_errors=True)
    print(f"{args.shape} step 2 ({args.profile}), LoRA rank {args.rank} on {', '.join(PROJECTIONS)}; "
          f"{args.threads} thread(s), {args.repeats} run(s) each, alternating:")
    med, ratio = side_by_side(runs, "dense", "lora")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": med, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
