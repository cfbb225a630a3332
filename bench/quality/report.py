"""Stage 4: results JSON, Markdown tables and the per-step plot, from the cached order records.

Only numbers leave bench/cache/: accuracies, times, settings. Normalised accuracy is the mean
over tasks of merged / individual; the share of the gap kept is (ACC − θ0) / (individual − θ0)
on the task means (per task too, in `per_task_gap_kept`).
"""

from __future__ import annotations

import json
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .cache import write_json
from .config import BenchConfig
from .merging import arrival_task
from .metrics import acc, bwt, final_acc, mean_std, round_accs, seen_curve
from .variants import Variant


def references(metrics: dict[str, dict]) -> dict[str, Any]:
    probe = {t: m["probe_acc"] for t, m in metrics.items()}
    ind = {t: m["finetune_acc"] for t, m in metrics.items()}
    gap = {t: ind[t] - probe[t] for t in metrics}
    return {
        "theta0_heads": {"per_task": probe, "mean": statistics.fmean(probe.values())},
        "individual": {"per_task": ind, "mean": statistics.fmean(ind.values())},
        "gap": {"per_task": gap, "mean": statistics.fmean(gap.values())},
        "finetune": {t: {k: m[k] for k in ("n_train", "n_test", "classes", "steps", "seconds")}
                     for t, m in metrics.items()},
    }


def summarise(variant: Variant, records: list[dict], refs: dict[str, Any]) -> dict[str, Any]:
    tasks = list(refs["individual"]["per_task"])
    accs, bwts = [acc(r) for r in records], [bwt(r) for r in records]
    per_task = {t: statistics.fmean(final_acc(r)[t] for r in records) for t in tasks}
    probe, ind = refs["theta0_heads"]["per_task"], refs["individual"]["per_task"]
    acc_mean, acc_std = mean_std(accs)
    bwt_mean, bwt_std = mean_std(bwts)
    gap = refs["individual"]["mean"] - refs["theta0_heads"]["mean"]
    curves = [c for c in (seen_curve(r) for r in records) if c]
    step_seconds = [s["merge_seconds"] for r in records for s in r["steps"]]
    return {
        "method": variant.method, "options": variant.options, "group": variant.group, "label": variant.label,
        "orders": len(records), "acc_mean": acc_mean, "acc_std": acc_std, "bwt_mean": bwt_mean, "bwt_std": bwt_std,
        "per_task": per_task,
        "normalised_acc": statistics.fmean(100 * per_task[t] / ind[t] for t in tasks),
        "gap_kept": 100 * (acc_mean - refs["theta0_heads"]["mean"]) / gap if gap else float("nan"),
        "per_task_gap_kept": {t: (100 * (per_task[t] - probe[t]) / (ind[t] - probe[t]) if ind[t] != probe[t]
                                  else None) for t in tasks},
        "merge_seconds_per_step": statistics.fmean(step_seconds) if step_seconds else None,
        "seen_curve": [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))] if curves else None,
        "seen_curve_orders": len(curves),
        "per_order": [{"order_index": r["order_index"], "order": r["order"], "acc": a, "bwt": b}
                      for r, a, b in zip(records, accs, bwts, strict=True)],
        "summary_step_1": records[0]["steps"][0]["summary"] if records else None,
        # ACC after each round of a long stream (one value, the final ACC, otherwise)
        "round_acc_mean": [statistics.fmean(rs) for rs in zip(*(round_accs(r) for r in records), strict=True)],
    }


def settings_study(nufilt_records: list[dict], settings: dict[str, tuple[Variant, list[dict]]]) -> dict[str, Any]:
    """Each settings variant against default NUFILT on the same orders."""
    out = {}
    for name, (variant, records) in settings.items():
        idx = {r["order_index"] for r in records}
        base = [r for r in nufilt_records if r["order_index"] in idx]
        if not records or len(base) != len(records):
            continue
        out[name] = {"label": variant.label, "options": variant.options, "orders": sorted(idx),
                     "acc_mean": statistics.fmean(acc(r) for r in records),
                     "bwt_mean": statistics.fmean(bwt(r) for r in records),
                     "default_acc_mean": statistics.fmean(acc(r) for r in base),
                     "default_bwt_mean": statistics.fmean(bwt(r) for r in base),
                     "filtered_tensors": records[0]["steps"][-1]["summary"].get("filtered_tensors")}
        out[name]["acc_delta"] = out[name]["acc_mean"] - out[name]["default_acc_mean"]
    return out


def individual_curve(records: list[dict], refs: dict[str, Any]) -> list[float] | None:
    """Individual fine-tunes' mean accuracy on the seen tasks, for the same orders as the plot."""
    curves = [r["order"] for r in records if r.get("curve")]
    if not curves:
        return None
    ind = refs["individual"]["per_task"]
    # a long stream's later arrivals (T@2) are tasks already seen: each counts once, with its first fine-tune
    return [statistics.fmean(statistics.fmean(ind[t] for t in dict.fromkeys(map(arrival_task, o[:i])))
                             for o in curves)
            for i in range(1, len(curves[0]) + 1)]


def score_points(records: list[dict], refs: dict[str, Any]) -> list[dict[str, float]]:
    """Per step of fully evaluated orders: the gate's scores beside the measured drop and gain."""
    probe = refs["theta0_heads"]["per_task"]
    points = []
    for r in records:
        steps = r["steps"]
        for t, st in enumerate(steps):
            if "scores" not in st:
                continue
            earlier = [s["task"] for s in steps[:t]]
            drop = (statistics.fmean(st["acc"][e] - steps[t - 1]["acc"][e] for e in earlier) if earlier else None)
            points.append({"step": t + 1, "stability": st["scores"]["stability"],
                           "plasticity": st["scores"]["plasticity"], "drop": drop,
                           "gain": st["acc"][st["task"]] - probe[st["task"]]})
    return points


def spearman(xs: list[float], ys: list[float]) -> float | None:
    import pandas as pd

    return float(pd.Series(xs).corr(pd.Series(ys), method="spearman")) if len(xs) > 2 else None


def gate_study(results: dict[str, tuple[Variant, list[dict]]], refs: dict[str, Any]) -> dict[str, Any]:
    """How well the gate's stability / plasticity predict the measured drop / gain (rank correlation),
    over every variant's fully evaluated orders, and thresholds read off the same points."""
    pts = [p for _, (v, recs) in results.items() if v.group != "settings" for p in score_points(recs, refs)]
    later = [p for p in pts if p["drop"] is not None]
    if len(later) < 3:
        return {}
    ok = sorted(p["stability"] for p in later if p["drop"] >= -1.0)
    bad = [p["stability"] for p in later if p["drop"] < -3.0]
    threshold = ok[min(len(ok) - 1, int(0.95 * len(ok)))] if ok else None
    return {
        "points": len(pts), "steps_after_first": len(later),
        "stability_vs_drop": spearman([p["stability"] for p in later], [p["drop"] for p in later]),
        "plasticity_vs_gain": spearman([p["plasticity"] for p in pts], [p["gain"] for p in pts]),
        "stability_threshold": threshold,  # accepts 95 % of the steps that cost earlier tasks ≤ 1 point
        "bad_steps": len(bad), "bad_steps_rejected": sum(b > threshold for b in bad) if threshold is not None else 0,
        "stability_range": [min(p["stability"] for p in later), max(p["stability"] for p in later)],
        "plasticity_range": [min(p["plasticity"] for p in pts), max(p["plasticity"] for p in pts)],
    }


def build(cfg: BenchConfig, metrics: dict[str, dict], results: dict[str, tuple[Variant, list[dict]]],
          out_dir: Path, missing: list[str] | None = None, default_method: dict[str, Any] | None = None,
          diagnosis: dict[str, Any] | None = None) -> dict[str, Any]:
    refs = references(metrics)
    methods = {n: summarise(v, recs, refs) for n, (v, recs) in results.items() if v.group != "settings" and recs}
    settings = {n: vr for n, vr in results.items() if vr[0].group == "settings"}
    nufilt_records = results["nufilt"][1] if "nufilt" in results else []
    report = {
        "name": cfg.name, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "missing_tasks": missing or [],  # fine-tunes not finished when this report was made
        "config": {"data": cfg.data.__dict__, "train": cfg.train.__dict__, "merge": cfg.merge.__dict__},
        "tasks": list(metrics), "references": refs, "methods": methods,
        "settings_study": settings_study(nufilt_records, settings) if nufilt_records else {},
        "default_method": default_method or {},  # what the daemon ships
        "gate_study": gate_study(results, refs),
        "diagnosis": diagnosis or {},
    }
    ind_curve = individual_curve(nufilt_records, refs)
    if ind_curve:
        report["references"]["individual_seen_curve"] = ind_curve
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{cfg.name}.json", report)
    (out_dir / f"{cfg.name}.md").write_text(markdown(report))
    plot(report, out_dir / f"{cfg.name}.png")
    return report


def same_orders_delta(m: dict[str, Any], base: dict[str, Any]) -> float | None:
    """ACC difference against `base` on the orders both ran (a lever screened on fewer orders)."""
    theirs = {o["order_index"]: o["acc"] for o in base["per_order"]}
    mine = [(o["acc"], theirs[o["order_index"]]) for o in m["per_order"] if o["order_index"] in theirs]
    return statistics.fmean(a - b for a, b in mine) if mine else None


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def markdown(r: dict[str, Any]) -> str:
    refs, tasks = r["references"], r["tasks"]
    lines = [f"# Quality benchmark `{r['name']}` ({r['created_at']})", "",
             *([f"**Partial: fine-tunes of {', '.join(r['missing_tasks'])} not finished; no merge results yet.**",
                ""] if r["missing_tasks"] else []),
             *(["**Partial: no task order has finished merging yet; references only.**", ""]
               if not r["missing_tasks"] and not r["methods"] else []),
             "## References per task (test accuracy, %)", "",
             "| task | train / test | classes | θ0 + head (frozen features) | individual fine-tune | gap |",
             "|---|---|---|---|---|---|"]
    for t in tasks:
        ft = refs["finetune"][t]
        lines.append(f"| {t} | {ft['n_train']} / {ft['n_test']} | {ft['classes']} | "
                     f"{_f(refs['theta0_heads']['per_task'][t])} | {_f(refs['individual']['per_task'][t])} | "
                     f"{_f(refs['gap']['per_task'][t], 1)} |")
    lines.append(f"| **mean** | | | {_f(refs['theta0_heads']['mean'])} | {_f(refs['individual']['mean'])} | "
                 f"**{_f(refs['gap']['mean'])}** |")
    main = {n: m for n, m in r["methods"].items() if m["group"] == "method"}
    lines += ["", "## Methods (final model after all tasks; mean ± std over task orders)", "",
              "| method | orders | ACC | BWT | normalised ACC | gap kept | merge s/step |",
              "|---|---|---|---|---|---|---|"]
    for n, m in sorted(main.items(), key=lambda kv: -kv[1]["acc_mean"]):
        lines.append(f"| {n} | {m['orders']} | {_f(m['acc_mean'])} ± {_f(m['acc_std'])} | "
                     f"{_f(m['bwt_mean'])} ± {_f(m['bwt_std'])} | {_f(m['normalised_acc'])} | "
                     f"{_f(m['gap_kept'])} | {_f(m['merge_seconds_per_step'], 2)} |")
    lines += [f"| θ0 + heads | | {_f(refs['theta0_heads']['mean'])} | | | 0 | |",
              f"| individual | | {_f(refs['individual']['mean'])} | | 100 | 100 | |"]
    rounds = r["config"]["merge"].get("rounds", 1)
    streamed = {n: m for n, m in r["methods"].items() if m["group"] in ("method", "lever")}  # with the profiles
    if rounds > 1 and streamed:
        lines += ["", f"## ACC after each round ({len(r['tasks'])} arrivals a round, every task scored; mean over "
                  "orders)", "", "| method | orders | " + " | ".join(f"after round {i + 1}" for i in range(rounds)) +
                  " | last − first | BWT |", "|---|---|" + "---|" * (rounds + 2)]
        for n, m in sorted(streamed.items(), key=lambda kv: -kv[1]["acc_mean"]):
            accs = m["round_acc_mean"]
            lines.append(f"| {n} | {m['orders']} | " + " | ".join(_f(a) for a in accs) +
                         f" | {_f(accs[-1] - accs[0])} | {_f(m['bwt_mean'])} |")
    lines += ["", "## Final per-task accuracy (mean over orders)", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for n, m in r["methods"].items():
        lines.append(f"| {n} | " + " | ".join(_f(m["per_task"][t]) for t in tasks) + " |")
    abl = {n: m for n, m in r["methods"].items() if m["group"] == "ablation" or n == "nufilt"}
    if len(abl) > 1:
        lines += ["", "## NUFILT ablation (the paper's Table 4)", "", "| component | orders | ACC | BWT |",
                  "|---|---|---|---|"]
        for n in ("naive", "nufilt_null_only", "nufilt_adapter_only", "nufilt"):
            if n in abl:
                m = abl[n]
                lines.append(f"| {m['label'] if n != 'nufilt' else '(4) full method'} | {m['orders']} | "
                             f"{_f(m['acc_mean'])} ± {_f(m['acc_std'])} | {_f(m['bwt_mean'])} ± {_f(m['bwt_std'])} |")
    levers = {n: m for n, m in r["methods"].items() if m["group"] == "lever"}
    if levers:
        base = r["methods"].get("nufilt")
        lines += ["", "## NUFILT levers beyond the paper (against the paper's NUFILT on the same orders)", "",
                  "| lever | orders | ACC | BWT | Δ ACC vs nufilt | gap kept | merge s/step |",
                  "|---|---|---|---|---|---|---|"]
        for n, m in sorted(levers.items(), key=lambda kv: -kv[1]["acc_mean"]):
            delta = same_orders_delta(m, base) if base else None
            lines.append(f"| {m['label']} (`{n}`) | {m['orders']} | {_f(m['acc_mean'])} ± {_f(m['acc_std'])} | "
                         f"{_f(m['bwt_mean'])} ± {_f(m['bwt_std'])} | {_f(delta)} | {_f(m['gap_kept'])} | "
                         f"{_f(m['merge_seconds_per_step'], 2)} |")
    if r.get("default_method"):
        d = r["default_method"]
        lines += ["", f"The daemon's default (what a new lineage starts with when `method_settings` is unset): "
                  f"method `{d['method']}`, settings `{d['settings']}`."]
    g = r.get("gate_study")
    if g:
        lines += ["", "## What the gate's scores mean", "",
                  f"{g['points']} merge steps of the fully evaluated orders, every method: Spearman rank correlation "
                  f"of the stability score with the measured change on earlier tasks (steps ≥ 2, "
                  f"{g['steps_after_first']} points) **{_f(g['stability_vs_drop'], 2)}**, of the plasticity score "
                  f"with the new task's gain over θ0 + head **{_f(g['plasticity_vs_gain'], 2)}** (both losses: a good "
                  "predictor correlates negatively). Stability ranged "
                  f"{_f(g['stability_range'][0], 3)}–{_f(g['stability_range'][1], 3)}, plasticity "
                  f"{_f(g['plasticity_range'][0], 3)}–{_f(g['plasticity_range'][1], 3)}.",
                  "", f"Suggested `max_stability`: **{_f(g['stability_threshold'], 3)}** (accepts 95 % of the steps "
                  f"that cost earlier tasks at most 1 point); it would have rejected {g['bad_steps_rejected']} of the "
                  f"{g['bad_steps']} steps that cost more than 3 points."]
    if r.get("diagnosis"):
        from .diagnose import markdown as diagnosis_markdown

        d = r["diagnosis"]
        lines += ["", f"## Diagnosis: the paper's NUFILT, order {' → '.join(d['order'])}, per step and per kind "
                  "of matrix", "",
                  diagnosis_markdown(d)]
    if r["settings_study"]:
        lines += ["", "## NUFILT settings study (same orders as the default)", "",
                  "| setting | orders | filtered tensors | ACC | default ACC | Δ ACC | BWT | default BWT |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in r["settings_study"].values():
            lines.append(f"| {s['label']} | {','.join(map(str, s['orders']))} | {s['filtered_tensors']} | "
                         f"{_f(s['acc_mean'], 2)} | {_f(s['default_acc_mean'], 2)} | {_f(s['acc_delta'], 2)} | "
                         f"{_f(s['bwt_mean'], 2)} | {_f(s['default_bwt_mean'], 2)} |")
    lines.append("")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    n_orders = 0
    from .variants import PLUS, PLUS_ISO

    for n, m in r["methods"].items():
        if m["group"] == "lever" and n not in (PLUS, PLUS_ISO):
            continue  # the levers are in the tables; the plot shows the methods and the chosen combination
        if m["seen_curve"]:
            steps = range(1, len(m["seen_curve"]) + 1)
            ax.plot(steps, m["seen_curve"], marker="o", ms=3, label=n,
                    lw=2.2 if n in ("nufilt", PLUS, PLUS_ISO) else 1.2, ls="--" if m["group"] == "ablation" else "-")
            n_orders = m["seen_curve_orders"]
    ind = r["references"].get("individual_seen_curve")
    if ind:
        ax.plot(range(1, len(ind) + 1), ind, color="black", ls=":", label="individual")
    ax.axhline(r["references"]["theta0_heads"]["mean"], color="grey", ls=":", label="θ0 + heads (all tasks)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("merge step t")
    ax.set_ylabel("mean accuracy on tasks seen so far (%)")
    ax.set_title(f"{r['name']}: accuracy on seen tasks ({n_orders} order(s))")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_metrics(folders: dict[str, Path]) -> dict[str, dict]:
    return {t: json.loads((f / "metrics.json").read_text()) for t, f in folders.items()}
