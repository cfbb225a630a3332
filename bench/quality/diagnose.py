"""Per step and per layer figures of a NUFILT chain, replayed in memory, to see where the merge loses accuracy.

For every filtered matrix at every step t of one task order, with the settings given:
  ‖τ_t‖, ‖τ_{≤t-1}‖ and ‖τ_{≤t}‖ (the merged task vector after the step), so the merged vector's
  size can be read against the individual ones;
  filter share = ‖τ_t V̂p‖² / ‖τ_t‖²: the share of the new task vector's energy the filter removes;
  adapter energy ‖τ_t B A‖² and its part inside span([V̂t, V̂p]) (the loss only sees that part);
  r_p / d_in (k_p, the directions actually filtered, over the input width);
  cos(τ_t, τ_{≤t-1}): how much the new task vector overlaps the merged one.
Sums over matrices give the per-step rows; the per-kind rows (query, key, value, attention
output, intermediate) average the shares over the steps ≥ 2 of the order.

    python -m bench.quality.diagnose --preset paper-protocol --order 0 [--tasks a,b] [--set key=value]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.methods.nufilt import NufiltSettings, adapter_init, nufilt_matrix
from nufilt_core.selection import Selection

KINDS = (("query", r"self\.query"), ("key", r"self\.key"), ("value", r"self\.value"),
         ("attn_out", r"attention\.output\.dense"), ("intermediate", r"intermediate\.dense"),
         ("ffn_out", r"\d\.output\.dense"))


def kind_of(name: str) -> str:
    return next((k for k, rx in KINDS if re.search(rx, name)), "other")


def matrix_figures(w0: torch.Tensor, prev: torch.Tensor, new: torch.Tensor, name: str, step: int, seed: int,
                   s: NufiltSettings) -> tuple[torch.Tensor, dict[str, float]]:
    """One NUFILT matrix step and its figures; returns the new merged weight too."""
    tau_prev, tau_new = prev - w0, new - w0
    r = nufilt_matrix(tau_prev, tau_new, adapter_init(s.lora_rank, w0.shape[1], seed, name, step), s)
    adapter = tau_new @ r.b @ r.a
    span = torch.cat([r.v_new, r.v_prev], dim=1)
    q = torch.linalg.qr(span).Q if span.shape[1] else span
    inside = float((adapter @ q).square().sum())
    merged = prev + r.update
    e_new = float(tau_new.square().sum())
    return merged, {
        "new_sq": e_new, "prev_sq": float(tau_prev.square().sum()),
        "merged_sq": float((merged - w0).square().sum()),
        "filtered_sq": float((tau_new @ r.v_prev).square().sum()),
        "adapter_sq": float(adapter.square().sum()), "adapter_inside_sq": inside,
        "dot": float((tau_new * tau_prev).sum()),
        "k_p": r.v_prev.shape[1], "d_in": w0.shape[1],
    }


def diagnose(base: Path, checkpoints: dict[str, Path], order: list[str], s: NufiltSettings,
             seed: int = 0) -> dict[str, Any]:
    w0s = load_file(str(base))
    sel = Selection.resolve(list(w0s), s.include, s.preset)
    names = [n for n, v in w0s.items() if v.is_floating_point() and sel.is_filtered(n, tuple(v.shape))]
    w0s = {n: w0s[n].float() for n in names}
    merged = {n: w0s[n].clone() for n in names}
    steps, per_kind = [], defaultdict(lambda: defaultdict(list))
    base_checkpoint = Checkpoint.open(base)
    for t, task in enumerate(order, 1):
        theta = Checkpoint.open(checkpoints[task])  # a model folder, or an adapter made per tensor
        base_checkpoint.check_same_layout(theta, "checkpoint")
        rows = {}
        for n in names:
            merged[n], rows[n] = matrix_figures(w0s[n], merged[n], theta.model_tensor(n, base_checkpoint).float(),
                                                n, t, seed, s)
        tot = {k: sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
        steps.append({
            "step": t, "task": task,
            "new_norm": math.sqrt(tot["new_sq"]), "prev_norm": math.sqrt(tot["prev_sq"]),
            "merged_norm": math.sqrt(tot["merged_sq"]),
            "filter_share": tot["filtered_sq"] / tot["new_sq"],
            "adapter_share": tot["adapter_sq"] / tot["new_sq"],
            "adapter_inside_share": tot["adapter_inside_sq"] / tot["adapter_sq"] if tot["adapter_sq"] else None,
            "cos_new_prev": tot["dot"] / math.sqrt(tot["new_sq"] * tot["prev_sq"]) if tot["prev_sq"] else None,
            "rp_over_din": tot["k_p"] / tot["d_in"],
        })
        if t > 1:
            for n, r in rows.items():
                k = per_kind[kind_of(n)]
                k["filter_share"].append(r["filtered_sq"] / r["new_sq"])
                k["rp_over_din"].append(r["k_p"] / r["d_in"])
                k["merged_over_new"].append(math.sqrt(r["merged_sq"] / r["new_sq"]))
                k["adapter_inside_share"].append(r["adapter_inside_sq"] / r["adapter_sq"] if r["adapter_sq"] else 0.0)
    norms = [st["new_norm"] for st in steps]
    for st, n in zip(steps, range(1, len(steps) + 1), strict=True):
        st["merged_over_mean_individual"] = st["merged_norm"] / (sum(norms[:n]) / n)
    kinds = {k: {f: sum(v) / len(v) for f, v in figs.items()} for k, figs in per_kind.items()}
    return {"order": order, "settings": s.model_dump(mode="json"), "matrices": len(names), "steps": steps,
            "per_kind": kinds}


def markdown(d: dict[str, Any]) -> str:
    lines = ["| step | task | ‖τ_t‖ | ‖τ_≤t‖ | ‖τ_≤t‖ / mean ‖τ_i‖ | filter removes | adapter ‖τBA‖²/‖τ‖² "
             "| adapter inside span | cos(τ_t, τ_≤t−1) | r_p/d_in |", "|" + "---|" * 10]
    for s in d["steps"]:
        def f(x: float | None, fmt: str = "{:.2f}") -> str:
            return "–" if x is None else fmt.format(x)
        lines.append(f"| {s['step']} | {s['task']} | {s['new_norm']:.2f} | {s['merged_norm']:.2f} | "
                     f"{s['merged_over_mean_individual']:.2f} | {f(s['filter_share'], '{:.0%}')} | "
                     f"{f(s['adapter_share'], '{:.1e}')} | {f(s['adapter_inside_share'], '{:.0%}')} | "
                     f"{f(s['cos_new_prev'])} | {s['rp_over_din']:.2f} |")
    lines += ["", "| matrices | filter removes | r_p/d_in | ‖τ_≤t‖/‖τ_t‖ | adapter inside span |",
              "|---|---|---|---|---|"]
    for k, v in d["per_kind"].items():
        lines.append(f"| {k} | {v['filter_share']:.0%} | {v['rp_over_din']:.2f} | {v['merged_over_new']:.2f} | "
                     f"{v['adapter_inside_share']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .backbone import base_weights
    from .cache import CACHE_DIR
    from .config import PRESETS
    from .finetune import finetune_dir
    from .merging import task_order

    p = argparse.ArgumentParser(prog="python -m bench.quality.diagnose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper-protocol")
    p.add_argument("--tasks", help="comma-separated subset of the preset's tasks")
    p.add_argument("--order", type=int, default=0, help="task order v (random.seed(42 + v) shuffle)")
    p.add_argument("--cache", type=Path, default=CACHE_DIR)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a NUFILT setting, e.g. null_rank=64")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    cfg = PRESETS[args.preset]
    tasks = args.tasks.split(",") if args.tasks else list(cfg.data.tasks)
    dirs = {t: finetune_dir(args.cache, t, cfg.data, cfg.train) for t in tasks}
    missing = [t for t, d in dirs.items() if not (d / "metrics.json").exists()]
    if missing:
        print(f"error: fine-tune(s) not built yet: {', '.join(missing)} (run python -m bench.quality "
              f"--preset {args.preset} --stage finetune)", file=sys.stderr)
        return 1
    options = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    torch.set_num_threads(1)
    d = diagnose(base_weights(), {t: dirs[t] / "body" for t in tasks}, task_order(tasks, args.order),
                 NufiltSettings(**{"profile": "paper", **options}))  # the filter alone: the paper's step
    print(markdown(d))
    if args.json:
        args.json.write_text(json.dumps(d, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
