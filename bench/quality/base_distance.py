"""The daemon's different-base check on real fine-tunes and on unrelated same-shape models.

    python -m bench.quality.base_distance        # → bench/results/base-distance.{json,md}

For every fine-tune of the paper presets and `coadapted-heads` found in the stage cache, and for
three models with θ0's names and shapes but unrelated values, the statistic the daemon uses
(`nufilt_core.plausibility`: median over 2-D float tensors of ‖θ_t − θ0‖_F / ‖θ0‖_F) and whether
the default bound (`gate.max_relative_distance`) rejects it. Nothing is trained here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.plausibility import DEFAULT_MAX_RELATIVE_DISTANCE, distance_from_base

from .backbone import base_weights
from .cache import CACHE_DIR, RESULTS_DIR, write_json
from .config import PRESETS
from .finetune import finetune_dir

PRESET_NAMES = ("paper-protocol", "paper-protocol-gentle", "coadapted-heads")


def unrelated_models(base: dict[str, torch.Tensor], seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Same names, shapes and dtypes as θ0, values unrelated to it (each 2-D float tensor changed)."""
    g = torch.Generator().manual_seed(seed)
    mats = [n for n, t in base.items() if t.is_floating_point() and t.dim() == 2]
    fresh, permuted = dict(base), dict(base)
    for n in mats:
        t = base[n]
        fresh[n] = (torch.randn(t.shape, generator=g) * t.std() + t.mean()).to(t.dtype)
        permuted[n] = t.flatten()[torch.randperm(t.numel(), generator=g)].reshape(t.shape)
    # trained weights, but each layer's where the next layer's should be (a sibling-looking model)
    rotated = dict(base)
    layer = [n for n in mats if ".layer.0." in n]
    depth = 1 + max(int(n.split(".layer.")[1].split(".")[0]) for n in mats if ".layer." in n)
    for n in layer:
        names = [n.replace(".layer.0.", f".layer.{i}.") for i in range(depth)]
        for i, name in enumerate(names):
            rotated[name] = base[names[(i + 1) % depth]]
    return {"fresh values (each tensor's mean and std)": fresh, "each tensor's values permuted": permuted,
            "layers rotated by one position": rotated}


def measure(cache: Path, presets: tuple[str, ...] = PRESET_NAMES) -> dict:
    base = Checkpoint.open(base_weights())
    rows = []
    for preset in presets:
        cfg = PRESETS[preset]
        for task in cfg.data.tasks:
            body = finetune_dir(cache, task, cfg.data, cfg.train) / "body"
            if (body / "model.safetensors").exists():
                d = distance_from_base(base, Checkpoint.open(body))
                rows.append({"kind": "fine-tune", "preset": preset, "model": task, "lr": cfg.train.lr_body,
                             **d.as_dict()})
    with tempfile.TemporaryDirectory() as tmp:
        for label, state in unrelated_models(load_file(str(base_weights()))).items():
            path = Path(tmp) / "model.safetensors"
            save_file(state, str(path))
            rows.append({"kind": "unrelated", "preset": "", "model": label, "lr": None,
                         **distance_from_base(base, Checkpoint.open(path)).as_dict()})
    for r in rows:
        r["rejected"] = r["median"] > DEFAULT_MAX_RELATIVE_DISTANCE
    return {"bound": DEFAULT_MAX_RELATIVE_DISTANCE, "rows": rows}


def markdown(result: dict) -> str:
    rows, bound = result["rows"], result["bound"]
    tunes = [r for r in rows if r["kind"] == "fine-tune"]
    others = [r for r in rows if r["kind"] == "unrelated"]
    lines = ["# The different-base check (`gate.max_relative_distance`, default "
             f"{bound}) on the quality benchmark's models", "",
             "Made by `.venv/bin/python -m bench.quality.base_distance` from the fine-tunes in the stage cache.", "",
             "| kind | preset | model | median r | largest r (tensor) | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['preset']} | {r['model']} | {r['median']:.4f} | {r['max']:.4f} "
                     f"(`{r['max_tensor']}`) | {'rejected' if r['rejected'] else 'accepted'} |")
    summary = [f"{len(others)} unrelated models: median r {min(r['median'] for r in others):.3f}–"
               f"{max(r['median'] for r in others):.3f}, {sum(r['rejected'] for r in others)} rejected."]
    if tunes:
        summary.insert(0, f"{len(tunes)} real fine-tunes: median r {min(r['median'] for r in tunes):.4f}–"
                          f"{max(r['median'] for r in tunes):.4f}, {sum(r['rejected'] for r in tunes)} rejected;")
    return "\n".join([*lines, "", " ".join(summary)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality.base_distance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=CACHE_DIR, help="stage cache (default bench/cache)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="where results go")
    args = p.parse_args(argv)
    result = measure(args.cache)
    write_json(args.results / "base-distance.json", result)
    text = markdown(result)
    (args.results / "base-distance.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
