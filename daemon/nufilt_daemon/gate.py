"""The validation gate: decides whether a merged candidate may become production.

Three layers, cheapest first:
1. the input checks, by the core: merge_step refuses inputs that do not fit (names, shapes, dtypes,
   NaN/Inf, lineage) with CheckpointError/LineageError before publishing anything (the daemon's
   child merges in one pass: they are checked as the merge pass reads them); the worker turns
   those into a rejection with that message (there is then no candidate).
2. built-in checks on the candidate (`check_candidate`, run in the merge's child process, which
   already has torch and the models at hand): same layout as the base, every value finite, the
   weights match the lineage record's hash, tensors the step's method says it leaves alone
   (`MergeMethod.untouched`) are bit-identical to the input they come from; plus the paper's
   stability/plasticity surrogates (nufilt_core.scores) as scores. After a one-pass merge in the same
   process all of these come from that pass (what it read and wrote, hashed), nothing is read again.
3. an optional user command (`gate.command`) that gets the candidate folder and prints a JSON
   object of numbers; any metric (built-in or the command's) can have {min, max} thresholds.

Outcomes (states.GateOutcome): accepted; rejected (a check or a threshold says no, or the command exits non-zero:
the candidate goes to quarantine with this report); failed (the gate itself could not decide:
the command was not found, timed out, or printed no JSON; production does not move either).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.errors import NufiltError
from nufilt_core.lineage import LineageRecord
from nufilt_core.merge import MergeResult, StepDigests
from nufilt_core.methods import recorded
from nufilt_core.methods.base import source_input
from nufilt_core.model_folder import model_folder_problems
from nufilt_core.safetensors_io import read_raw, tensor_bytes
from nufilt_core.scores import record_scope, surrogate_scores

from .config import GateSettings
from .states import GateOutcome

# --- built-in checks (run in the child process) -------------------------------------------


def check_untouched(base: Checkpoint, previous: Checkpoint | None, new: Checkpoint, candidate: Checkpoint,
                    record: LineageRecord, digests: StepDigests | None = None) -> tuple[int, list[str]]:
    """(how many tensors were compared, which differ): integer and bool buffers against the base
    (the engine never merges them), float tensors against the input the step's method says it left
    them as. The method is asked, not known here, so every method gets the check. With `digests`
    (a one-pass merge's), what was written is compared with what was read, by hash, reading nothing."""
    method_cls, method_settings = recorded(record)
    rule = method_cls.untouched(method_settings, record.step, list(base.tensors))
    checked, changed = 0, []
    for name, info in base.tensors.items():
        source = rule(name, info.shape) if info.is_float else "base"
        if source is None:
            continue
        checked += 1
        if digests is not None:
            role = source_input(source, "base", "previous" if previous is not None else None, "checkpoint")
            same = digests.inputs[role][name] == digests.output[name]
        else:
            kept = source_input(source, base, previous, new)
            written = read_raw(candidate.tensors[name])
            if kept.adapter is not None:
                same = tensor_bytes(kept.model_tensor(name, base).to(info.torch_dtype)) == written
            else:
                same = read_raw(kept.tensors[name]) == written
        if not same:
            changed.append(name)
    return checked, changed


def check_candidate(base: Checkpoint, previous: Checkpoint | None, new: Checkpoint, candidate: Checkpoint,
                    record: LineageRecord, settings: GateSettings, device: torch.device | str,
                    merged: MergeResult | None = None) -> dict[str, Any]:
    """Post-merge checks and scores; returns {"problems": [...], "checks": {...}, "scores": {...}}.
    `merged`: the result of the merge that wrote `candidate` in this very process in one pass (the daemon's
    child): its values were checked finite and hashed as they were written, and its scores computed in
    the merge pass, so the candidate is not read again for them. Without it, the candidate is re-read."""
    problems: list[str] = []
    checks: dict[str, Any] = {}
    try:
        base.check_same_layout(candidate, "candidate")
        checks["layout"] = "ok"
    except NufiltError as e:
        problems.append(str(e))
        checks["layout"] = str(e)
        return {"problems": problems, "checks": checks, "scores": {}}

    if merged is None:
        problems += _check_written(candidate, record, checks)
    else:
        checks["finite"] = checks["lineage_hash"] = "ok (checked while written)"

    if settings.model_folder:
        folder_problems = model_folder_problems(candidate.directory, base)
        problems += folder_problems
        checks["model_folder"] = folder_problems[:10] or "ok"
    if new.adapter is not None:
        declared = check_declared_base(new.adapter.config.base_model_name_or_path, base, settings)
        checks["declared_base"] = declared
        if not declared["matches"] and settings.declared_base == "reject":
            problems.append(f"{new.path}: an adapter of '{declared['declared']}', not of this base "
                            f"({' or '.join(declared['expected'])}; gate.declared_base = reject)")

    if settings.check_untouched:
        n_untouched, untouched_bad = check_untouched(base, previous, new, candidate, record,
                                                     merged.digests if merged is not None else None)
        if untouched_bad:
            problems.append(f"{candidate.path}: {len(untouched_bad)} tensor(s) the method leaves alone were "
                            f"changed, first '{untouched_bad[0]}'")
        checks["untouched"] = {"checked": n_untouched, "changed": untouched_bad[:10]}

    scores: dict[str, Any] = {}
    if merged is not None and merged.scores is not None:
        scores = merged.scores.as_dict()  # computed by the merge pass, no time of their own
    elif settings.scores:
        selected, null_rank, task_rank = record_scope(record, list(base.tensors))
        null_rank = settings.null_rank or null_rank
        task_rank = settings.task_rank or task_rank
        t0 = time.perf_counter()
        s = surrogate_scores(base, previous, new, candidate, selected, null_rank, task_rank, device)
        scores = {**s.as_dict(), "seconds": round(time.perf_counter() - t0, 3)}
    return {"problems": problems, "checks": checks, "scores": scores}


def check_declared_base(declared: str | None, base: Checkpoint, settings: GateSettings) -> dict[str, Any]:
    """Whether the base an adapter names (base_model_name_or_path) is ours: gate.base_model_name when set,
    else the base's path or its folder's name; an adapter that names none matches."""
    base_path = base.directory if base.path.is_file() else base.path
    expected = [settings.base_model_name] if settings.base_model_name else [str(base_path), base_path.name]
    matches = declared is None or declared in expected or (not settings.base_model_name
                                                          and Path(declared).name == base_path.name)
    return {"declared": declared, "expected": expected, "matches": matches}


def _check_written(candidate: Checkpoint, record: LineageRecord, checks: dict[str, Any]) -> list[str]:
    """Re-read the candidate: every value finite, the weights those the lineage record hashed."""
    problems = []
    sha, non_finite = candidate.hash_and_non_finite()
    if non_finite:
        problems.append(f"{candidate.path}: {len(non_finite)} tensor(s) hold NaN/Inf, first '{non_finite[0].name}'")
    checks["finite"] = "ok" if not non_finite else f"{len(non_finite)} tensor(s) with NaN/Inf"
    if sha != record.model_sha256:
        problems.append(f"{candidate.path}: weights do not match the lineage record's model_sha256")
        checks["lineage_hash"] = "mismatch"
    else:
        checks["lineage_hash"] = "ok"
    return problems


# --- the decision (daemon side) -----------------------------------------------------------


@dataclass
class Decision:
    outcome: GateOutcome
    reasons: list[str]
    metrics: dict[str, float] = field(default_factory=dict)  # what thresholds and the score gauge see
    command: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # relative bounds that had nothing to compare with


# the daemon's own secrets, which a validation command has no business with
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH")


def command_env(candidate: Path) -> dict[str, str]:
    """The daemon's environment without its settings (NUFILT_*: the MLflow URI with its password, the webhook
    secret) and MLflow credentials, plus NUFILT_CANDIDATE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUFILT_") and k not in SECRET_ENV}
    return {**env, "NUFILT_CANDIDATE": str(candidate)}


def run_command(argv: list[str], candidate: Path, timeout: float, cancel: threading.Event | None = None,
                ) -> tuple[dict[str, Any], str | None, str | None]:
    """(report, rejection, failure): runs the user's validation command on the candidate, in a process group of
    its own, so that a timeout or a stop ends every process it started, not only the first."""
    full = [*argv, str(candidate)]
    env = command_env(candidate)
    report: dict[str, Any] = {"argv": full}
    t0 = time.monotonic()
    # output to files, not pipes: nothing can block, and we can poll for cancellation
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.Popen(full, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, text=True,
                                    start_new_session=True)
        except FileNotFoundError:
            return report, None, f"validation command not found: {argv[0]}"
        except OSError as e:
            return report, None, f"validation command could not start: {e}"
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            stop = f"timed out after {timeout:g}s" if time.monotonic() - t0 > timeout else None
            if cancel is not None and cancel.is_set():
                stop = "cancelled (the daemon is stopping)"
            if stop:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the command and whatever it started
                proc.wait()
                return report, None, f"validation command {stop}"
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    report.update(exit_code=proc.returncode, seconds=round(time.monotonic() - t0, 3), stderr_tail=stderr[-2000:])
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or [""])[-1]
        return report, f"validation command exited with {proc.returncode}: {last}".rstrip(": "), None
    metrics = parse_metrics(stdout)
    if metrics is None:
        return report, None, "validation command printed no JSON object of numeric metrics"
    report["metrics"] = metrics
    return report, None, None


def parse_metrics(stdout: str) -> dict[str, float] | None:
    """The whole output as one JSON object, else its last line that is one; numbers only."""
    candidates = [stdout, *reversed(stdout.strip().splitlines())]
    for text in candidates:
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict):
            return {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return None


def recorded_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The metrics a version's validation.json recorded (what its thresholds saw: the scores and the command's)."""
    metrics = report.get("metrics")
    if not isinstance(metrics, dict):
        return {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def apply_thresholds(metrics: dict[str, float], settings: GateSettings,
                     production: dict[str, float] | None = None) -> tuple[list[str], list[str]]:
    """The violations of the thresholds, and notes on relative bounds that could not be checked. `production`:
    the production version's recorded metrics (None: no production yet)."""
    out: list[str] = []
    notes: list[str] = []
    for name, t in settings.thresholds.items():
        if name not in metrics:
            out.append(f"metric '{name}' has a threshold but was not reported")
            continue
        v = metrics[name]
        if not math.isfinite(v):  # NaN compares False with every bound: it would pass them all
            out.append(f"{name} = {v} is not a finite number")
            continue
        if t.min is not None and v < t.min:
            out.append(f"{name} = {v:.6g} is below the minimum {t.min:g}")
        if t.max is not None and v > t.max:
            out.append(f"{name} = {v:.6g} is above the maximum {t.max:g}")
        if t.min_delta is None and t.max_delta is None:
            continue
        before = (production or {}).get(name)
        if before is None or not math.isfinite(before):
            notes.append(f"{name}: no production value to compare with " +
                         ("(no production yet)" if production is None else "(production did not record it)"))
            continue
        delta = v - before
        if t.min_delta is not None and delta < t.min_delta:
            out.append(f"{name} = {v:.6g} is {delta:+.6g} against production's {before:.6g}, below min_delta "
                       f"{t.min_delta:g}")
        if t.max_delta is not None and delta > t.max_delta:
            out.append(f"{name} = {v:.6g} is {delta:+.6g} against production's {before:.6g}, above max_delta "
                       f"{t.max_delta:g}")
    return out, notes


def decide(builtin: dict[str, Any], candidate: Path, settings: GateSettings,
           cancel: threading.Event | None = None, production: dict[str, float] | None = None) -> Decision:
    """Combine the child's checks with the user command and thresholds. `production`: the metrics the production
    version recorded (its validation.json), for the relative bounds; None when there is no production."""

    problems = list(builtin.get("problems", []))
    scores = builtin.get("scores") or {}
    metrics = {k: float(scores[k]) for k in ("stability", "plasticity", "harmonic_mean") if k in scores}
    if problems:  # no point running a user command on a broken candidate
        return Decision(GateOutcome.REJECTED, problems, metrics)
    command = None
    if settings.command:
        command, rejection, failure = run_command(settings.command, candidate, settings.command_timeout_seconds,
                                                     cancel)
        if failure:
            return Decision(GateOutcome.FAILED, [failure], metrics, command)
        if rejection:
            return Decision(GateOutcome.REJECTED, [rejection], metrics, command)
        metrics.update(command.get("metrics", {}))
    violations, notes = apply_thresholds(metrics, settings, production)
    return Decision(GateOutcome.REJECTED if violations else GateOutcome.ACCEPTED, violations, metrics, command, notes)
