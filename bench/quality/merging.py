"""Stage 3: continual merges over task orders, through the engine users get (nufilt_core.merge_step),
each merged body evaluated with every task's own fine-tuned head.

Per (variant, order) one JSON file under the run's results folder (bench/results/runs, kept in git),
written when the order is complete, so an interrupted run resumes where it stopped, even on another
machine, and the report can use what exists.
Evaluation: after step t the new task's accuracy a_t(θ_t^m) (for BWT), and after the last step
every task (ACC); on the first `curve_orders` orders every seen task after every step (the plot).
"""

from __future__ import annotations

import fcntl
import json
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from nufilt_core import __version__ as nufilt_version
from nufilt_core.checkpoint import Checkpoint
from nufilt_core.merge import MergeRequest, merge_step
from nufilt_core.scores import record_scope, surrogate_scores

from .backbone import base_weights, load_body, new_encoder
from .cache import write_json
from .config import BenchConfig, key
from .data import Split
from .evaluate import accuracy
from .variants import Variant


def task_order(tasks: list[str], v: int) -> list[str]:
    """The paper's order v: random.seed(42 + v); random.shuffle(order) (a private Random, same numbers)."""
    order = list(tasks)
    random.Random(42 + v).shuffle(order)
    return order


ROUND_MARK = "@"  # a later round's arrival of task T is named T@2, T@3, ...
ROUND_SEED_STRIDE = 1000  # round r of order v is shuffled as the paper's order v + r·1000


def arrival_name(task: str, round_index: int) -> str:
    return task if round_index == 0 else f"{task}{ROUND_MARK}{round_index + 1}"


def arrival_task(arrival: str) -> str:
    return arrival.split(ROUND_MARK)[0]


def stream_order(tasks: list[str], v: int, rounds: int = 1) -> list[str]:
    """The arrivals of order v: round 0 is the paper's order v (so a long stream starts as the 8-task
    benchmark does), each later round the tasks again in an order of its own."""
    return [arrival_name(t, r) for r in range(rounds) for t in task_order(tasks, v + r * ROUND_SEED_STRIDE)]


@dataclass
class EvalSet:
    test: Split
    head: dict[str, torch.Tensor]


def run_key(cfg: BenchConfig) -> str:
    rounds = () if cfg.merge.rounds == 1 else (cfg.merge.rounds,)  # the key of one-round runs as it was
    return key(cfg.data, cfg.train, cfg.merge.seed, *rounds)


def result_path(runs: Path, variant: Variant, v: int) -> Path:
    return runs / f"{variant.name}-{key(variant.method, variant.options)}" / f"order-{v}.json"


def run_order(variant: Variant, v: int, checkpoints: dict[str, Path], evals: dict[str, EvalSet],
              work: Path, cfg: BenchConfig, curve: bool, encoder: torch.nn.Module | None = None) -> dict:
    """Merge all arrivals in order v with one variant; returns the record written to the cache."""
    order = stream_order(list(evals), v, cfg.merge.rounds)
    encoder = encoder or new_encoder()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    steps = []
    previous: Path | None = None
    try:
        for t, arrival in enumerate(order, 1):
            task = arrival_task(arrival)
            output = work / f"step-{t}"
            t0 = time.perf_counter()
            result = merge_step(MergeRequest(
                base=base_weights(), checkpoint=checkpoints[arrival], output=output, previous=previous,
                method=variant.method, options=variant.options if t == 1 else {}, seed=cfg.merge.seed,
                device="cpu"))
            merge_seconds = time.perf_counter() - t0
            # the daemon gate's data-free scores, on the orders where every seen task is evaluated
            # after every step (so their power to predict the measured drop and gain can be reported)
            scores = gate_scores(result.record, previous, checkpoints[arrival], output) if curve else None
            if previous is not None:
                shutil.rmtree(previous)
            previous = output
            # every task seen so far on curve orders and at the end of each round; else the new one (for BWT)
            whole = curve or t % len(evals) == 0
            seen = list(dict.fromkeys(arrival_task(a) for a in order[:t])) if whole else [task]
            t1 = time.perf_counter()
            load_body(encoder, output / "model.safetensors")
            acc = {name: accuracy(encoder, evals[name].test, evals[name].head, cfg.merge.eval_batch) for name in seen}
            steps.append({"task": task, **({"arrival": arrival} if arrival != task else {}), "acc": acc,
                          "merge_seconds": round(merge_seconds, 3),
                          "phase_seconds": {k: round(s, 3) for k, s in result.seconds.items()},
                          "eval_seconds": round(time.perf_counter() - t1, 2), "summary": result.record.summary,
                          **({"scores": scores} if scores else {})})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"variant": variant.name, "method": variant.method, "options": variant.options, "order_index": v,
            "order": order, "curve": curve, "settings": result.record.settings, "nufilt_version": nufilt_version,
            "steps": steps}


def gate_scores(record, previous: Path | None, checkpoint: Path, merged: Path) -> dict[str, float]:
    base = Checkpoint.open(base_weights())
    selected, null_rank, task_rank = record_scope(record, list(base.tensors))
    s = surrogate_scores(base, Checkpoint.open(previous) if previous else None, Checkpoint.open(checkpoint),
                         Checkpoint.open(merged), selected, null_rank, task_rank)
    return {"stability": s.stability, "plasticity": s.plasticity}


@contextmanager
def claimed(path: Path):
    """Yields whether this process holds the job's lock, so two runs side by side split the jobs.

    An flock, not a marker file: the kernel drops it when its holder dies, so nothing goes stale.
    """
    lock = path.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield not path.exists()  # another process may have finished it since our check


def run_all(variants: list[Variant], checkpoints: dict[str, Path], evals: dict[str, EvalSet], runs: Path,
            work: Path, cfg: BenchConfig, log=print) -> None:
    """Every (variant, order) without a result in `runs`; order by order, so partial runs cover all variants.

    The merged models of a job live in `work` (large, deleted when the job ends); only the result is kept.
    Jobs are claimed one at a time, so running this in two processes at once shares the work.
    """
    limit = {"settings": cfg.merge.settings_orders, "ablation": cfg.merge.ablation_orders}
    jobs = [(var, v) for v in range(cfg.merge.orders) for var in variants
            if limit.get(var.group) is None or v < limit[var.group]]
    encoder = new_encoder()
    for i, (var, v) in enumerate(jobs, 1):
        path = result_path(runs, var, v)
        if path.exists():
            continue
        with claimed(path) as mine:
            if not mine:
                continue
            t0 = time.perf_counter()
            record = run_order(var, v, checkpoints, evals, work / f"{var.name}-{v}", cfg,
                               curve=v < cfg.merge.curve_orders, encoder=encoder)
            write_json(path, record)
        final = record["steps"][-1]["acc"]
        log(f"[{i}/{len(jobs)}] {var.name} order {v}: ACC {sum(final.values()) / len(final):.2f} "
            f"({time.perf_counter() - t0:.0f} s)")


def load_results(runs: Path, variant: Variant) -> list[dict]:
    folder = result_path(runs, variant, 0).parent
    files = sorted(folder.glob("order-*.json"), key=lambda p: int(p.stem.split("-")[1])) if folder.exists() else []
    return [json.loads(p.read_text()) for p in files]
