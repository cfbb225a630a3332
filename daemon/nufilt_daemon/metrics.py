"""Prometheus metrics, on their own registry, served at http://METRICS_HOST:METRICS_PORT/metrics.

Every labelled series is created at start (outcomes, sources), so dashboards and alerts see 0
rather than "no data" before the first event. The exception is nufilt_validation_score: a score
is a measurement, not a count, so it is exported only once measured (a 0.0 would read as
"perfect" for these lower-is-better scores). Labels never carry checkpoint names or hashes
(unbounded cardinality); those are in the logs and the journal.
"""

from __future__ import annotations

import platform
import socket
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nufilt_core import __version__

from .states import OUTCOME_STATES, OutboxKind

# no `*_created` series beside every counter and histogram: the daemon's start time is in
# process_start_time_seconds, and the extra series only clutter queries (`grep ^nufilt_`)
disable_created_metrics()

# merges take seconds to many minutes: 0.5 s … 1 h (the default buckets stop at 10 s)
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 2700, 3600)
# what a user waits for: a queue wait can be ~0 (an idle worker) or hours (a backlog of long merges);
# arrival to production is at least one merge: 0.1 s … 1 day
LATENCY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
REGISTRY_OPERATIONS = ("poll", *OutboxKind)  # the MLflow source polls, the outbox does the rest
INBOX_STATES = ("waiting", "ignored", "error")


class GpuMemoryCollector(Collector):
    """Device-wide used/total memory of each NVIDIA GPU, read with `nvidia-smi`.

    Not through torch: any torch.cuda memory query creates a CUDA context (hundreds of MiB per
    GPU) in the long-running daemon, taken from the merges, which run in child processes.
    """

    QUERY = ("nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily("nufilt_gpu_memory_used_bytes", "GPU memory in use on the device (all processes)",
                                 labels=["device"])
        total = GaugeMetricFamily("nufilt_gpu_memory_total_bytes", "GPU memory of the device", labels=["device"])
        for index, used_mib, total_mib in read_nvidia_smi(self.QUERY):
            used.add_metric([f"cuda:{index}"], used_mib * 1024**2)
            total.add_metric([f"cuda:{index}"], total_mib * 1024**2)
        yield used
        yield total


def read_nvidia_smi(query: tuple[str, ...]) -> list[tuple[int, float, float]]:
    """Rows of (index, used MiB, total MiB); empty when nvidia-smi is missing or fails."""
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            rows.append((int(parts[0]), float(parts[1]), float(parts[2])))
        except (IndexError, ValueError):
            continue  # "[N/A]" on some devices
    return rows


SCRAPE_TIMEOUT_SECONDS = 10.0  # socket timeout of a /metrics connection


class Metrics:
    def __init__(self, sources: Iterable[str] = ("folder",), gpu: bool = False):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.merge_duration = Histogram(
            "nufilt_merge_duration_seconds", "Wall time of one merge (child start to merged candidate)",
            buckets=DURATION_BUCKETS, registry=r)
        self.validation_duration = Histogram(
            "nufilt_validation_duration_seconds", "Wall time of validating one candidate (checks, scores, command)",
            buckets=DURATION_BUCKETS, registry=r)
        self.arrival_to_production = Histogram(
            "nufilt_arrival_to_production_seconds", "Time from a checkpoint's arrival (journaled) to its "
            "promotion to production", ["source"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "nufilt_queue_wait_seconds", "Time from a checkpoint's arrival (journaled) to the start of its "
            "first merge", ["source"], buckets=LATENCY_BUCKETS, registry=r)
        self.merges = Counter("nufilt_merges", "Finished merge jobs by outcome", ["outcome"], registry=r)
        self.detected = Counter("nufilt_checkpoints_detected", "Checkpoints handed over by a source",
                                ["source"], registry=r)
        self.duplicates = Counter("nufilt_duplicate_checkpoints", "Arrivals whose content was already journaled",
                                  registry=r)
        self.pending = Gauge("nufilt_pending_checkpoints", "Jobs queued or in progress", registry=r)
        self.production_version = Gauge("nufilt_production_version", "Store version number of production "
                                        "(0: none yet)", registry=r)
        self.merge_step = Gauge("nufilt_merge_step", "Continual step of production: checkpoints merged into it",
                                registry=r)
        self.last_promotion = Gauge("nufilt_last_promotion_timestamp_seconds", "Unix time of the last promotion",
                                    registry=r)
        self.rollbacks = Counter("nufilt_rollbacks", "Rollbacks of production", registry=r)
        self.production_reconciled = Counter(
            "nufilt_production_reconciled", "Production links found changed outside the daemon (deleted: restored; "
            "moved: followed and journaled)", registry=r)
        self.validation_score = Gauge("nufilt_validation_score", "Scores of the last validated candidate "
                                      "(surrogates: lower is better)", ["metric"], registry=r)
        self.registry_errors = Counter("nufilt_registry_errors", "Failed calls to the model registry (retried)",
                                       ["operation"], registry=r)
        self.registry_pending = Gauge("nufilt_registry_pending_publications", "Registry updates not yet done",
                                      registry=r)
        self.merge_peak_rss = Gauge("nufilt_merge_peak_rss_bytes", "Peak resident memory of the last merge "
                                    "process", registry=r)
        self.merge_gpu_peak = Gauge("nufilt_merge_gpu_peak_bytes", "Peak GPU memory allocated by the last merge",
                                    registry=r)
        self.inbox_entries = Gauge("nufilt_inbox_entries", "Inbox entries not journaled yet (waiting, error) and "
                                   "set aside unread (ignored, since start)", ["state"], registry=r)
        self.source_errors = Counter("nufilt_source_errors", "Errors of a source while examining or handing on "
                                     "entries", ["source"], registry=r)
        self.source_healthy = Gauge("nufilt_source_healthy", "1 while a source is healthy, 0 while it keeps "
                                    "failing", ["source"], registry=r)
        self.interruptions = Counter("nufilt_job_interruptions", "Jobs found in progress after a daemon restart "
                                     "(re-queued, never failed)", registry=r)
        self.queued_interruptions = Gauge("nufilt_queued_job_interruptions", "Most daemon restarts that interrupted "
                                          "one job still waiting or running (alert: a crash loop)", registry=r)
        self.storage_writable = Gauge("nufilt_storage_writable", "1 while the store and state dirs accept writes",
                                      ["dir"], registry=r)
        self.build = Info("nufilt_build", "Version of the running daemon", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version(), "torch": _torch_version()})
        for o in OUTCOME_STATES:
            self.merges.labels(o)
        for s in sources:
            self.detected.labels(s)
            self.arrival_to_production.labels(s)
            self.queue_wait.labels(s)
            self.source_errors.labels(s)
            self.source_healthy.labels(s).set(1)
        for st in INBOX_STATES:
            self.inbox_entries.labels(st)
        for d in ("store", "state"):
            self.storage_writable.labels(d).set(1)
        for op in REGISTRY_OPERATIONS:
            self.registry_errors.labels(op)
        if gpu:
            r.register(GpuMemoryCollector())
        self._server: WSGIServer | None = None
        self._scores_shown: set[str] = set()

    def observe_merge_start(self, source: str, arrived_at: float, started_at: float) -> None:
        """Queue wait of a job's first merge (a retry or a redo after a restart is not a new wait)."""
        self.queue_wait.labels(source).observe(max(0.0, started_at - arrived_at))  # wall clock may step back

    def observe_promotion(self, source: str, arrived_at: float, promoted_at: float) -> None:
        self.arrival_to_production.labels(source).observe(max(0.0, promoted_at - arrived_at))

    def show_scores(self, values: Mapping[str, float]) -> None:
        """nufilt_validation_score holds exactly `values` (the last candidate's measured scores): the
        series of a score not measured this time are removed, not left at an older candidate's value."""
        for name in self._scores_shown - set(values):
            self.validation_score.remove(name)
        for name, value in values.items():
            self.validation_score.labels(name).set(value)
        self._scores_shown = set(values)

    def serve(self, host: str, port: int, request_timeout: float = SCRAPE_TIMEOUT_SECONDS) -> int:
        """Start /metrics in a background thread; returns the bound port (port 0: any free one). Each connection
        has a socket timeout: a client that connects and sends nothing does not hold a thread for ever."""

        class Handler(WSGIRequestHandler):
            timeout = request_timeout

            def log_message(self, format: str, *args: Any) -> None:  # a line per scrape would flood stderr
                pass

        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        server = make_server(host, port, make_wsgi_app(self.registry), Server, Handler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._server = server
        return int(server.server_address[1])

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def measured_scores(metrics: Mapping[str, float], scores: Mapping[str, Any],
                    reported: Mapping[str, float]) -> dict[str, float]:
    """The gate's metrics less the built-in surrogates nothing was measured for: stability at step 1
    (no earlier directions, its reference is 0), plasticity when the new checkpoint's directions are
    empty, the harmonic mean when either is missing. A value the validation command `reported` is
    its measurement and kept. (The gate itself still sees 0.0 for these: its decisions do not change.)"""
    unmeasured: set[str] = set()
    if not scores.get("stability_ref", 0) > 0:
        unmeasured |= {"stability", "harmonic_mean"}
    if not scores.get("plasticity_ref", 0) > 0:
        unmeasured |= {"plasticity", "harmonic_mean"}
    return {k: v for k, v in metrics.items() if k not in unmeasured or k in reported}


def _torch_version() -> str:
    import torch

    return torch.__version__
