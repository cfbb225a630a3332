"""The supervisor: wires the pipeline, keeps it healthy, stops it cleanly.

Start: one daemon per state dir (flock), store and journal opened, recovery (recovery.py),
/metrics served, the worker and the registry outbox started, then the sources; READY=1 once all
are up. Loop (every `loop_interval_seconds`, on the main thread): restart unhealthy sources and
the outbox with back-off, refresh the gauges from the journal and the store (so a rollback made
by `nufilt rollback` in another process shows up), STATUS= and WATCHDOG=1 to systemd.
SIGTERM/SIGINT: stop sources, give a running merge `shutdown_grace_seconds`, then abandon it
(it is re-queued), stop the rest.

MLflow (source, publisher, webhook) is imported lazily and only when `mlflow.tracking_uri` is
set, so the daemon runs without it.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, TypeVar

import structlog

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.errors import ClusterError, NufiltError
from nufilt_core.ray_executor import check_ray

from .config import ConfigError, Settings
from .intake import Intake
from .journal import JOURNAL_NAME, Job, Journal, JournalError
from .logging import adopt_library_loggers
from .metrics import INBOX_STATES, Metrics
from .notify import Notifier
from .promoter import Promoter
from .publishers.outbox import Outbox
from .recovery import recover
from .sources.base import Arrival, Source
from .sources.folder import FolderSource
from .states import ACTIVE_STATES, OUTCOME_STATES, JobState, ProductionChangeKind
from .store import Store, StoreError
from .worker import MergeWorker

log = structlog.get_logger("nufilt.supervisor")

DAEMON_INFO = "daemon.json"  # pid, metrics URL: read by `nufilt status`
INBOX_INFO = "inbox.json"  # entries not journaled yet and the sources' health: read by `nufilt status`
STORAGE_CHECK_TICKS, STORAGE_CHECK_MAX_SECONDS = 5, 10.0  # writability probe: every 5 ticks, at most 10 s apart

T = TypeVar("T")


def check_writable(directory: Path, create: bool = False) -> str | None:
    """None when a file can be created, written, synced and removed in `directory` (created first
    with `create`, at start); else why not."""
    probe = directory / f".nufilt-write-check-{os.getpid()}"
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        return f"{directory}: not writable ({e.strerror or e})"
    return None


class AlreadyRunning(NufiltError):
    """Another daemon holds this state dir or this store."""

STORE_LOCK_NAME = ".daemon.lock"  # in the store: one daemon per store, whatever its state dir


def state_paths(state_dir: Path) -> dict[str, Path]:
    return {"staged": state_dir / "staged", "downloads": state_dir / "downloads", "logs": state_dir / "logs",
            "lock": state_dir / "daemon.lock", "info": state_dir / DAEMON_INFO, "inbox": state_dir / INBOX_INFO}


def publishing_enabled(settings: Settings) -> bool:
    return bool(settings.mlflow.tracking_uri and settings.mlflow.target_model)


class _Supervised:
    """A restartable part with back-off, so a part that keeps failing does not spin."""

    def __init__(self, name: str, part: Any, start: Any):
        self.name, self.part, self._start = name, part, start
        self.failures = 0
        self.next_try = 0.0

    def check(self) -> None:
        if self.part.healthy():
            self.failures = 0
            return
        now = time.monotonic()
        if now < self.next_try:
            return
        self.failures += 1
        self.next_try = now + min(60.0, 2.0 ** self.failures)
        log.warning("restarting_unhealthy_part", part=self.name, failures=self.failures)
        try:
            self.part.stop()
            self._start()
        except Exception:
            log.exception("restart_failed", part=self.name)


def _built(part: T | None, name: str) -> T:
    """A part the daemon builds at start, for the code that runs once it has."""
    if part is None:
        raise RuntimeError(f"the daemon's {name} is built at start (Daemon.run), not yet")
    return part


class Daemon:
    """The parts that use the state dir are built in `run` once its locks are held (a second daemon must not
    touch the journal): None until then, which `_shutdown` checks; the code that runs after uses the properties."""

    def __init__(self, settings: Settings):
        if settings.base_model is None:
            raise ConfigError("base_model is required to run the daemon (set it in the config file or as "
                              "NUFILT_BASE_MODEL)")
        self.settings = settings
        self.paths = state_paths(Path(settings.state_dir))
        self.stop_event = threading.Event()
        self.notifier = Notifier()
        self.store = Store(settings.store_dir)  # its folders are made at start
        self._journal: Journal | None = None
        self._metrics: Metrics | None = None
        self._worker: MergeWorker | None = None
        self._intake: Intake | None = None
        self._lock_files: list[Any] = []
        self.sources: list[Source] = []
        self.supervised: list[_Supervised] = []
        self.metrics_port: int | None = None
        self.outbox: Outbox | None = None
        self.webhook: Any = None
        self._rollbacks_seen = 0
        self._last_promotion_seen: float | None = None
        self._storage_problems: dict[str, str] = {}
        self._next_storage_check = 0.0
        self._inbox_written: str | None = None

    @property
    def journal(self) -> Journal:
        return _built(self._journal, "journal")

    @property
    def metrics(self) -> Metrics:
        return _built(self._metrics, "metrics")

    @property
    def worker(self) -> MergeWorker:
        return _built(self._worker, "merge worker")

    @property
    def intake(self) -> Intake:
        return _built(self._intake, "intake")

    # --- start -----------------------------------------------------------------------------

    def _take_locks(self) -> None:
        """The state dir and the store are each one daemon's: a second one sharing either would mix versions
        and journals (two daemons' candidates in one store, one's weights under the other's report)."""
        for lock_path, what in ((self.paths["lock"], "state dir"),
                                (Path(self.settings.store_dir) / STORE_LOCK_NAME, "store")):
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            f = lock_path.open("a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                other = f.read().strip() or "?"
                f.close()
                raise AlreadyRunning(f"{lock_path.parent}: another nufilt daemon (pid {other}) uses this "
                                     f"{what}") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            self._lock_files.append(f)

    def _build(self) -> None:
        s = self.settings
        try:
            Checkpoint.open(s.base_model)  # type: ignore[arg-type]
        except NufiltError as e:
            raise ConfigError(f"base_model: {e}") from None
        if s.executor == "ray":
            try:
                check_ray(s.ray_address)  # each merge would fail on it: refused at start instead
            except ClusterError as e:
                raise ConfigError(f"ray_address: {e}") from None
        self.store.ensure()
        try:
            self._journal = Journal.in_state_dir(Path(s.state_dir))
        except JournalError as e:
            if isinstance(e.__cause__, sqlite3.OperationalError):  # locked, I/O: a restart may get through
                raise
            # not a database, or a damaged one: exit 78 with what to do, not a traceback and a restart every 10 s
            raise ConfigError(f"{Path(s.state_dir) / JOURNAL_NAME}: not a readable journal ({e.__cause__}); "
                              "restore it from a backup (sqlite3 .backup), or move it aside to start a new journal "
                              "(the store keeps its versions)") from None
        source_names = (["folder"] if s.folder.enabled else []) + (["mlflow"] if s.mlflow.source_model else [])
        gpu = s.device != "cpu" and _cuda_available()
        self._metrics = Metrics(sources=source_names or ["folder"], gpu=gpu)
        promoter = Promoter(self.store, self._journal, s.keep_versions, s.keep_quarantine, publishing_enabled(s))
        self._worker = MergeWorker(s, self._journal, self.store, promoter, self._metrics, self.paths["logs"])
        self._intake = Intake(self._journal, self.paths["staged"], self._on_journaled)

    def _on_journaled(self, job: Job, arrival: Arrival) -> None:
        self.metrics.detected.labels(arrival.source).inc()
        if job.state == JobState.DUPLICATE:
            self.metrics.duplicates.inc()
        elif job.state in (JobState.REJECTED, JobState.FAILED):
            self.metrics.merges.labels(job.state).inc()
        self.worker.wake()

    def _start_sources(self) -> None:
        s = self.settings
        if s.folder.enabled:
            folder = FolderSource(Path(s.watch_dir), s.folder)
            folder.on_error = lambda: self.metrics.source_errors.labels("folder").inc()
            self._add_source(folder)
        if s.mlflow.tracking_uri and s.mlflow.source_model:
            from .sources.mlflow_registry import MlflowRegistrySource  # lazy: MLflow is optional

            mlflow_source = MlflowRegistrySource(s.mlflow, self.paths["downloads"], self.journal,
                                                 on_error=lambda e: self.metrics.registry_errors.labels("poll").inc())
            self._add_source(mlflow_source)
            if s.mlflow.webhook_port is not None:
                from .webhook import WebhookServer

                self.webhook = WebhookServer(s.mlflow.webhook_host, s.mlflow.webhook_port, s.mlflow.webhook_secret,
                                             mlflow_source.wake)
                self.webhook.start()
                self.supervised.append(_Supervised("webhook", self.webhook, self.webhook.start))

    def _add_source(self, source: Source) -> None:
        def start() -> None:
            source.start(self.intake.emit)
        start()
        self.sources.append(source)
        self.supervised.append(_Supervised(f"source:{source.name}", source, start))

    def _start_outbox(self) -> None:
        if not publishing_enabled(self.settings):
            return
        from .publishers.mlflow import MlflowPublisher  # lazy: MLflow is optional

        self.outbox = Outbox(self.journal, self.store, MlflowPublisher(self.settings.mlflow), self.metrics)
        self.outbox.start()
        self.supervised.append(_Supervised("registry-outbox", self.outbox, self.outbox.start))

    def _check_dirs(self) -> None:
        """A read-only or full store would otherwise report ready and then fail every checkpoint."""
        for key, d in (("state_dir", Path(self.settings.state_dir)), ("store_dir", Path(self.settings.store_dir))):
            problem = check_writable(d, create=True)
            if problem:
                raise ConfigError(f"{key} {problem}; the daemon must be able to write there")

    def run(self) -> int:
        s = self.settings
        self._install_signals()  # first: a stop during start-up (recovery, MLflow) ends cleanly, exit 0
        self._check_dirs()
        self._take_locks()
        try:
            self._build()
            report = recover(self.journal, self.store, self.intake, s.interrupted_retry_seconds, publishing_enabled(s))
            self.metrics.interruptions.inc(len(report.requeued))
            for job in filter(None, map(self.journal.job, report.completed)):  # promoted by recovery
                self.metrics.observe_promotion(job.source, job.created_at, job.finished_at or time.time())
            log.info("daemon_starting", pid=os.getpid(), config=s.redacted(), requeued=report.requeued,
                     failed=report.failed, completed=report.completed, removed=len(report.removed))
            self.worker.reconcile_production()  # after recovery, which completes an interrupted promotion
            self._rollbacks_seen = self.journal.count_rollbacks()
            self._refresh_gauges()
            if s.metrics_port is not None:
                try:
                    self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
                except OSError as e:
                    raise ConfigError(f"metrics_host/metrics_port {s.metrics_host}:{s.metrics_port}: cannot "
                                      f"listen ({e.strerror or e})") from None
            self._write_info()
            self.worker.start()
            self._start_outbox()
            self._start_sources()
            adopt_library_loggers()  # MLflow, if just imported, installed its own handler
            self.notifier.ready(self._status_line())
            log.info("daemon_ready", metrics=self._metrics_url(), watch_dir=str(s.watch_dir),
                     store_dir=str(s.store_dir), sources=[src.name for src in self.sources])
            self._loop()
            return 0
        finally:
            self._shutdown()

    # --- loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            for part in self.supervised:
                part.check()
            if not self.worker.is_alive():  # a bug: let systemd restart us, recovery re-queues the job
                log.error("worker_died")
                raise RuntimeError("the merge worker thread died")
            try:
                self._refresh_gauges()
                self._check_storage()
                self._write_inbox_info()
                self.notifier.status(self._status_line())
            except Exception:  # a broken store or journal must show, not stop the daemon (and its watchdog)
                log.exception("supervisor_tick_failed")
            self.notifier.watchdog()
            self.stop_event.wait(self.settings.loop_interval_seconds)

    def _refresh_gauges(self) -> None:
        counts = self.journal.counts()
        self.metrics.pending.set(sum(counts[st] for st in ACTIVE_STATES))
        active = self.journal.jobs(limit=1_000_000, states=ACTIVE_STATES)
        self.metrics.queued_interruptions.set(max((j.interruptions for j in active), default=0))
        try:
            prod = self.store.production()
        except StoreError:
            prod = None
        self.metrics.production_version.set(prod.number if prod else 0)
        if prod is not None:
            try:
                self.metrics.merge_step.set(prod.lineage().step)
            except NufiltError:
                pass
        rollbacks = self.journal.count_rollbacks()
        if rollbacks > self._rollbacks_seen:  # made by `nufilt rollback` in another process
            self.metrics.rollbacks.inc(rollbacks - self._rollbacks_seen)
            self._rollbacks_seen = rollbacks
            if self.outbox is not None:
                self.outbox.wake()
        promotions = [c for c in self.journal.production_changes(limit=100) if c.kind == ProductionChangeKind.PROMOTE]
        if promotions:
            self.metrics.last_promotion.set(promotions[0].at)
            if promotions[0].at != self._last_promotion_seen:  # publish at the next tick, not after the idle wait
                self._last_promotion_seen = promotions[0].at
                if self.outbox is not None:
                    self.outbox.wake()

    def _check_storage(self) -> None:
        now = time.monotonic()
        if now < self._next_storage_check:
            return
        self._next_storage_check = now + min(STORAGE_CHECK_MAX_SECONDS,
                                             STORAGE_CHECK_TICKS * self.settings.loop_interval_seconds)
        for label, d in (("store", Path(self.settings.store_dir)), ("state", Path(self.settings.state_dir))):
            problem = check_writable(d)
            self.metrics.storage_writable.labels(label).set(0 if problem else 1)
            if problem and self._storage_problems.get(label) != problem:
                log.error("storage_not_writable", dir=label, problem=problem)
            if problem:
                self._storage_problems[label] = problem
            else:
                self._storage_problems.pop(label, None)

    def inbox_info(self) -> dict[str, Any]:
        entries: list[dict[str, Any]] = []
        sources: dict[str, Any] = {}
        for src in self.sources:
            healthy = bool(src.healthy())
            sources[src.name] = src.health()
            self.metrics.source_healthy.labels(src.name).set(1 if healthy else 0)
            entries += [{**e, "source": src.name} for e in src.entries()]
        for state in INBOX_STATES:
            self.metrics.inbox_entries.labels(state).set(sum(e["state"] == state for e in entries))
        storage = dict(self._storage_problems)
        if self.worker.production_problem:
            storage["production"] = self.worker.production_problem
        return {"entries": entries, "sources": sources, "storage": storage}

    def _write_inbox_info(self) -> None:
        info = self.inbox_info()
        text = json.dumps(info, indent=1) + "\n"
        if text == self._inbox_written:
            return
        try:
            tmp = self.paths["inbox"].with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.paths["inbox"])
            self._inbox_written = text
        except OSError as e:  # a full state disk: the metric and the log say so
            log.warning("inbox_info_not_written", error=str(e))

    def _status_line(self) -> str:
        counts = self.journal.counts()
        try:
            prod = self.store.production()
        except StoreError:
            prod = None
        current = self.worker.current
        busy = f"merging job {current.id}" if current else "idle"
        done = ", ".join(f"{counts[s]} {s}" for s in OUTCOME_STATES)
        line = f"production {prod.name if prod else 'none'}; {counts[JobState.QUEUED]} queued; {busy}; {done}"
        unhealthy = [src.name for src in self.sources if not src.healthy()]
        if unhealthy:
            line += f"; UNHEALTHY source(s): {', '.join(unhealthy)}"
        problems = [*self._storage_problems.values(), *filter(None, [self.worker.production_problem])]
        if problems:
            line += "; " + "; ".join(problems)
        return line

    def _metrics_url(self) -> str | None:
        return f"http://{self.settings.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else None

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "metrics_url": self._metrics_url(), "started_at": time.time()}
        tmp = self.paths["info"].with_suffix(".tmp")
        tmp.write_text(json.dumps(info) + "\n")
        os.replace(tmp, self.paths["info"])

    # --- stop ------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            log.info("stop_requested", signal=signal.Signals(signum).name)
            self.stop_event.set()
        def hangup(signum: int, _frame: Any) -> None:  # the default would end the daemon without a word
            log.warning("sighup_ignored", reason="the configuration is read at start: restart the daemon to apply "
                        "changes")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, hangup)

    def _shutdown(self) -> None:
        self.notifier.stopping()
        for src in self.sources:
            try:
                src.stop()
            except Exception:
                log.exception("source_stop_failed", source=src.name)
        if self._worker is not None:
            self._worker.stop(self.settings.shutdown_grace_seconds)
        if self.outbox is not None:
            self.outbox.stop()
        if self.webhook is not None:
            self.webhook.stop()
        if self._metrics is not None:
            self._metrics.shutdown()
        if self._journal is not None:
            self._journal.close()
        self.paths["info"].unlink(missing_ok=True)
        self.paths["inbox"].unlink(missing_ok=True)
        for f in self._lock_files:
            f.close()
        log.info("daemon_stopped")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
