"""The merge worker: one job at a time, in arrival order, from the current production version.

For each queued job: mark it merging (counting the attempt), run merge_step + the gate's checks
in a child process (merge_process.py, from merge_pool.py) writing into STORE/candidates/, mark it validating when the
candidate exists, let the gate decide (user command, thresholds), then promote, quarantine or
fail it. Whatever goes wrong with one job (bad input, an exception, OOM, a killed child) ends
that job with its reason; the loop goes on with the next.

Stopping: the supervisor gives a running job `shutdown_grace_seconds` to finish; after that the
child gets SIGTERM (merge_step removes its temporary output), then SIGKILL, the candidate is
deleted and the job goes back to the queue, to be redone after the restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from nufilt_core.errors import NufiltError

from .child_protocol import ChildError, ChildEvent, ChildRequest, Merged, Progress, Validated
from .config import ConfigError, Settings
from .gate import decide, recorded_metrics
from .intake import content_hash
from .journal import Job, Journal
from .logging import Logger
from .merge_pool import ChildProcess, MergeProcessPool
from .metrics import Metrics, measured_scores
from .promoter import Promoter
from .states import FINAL_STATES, GateOutcome, JobState
from .store import Store, StoreError

log = structlog.get_logger("nufilt.worker")

RECONCILE_RETRY_SECONDS = 5.0  # while production cannot be known, the queue waits this long between looks


@dataclass
class ChildResult:
    record: dict[str, Any] | None = None
    merge_phase_seconds: dict[str, float] = field(default_factory=dict)
    merged_at: float | None = None  # monotonic
    validation: dict[str, Any] | None = None
    error: ChildError | None = None
    returncode: int | None = None
    timed_out: bool = False
    gpu_peak_bytes: int | None = None
    log: Path | None = None  # the merge process's stdout and stderr


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


class MergeWorker:
    def __init__(self, settings: Settings, journal: Journal, store: Store, promoter: Promoter, metrics: Metrics,
                 logs_dir: Path):
        if settings.base_model is None:  # the daemon refuses to start without one; every merge needs it
            raise ConfigError("base_model is required to merge")
        self.settings = settings
        self.base_model: Path = settings.base_model
        self.journal = journal
        self.store = store
        self.promoter = promoter
        self.production_problem: str | None = None  # why no merge may start now (Promoter.reconcile)
        self.metrics = metrics
        self.logs_dir = Path(logs_dir)
        self.current: Job | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self.processes = MergeProcessPool(self.logs_dir)
        self._thread: threading.Thread | None = None

    # the pool's running and waiting merge processes, as the tests look at them
    @property
    def _child(self) -> subprocess.Popen[bytes] | None:
        return self.processes.running

    @property
    def _spare(self) -> ChildProcess | None:
        return self.processes.spare

    # --- lifecycle (called from the supervisor) --------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="merge-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, grace: float) -> None:
        """Finish the running job within `grace` seconds, else abandon it (it is redone later)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is None:
            return
        self._thread.join(grace)
        if self._thread.is_alive():
            log.warning("abandoning_running_job", job=self.current.id if self.current else None, grace=grace)
            self._abandon.set()
            self.processes.terminate_running()
            self._thread.join(60)
        self.processes.release_spare()

    # --- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            job = self.journal.next_queued()
            wait = None if job is None else (job.not_before or 0) - time.time()
            if job is None or (wait is not None and wait > 0):  # idle, or the queue's head is backing off
                self._prestart()
                self._wake.wait(1.0 if wait is None else min(1.0, wait))
                self._wake.clear()
                continue
            try:
                self.process(job)
            except Exception as e:  # a bug or a full disk: fail this job, keep the daemon going
                log.exception("job_error", job=job.id, checkpoint=job.reference)
                self._fail_after_internal_error(job, e)
            finally:
                self.current = None

    def _fail_after_internal_error(self, job: Job, e: Exception) -> None:
        try:
            now = self.journal.job(job.id)
            if now is not None:  # the candidate is half-done work either way (a full disk must not keep it)
                shutil.rmtree(self.store.candidate_path(job.id, now.attempts), ignore_errors=True)
            if now is not None and now.state not in FINAL_STATES:
                self.journal.transition(job.id, JobState.FAILED, f"internal error: {type(e).__name__}: {e}")
                self.metrics.merges.labels(JobState.FAILED).inc()
            self._drop_staged(job)
        except Exception:
            log.exception("journal_error", job=job.id)
            self._stopping.wait(5)  # do not spin on a broken journal

    def reconcile_production(self) -> bool:
        """The store's production against the journal's (Promoter.reconcile): True when a merge may start; False
        (said once in the log, kept in `production_problem` for status) while production cannot be known."""
        try:
            done = self.promoter.reconcile()
        except StoreError as e:
            if self.production_problem != str(e):
                log.error("production_unknown", problem=str(e))
            self.production_problem = str(e)
            return False
        self.production_problem = None
        if done is not None:
            self.metrics.production_reconciled.inc()
        return True

    def process(self, job: Job) -> None:
        if not self.reconcile_production():
            self._stopping.wait(RECONCILE_RETRY_SECONDS)  # the job stays queued, untouched
            return
        prod = self.store.production()
        first_start = job.started_at is None  # a retried or redone job was not queued anew
        job = self.journal.mark_started(job.id, prod.number if prod else None)
        self.current = job
        if first_start and job.started_at is not None:
            self.metrics.observe_merge_start(job.source, job.created_at, job.started_at)
        jlog = log.bind(job=job.id, checkpoint=job.reference, from_version=job.from_version, attempt=job.attempts)
        jlog.info("merge_started")
        candidate = self.store.candidate_path(job.id, job.attempts)
        if candidate.exists():
            shutil.rmtree(candidate)
        t0 = time.monotonic()
        res = self._run_child(job, self._request(job, candidate, prod.path if prod else None), jlog)
        if self._abandon.is_set():
            return self._requeue(job, candidate, "abandoned when the daemon stopped; redone after restart", jlog)
        merge_seconds = (res.merged_at or time.monotonic()) - t0
        self._observe_merge(res, merge_seconds)
        report: dict[str, Any] = {
            "job_id": job.id, "attempt": job.attempts, "checkpoint": job.reference, "source": job.source,
            "sha256": job.sha256, "parent_version": job.from_version,
            "step": res.record.get("step") if res.record else None,
            "method": res.record.get("method") if res.record else self.settings.method,
            "merge_seconds": round(merge_seconds, 3),
        }
        outcome, reasons = self._outcome_before_gate(job, res)
        if outcome is None:  # merged and checked: the gate decides
            assert res.validation is not None and res.merged_at is not None
            decision = decide(res.validation, candidate, self.settings.gate, self._abandon,
                              recorded_metrics(prod.report()) if prod else None)
            if self._abandon.is_set():  # the user command was cancelled by a stop
                return self._requeue(job, candidate, "abandoned when the daemon stopped; redone after restart", jlog)
            outcome, reasons = decision.outcome, decision.reasons
            validation_seconds = time.monotonic() - res.merged_at
            report.update(checks=res.validation.get("checks"), scores=res.validation.get("scores"),
                          command=decision.command, metrics=decision.metrics,
                          validation_seconds=round(validation_seconds, 3))
            if decision.notes:
                report["threshold_notes"] = decision.notes
                jlog.warning("relative_threshold_not_checked", notes=decision.notes)
            declared = (res.validation.get("checks") or {}).get("declared_base")
            if declared and not declared["matches"] and self.settings.gate.declared_base == "warn":
                jlog.warning("adapter_of_another_base", declared=declared["declared"], expected=declared["expected"])
            self.metrics.validation_duration.observe(validation_seconds)
            self.metrics.show_scores(measured_scores(decision.metrics, res.validation.get("scores") or {},
                                                     (decision.command or {}).get("metrics") or {}))
        retry = self._abnormal(res) and job.child_failures + 1 < self.settings.max_attempts
        if outcome == GateOutcome.FAILED and retry:
            return self._retry_after_child_failure(job, candidate, reasons, jlog)
        report.update(decision=outcome, reasons=reasons, created_at=datetime.now(UTC).isoformat(timespec="seconds"))
        self._settle(job, candidate, outcome, report, jlog)

    @staticmethod
    def _abnormal(res: ChildResult) -> bool:
        """The job's own merge process died (a signal, or an exit without a result), not by our hand."""
        if res.timed_out or res.error is not None:
            return False
        return (res.returncode is not None and res.returncode < 0) or res.record is None or res.validation is None

    def _retry_after_child_failure(self, job: Job, candidate: Path, reasons: list[str], jlog: Logger) -> None:
        """Counted against max_attempts (this is the job's own process), then queued again."""
        shutil.rmtree(candidate, ignore_errors=True)
        n = job.child_failures + 1
        reason = f"{'; '.join(reasons)}; attempt {n} of {self.settings.max_attempts}, retried"
        self.journal.transition(job.id, JobState.QUEUED, reason, child_failures=n)
        jlog.warning("merge_process_failed_retrying", reason=reason, child_failures=n)

    def _settle(self, job: Job, candidate: Path, outcome: GateOutcome, report: dict[str, Any],
                jlog: Logger) -> None:
        """Promote, quarantine or fail; count it; one summary event."""
        reason = "; ".join(report["reasons"]) or None
        version = None
        final = outcome.job_state()
        if outcome == GateOutcome.ACCEPTED:
            step = int(report["step"])
            v = self.promoter.promote(job, candidate, report, step)
            if v is None:
                return self._requeue(job, candidate, "production changed during the merge (rollback); redone "
                                     "from the new production", jlog)
            version = v.number
            self.metrics.production_version.set(version)
            self.metrics.merge_step.set(step)
            now = time.time()
            self.metrics.last_promotion.set(now)
            self.metrics.observe_promotion(job.source, job.created_at, now)
        elif outcome == GateOutcome.REJECTED:
            where = self.promoter.reject(job, candidate if candidate.exists() else None, report,
                                         reason or JobState.REJECTED)
            jlog = jlog.bind(quarantine=str(where))
        else:
            shutil.rmtree(candidate, ignore_errors=True)
            self.journal.transition(job.id, JobState.FAILED, reason)
        self.metrics.merges.labels(final).inc()
        self._drop_staged(job)
        self.processes.prune_logs()
        scores = report.get("scores") or {}
        jlog.info("merge_finished", outcome=final, reason=reason, step=report["step"], version=version,
                  merge_seconds=report["merge_seconds"], validation_seconds=report.get("validation_seconds"),
                  stability=scores.get("stability"), plasticity=scores.get("plasticity"))

    def _requeue(self, job: Job, candidate: Path, reason: str, jlog: Logger) -> None:
        """Back to the queue, not counted as an attempt (it was not this job's fault)."""
        shutil.rmtree(candidate, ignore_errors=True)
        self.journal.transition(job.id, JobState.QUEUED, reason, attempts=job.attempts - 1)
        jlog.warning("merge_requeued", reason=reason)

    def _observe_merge(self, res: ChildResult, seconds: float) -> None:
        if res.merged_at is not None:
            self.metrics.merge_duration.observe(seconds)
        if res.record:
            self.metrics.merge_peak_rss.set(res.record.get("peak_rss_bytes", 0))
        if res.gpu_peak_bytes is not None:
            self.metrics.merge_gpu_peak.set(res.gpu_peak_bytes)

    def _outcome_before_gate(self, job: Job, res: ChildResult) -> tuple[GateOutcome | None, list[str]]:
        """(outcome, reasons) when the child already settled it; (None, []) when the gate decides."""
        if res.timed_out:
            return GateOutcome.FAILED, [f"merge timed out after {self.settings.merge_timeout_seconds:g}s"]
        if res.error is not None:
            where = "merge" if res.error.stage == "merge" else "validation"
            if res.error.kind == GateOutcome.REJECTED and not self._staged_intact(job):
                return GateOutcome.FAILED, [f"{where}: {res.error.message}; the staged copy no longer matches the "
                                            "content hash journaled on arrival (changed on disk after intake): the "
                                            "daemon's fault, not the checkpoint's"]
            return res.error.kind, [f"{where}: {res.error.message}"]
        if res.returncode is not None and res.returncode < 0:
            sig = signal_name(res.returncode)
            hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if sig == "SIGKILL" else ""
            return GateOutcome.FAILED, [f"merge process killed by {sig}{hint}"]
        if res.record is None or res.validation is None:
            return GateOutcome.FAILED, [f"merge process exited with code {res.returncode} without a result; see "
                            f"{res.log or self._log_path(job)}"]
        merged_sha = res.record["checkpoints"][-1]["sha256"]
        if merged_sha != job.sha256:
            return GateOutcome.FAILED, ["the staged copy no longer matches the content hash journaled on arrival "
                            "(was the file changed in place after it was dropped?)"]
        return None, []

    @staticmethod
    def _staged_intact(job: Job) -> bool:
        """The staged copy still holds what was hashed on arrival (read again: only when a merge refused it)."""
        if job.staged_path is None or job.sha256 is None:
            return False
        try:
            return content_hash(Path(job.staged_path), strict=True) == job.sha256
        except (NufiltError, OSError):
            return False

    def _request(self, job: Job, candidate: Path, previous: Path | None) -> ChildRequest:
        s = self.settings
        if job.staged_path is None:  # a queued job always owns its staged copy: a bug, failed as internal
            raise RuntimeError(f"job {job.id} is queued without a staged copy")
        return ChildRequest(base=self.base_model, checkpoint=Path(job.staged_path), output=candidate, previous=previous,
                            method=s.method, options=s.step_options(), seed=s.seed,
                            device=s.device, threads=s.threads, executor=s.executor, ray_address=s.ray_address,
                            max_shard_bytes=s.max_shard_bytes, gate=s.gate)

    def _log_path(self, job: Job) -> Path:
        return self.logs_dir / f"job-{job.id:06d}-a{job.attempts}.log"

    def _prestart(self) -> None:
        """Start the next job's merge process while idle: its interpreter start and imports (about a second
        of every step) happen before the job arrives."""
        if not self.settings.prestart_merge_process or self._stopping.is_set():
            return
        self.processes.prestart()

    def _run_child(self, job: Job, request: ChildRequest, jlog: Logger) -> ChildResult:
        res = ChildResult()
        child, prestarted = self.processes.take(self._log_path(job))
        proc, read_fd = child.proc, child.events_fd
        res.log = child.log
        jlog.info("merge_process_started", pid=proc.pid, log=str(child.log), prestarted=prestarted)
        timer = None
        if self.settings.merge_timeout_seconds:
            def on_timeout() -> None:
                res.timed_out = True
                self.processes.terminate_running()
            timer = threading.Timer(self.settings.merge_timeout_seconds, on_timeout)
            timer.daemon = True
            timer.start()
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(request.model_dump_json().encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the child died at once; its exit code tells
            with os.fdopen(read_fd, "r") as events:
                for line in events:
                    self._handle_event(job, line, res, jlog)
            res.returncode = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            self.processes.finished()
        return res

    def _handle_event(self, job: Job, line: str, res: ChildResult, jlog: Logger) -> None:
        try:
            ev = ChildEvent.model_validate_json(line).root
        except ValidationError as e:  # not from our child's code: skipped, as an unknown line always was
            jlog.warning("merge_event_unreadable", line=line[:200], error=str(e).splitlines()[0])
            return
        match ev:
            case Progress():
                jlog.debug("merge_progress", phase=ev.phase, index=ev.index, total=ev.total)
            case Merged():
                res.record, res.merge_phase_seconds = ev.record, ev.seconds
                res.merged_at = time.monotonic()
                res.gpu_peak_bytes = ev.gpu_peak_bytes
                step = ev.record.get("step")
                self.journal.transition(job.id, JobState.VALIDATING, step=step)
                jlog.info("candidate_merged", step=step, seconds=res.merge_phase_seconds)
            case Validated():
                res.validation = ev.report
            case ChildError():
                res.error = ev

    def _drop_staged(self, job: Job) -> None:
        current = self.journal.job(job.id)
        if current is None or not current.staged_path:
            return
        staged = Path(current.staged_path).parent  # STATE/staged/<token>/
        shutil.rmtree(staged, ignore_errors=True)
        self.journal.clear_staged(job.id)
