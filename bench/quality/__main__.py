"""One command for the whole pipeline; every stage is cached under --cache and resumes.

    python -m bench.quality                     # the headline: --preset paper-protocol → bench/results/paper-protocol.*
    python -m bench.quality --preset paper-protocol-gentle   # the same with gentle fine-tunes (lr 1e-4)
    python -m bench.quality --preset coadapted-heads         # heads trained with their bodies
    python -m bench.quality --preset small      # the CI-sized version
    python -m bench.quality --stage report      # rebuild the report from whatever orders are done
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .cache import CACHE_DIR, RESULTS_DIR
from .config import PRESETS, BenchConfig

STAGES = ("data", "finetune", "merge", "report")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper-protocol",
                   help="recipe (default paper-protocol)")
    p.add_argument("--name", help="results name (default: the preset's)")
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="run up to and including this stage")
    p.add_argument("--report-only", action="store_true",
                   help="train and merge nothing: report whatever the cache holds (e.g. while a run is going); "
                        "only the diagnosis (one order of the paper's NUFILT) is replayed when missing")
    p.add_argument("--cache", type=Path, default=CACHE_DIR, help="stage cache (default bench/cache)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="where results go")
    p.add_argument("--runs", type=Path, help="per-order merge results (small JSON; default RESULTS/runs): kept in "
                                             "git, so an interrupted run resumes, even where bench/cache is gone")
    p.add_argument("--methods", help="comma-separated registered methods (default: all in METHODS)")
    p.add_argument("--tasks", help="comma-separated subset of the preset's tasks")
    p.add_argument("--orders", type=int, help="number of task orders (default: the preset's)")
    p.add_argument("--no-ablations", action="store_true", help="skip NUFILT's Table 4 ablation")
    p.add_argument("--no-settings", action="store_true", help="skip the NUFILT settings study")
    p.add_argument("--no-levers", action="store_true", help="skip the NUFILT levers beyond the paper")
    p.add_argument("--only", help="comma-separated variant names: run (and report) just these")
    # one thread: on 2 shared cores torch's spinning thread pool loses badly to contention
    # (a merge step measured 4.5 s with 1 thread, 18.7 s with 2, load average ~9)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    return p.parse_args(argv)


def configure(args: argparse.Namespace) -> BenchConfig:
    cfg = PRESETS[args.preset]
    if args.tasks:
        tasks = tuple(args.tasks.split(","))
        from .tasks import LOADERS

        unknown = [t for t in tasks if t not in LOADERS]
        if unknown:
            raise SystemExit(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(LOADERS)}")
        cfg = replace(cfg, data=replace(cfg.data, tasks=tasks))
    if args.orders is not None:
        cfg = replace(cfg, merge=replace(cfg.merge, orders=args.orders))
    args.runs = args.runs or args.results / "runs"
    return replace(cfg, name=args.name or cfg.name)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = configure(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from .backbone import new_encoder
    from .data import build_all, load_task
    from .finetune import finetune_task, load_heads
    from .merging import EvalSet, arrival_name, load_results, run_all, run_key
    from .report import build, load_metrics
    from .tasks import MissingDataError
    from .variants import all_variants

    variants = all_variants(args.methods.split(",") if args.methods else None,
                            ablations=not args.no_ablations, settings=not args.no_settings,
                            levers=not args.no_levers, only=args.only.split(",") if args.only else None)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.0f} s] {msg}", flush=True)

    if args.report_only:
        return report_only(cfg, variants, args, log)
    last = STAGES.index(args.stage) if args.stage != "all" else len(STAGES) - 1
    try:
        data_dirs = build_all(args.cache, cfg.data)
    except MissingDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"data: {len(data_dirs)} task(s) in {args.cache / 'data'}")
    if last < 1:
        return 0
    tasks = {t: load_task(d) for t, d in data_dirs.items()}
    theta0 = new_encoder()
    arrivals = {}  # arrival name → its fine-tune; round 0's are the references
    for r in range(cfg.merge.rounds):
        train = replace(cfg.train, seed=cfg.train.seed + r)
        for t, task in tasks.items():
            arrival = arrival_name(t, r)
            arrivals[arrival] = finetune_task(args.cache, task, cfg.data, train, theta0)
            m = load_metrics({t: arrivals[arrival]})[t]
            log(f"finetune {arrival}: θ0+head {m['probe_acc']:.1f}, fine-tuned {m['finetune_acc']:.1f} "
                f"(gain {m['gain']:+.1f}, {m['seconds']:.0f} s when built)")
    ft_dirs = {t: arrivals[t] for t in tasks}
    if last < 2:
        return 0
    checkpoints = {a: f / "body" for a, f in arrivals.items()}
    evals = {t: EvalSet(tasks[t].test, load_heads(ft_dirs[t])[0]) for t in tasks}
    runs = args.runs / run_key(cfg)
    log(f"merge: {len(variants)} variant(s) × {cfg.merge.orders} order(s) into {runs}")
    run_all(variants, checkpoints, evals, runs, args.cache / "work" / run_key(cfg), cfg, log)
    if last < 3:
        return 0
    results = {v.name: (v, load_results(runs, v)) for v in variants}
    build(cfg, load_metrics(ft_dirs), results, args.results, default_method=daemon_default(),
          diagnosis=cached_diagnosis(runs, checkpoints, log) if cfg.merge.rounds == 1 else None)
    log(f"report: {args.results / cfg.name}.json, .md, .png")
    return 0


def daemon_default() -> dict:
    """The method and settings the daemon ships (its configuration's defaults, resolved)."""
    from nufilt_daemon.config import Settings

    from nufilt_core.methods import get_method

    # the defaults as shipped (model_construct reads no NUFILT_* variables), and what their first merge step
    # passes: a new lineage's settings, which every later step inherits
    shipped = Settings.model_construct()
    settings = get_method(shipped.method).Settings(**shipped.step_options())
    return {"method": shipped.method, "settings": settings.model_dump(mode="json")}


def diagnosis_path(runs: Path) -> Path:
    return runs / "diagnosis-order-0.json"


def cached_diagnosis(runs: Path, checkpoints: dict[str, Path], log) -> dict:
    """The paper's NUFILT replayed on order 0 with its figures (bench.quality.diagnose), cached per run."""
    import json

    from nufilt_core.methods.nufilt import NufiltSettings

    from .backbone import base_weights
    from .cache import write_json
    from .diagnose import diagnose
    from .merging import task_order

    path = diagnosis_path(runs)
    if not path.exists():
        log("diagnosis: replaying the paper's NUFILT on order 0")
        order = task_order(list(checkpoints), 0)
        write_json(path, diagnose(base_weights(), checkpoints, order, NufiltSettings(profile="paper")))
    return json.loads(path.read_text())


def report_only(cfg: BenchConfig, variants: list, args: argparse.Namespace, log) -> int:
    """The report from finished stages only; merge results count only once every fine-tune exists."""
    from .finetune import finetune_dir
    from .merging import load_results, run_key
    from .report import build, load_metrics

    done = {t: finetune_dir(args.cache, t, cfg.data, cfg.train) for t in cfg.data.tasks}
    done = {t: f for t, f in done.items() if (f / "metrics.json").exists()}
    if not done:
        print("error: no fine-tune is finished yet; nothing to report", file=sys.stderr)
        return 1
    missing = [t for t in cfg.data.tasks if t not in done]
    runs = args.runs / run_key(cfg)
    results = {} if missing else {v.name: (v, load_results(runs, v)) for v in variants}
    # the diagnosis replays one order of the paper's NUFILT (seconds), so it is made once every fine-tune exists
    replay = not missing and cfg.merge.rounds == 1  # the diagnosis is of the 8-arrival benchmark
    diagnosis = cached_diagnosis(runs, {t: f / "body" for t, f in done.items()}, log) if replay else None
    build(cfg, load_metrics(done), results, args.results, missing=missing, default_method=daemon_default(),
          diagnosis=diagnosis)
    log(f"report ({len(done)}/{len(cfg.data.tasks)} fine-tunes): {args.results / cfg.name}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
