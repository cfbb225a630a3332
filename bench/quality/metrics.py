"""ACC and BWT from one order's step records.

ACC is the mean accuracy over all tasks after the last merge; BWT the mean over the earlier tasks of the
final accuracy minus the accuracy right after the task was merged (in a long stream, after its last arrival)."""

from __future__ import annotations

import statistics


def final_acc(record: dict) -> dict[str, float]:
    return record["steps"][-1]["acc"]


def acc(record: dict) -> float:
    """Mean over all T tasks of the final merged model's accuracy."""
    final = final_acc(record)
    return sum(final.values()) / len(final)


def bwt(record: dict) -> float:
    """1/(T−1) Σ_{i<T} [a_i(θ_T^m) − a_i(θ_i^m)], a_i(θ_i^m) measured right after task i merged."""
    steps = record["steps"]
    final = final_acc(record)
    last_arrival = {s["task"]: i for i, s in enumerate(steps)}  # a retrained task: its newest version counts
    drops = [final[t] - steps[i]["acc"][t] for t, i in last_arrival.items() if i < len(steps) - 1]
    return sum(drops) / len(drops) if drops else 0.0


def round_accs(record: dict) -> list[float]:
    """ACC (every task) after each step that scored every task: the end of each round of a long stream."""
    steps, tasks = record["steps"], len(final_acc(record))
    return [sum(steps[i]["acc"].values()) / tasks for i in range(tasks - 1, len(steps), tasks)]


def seen_curve(record: dict) -> list[float] | None:
    """Mean accuracy on the tasks seen so far, after each step (only for fully evaluated orders)."""
    if not record.get("curve"):
        return None
    return [sum(s["acc"].values()) / len(s["acc"]) for s in record["steps"]]


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
