"""Logs are JSON lines with context, stdlib loggers included; metrics exist before any event."""

from __future__ import annotations

import io
import json
import logging
import os
import urllib.request

import pytest
import structlog
from models import base_state, finetune, write_model
from nufilt_daemon.config import GateSettings
from nufilt_daemon.gate import decide
from nufilt_daemon.logging import configure_logging
from nufilt_daemon.metrics import DURATION_BUCKETS, LATENCY_BUCKETS, Metrics, measured_scores
from prometheus_client.parser import text_string_to_metric_families

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.scores import surrogate_scores
from nufilt_core.selection import is_linear_weight


def test_json_lines_with_utc_timestamps_bound_context_and_library_loggers():
    buf = io.StringIO()
    configure_logging("info", "json", buf)
    try:
        structlog.get_logger("nufilt.worker").bind(job=7, checkpoint="task7").info("merge_finished", version=3)
        logging.getLogger("watchdog.observers").warning("inotify watch limit reached")
        logging.getLogger("watchdog.observers").info("chatter")  # libraries are kept at warning
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("nufilt.worker").exception("job_error", job=8)
    finally:
        configure_logging("warning", "json")
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [e["event"] for e in lines] == ["merge_finished", "inotify watch limit reached", "job_error"]
    first = lines[0]
    assert (first["job"], first["checkpoint"], first["version"], first["level"]) == (7, "task7", 3, "info")
    assert first["timestamp"].endswith("Z") and "T" in first["timestamp"]
    assert lines[1]["logger"] == "watchdog.observers" and lines[1]["level"] == "warning"
    assert "ValueError: boom" in lines[2]["exception"]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_are_served_with_every_label_set_from_the_start():
    m = Metrics(sources=["folder", "mlflow"])
    port = m.serve("127.0.0.1", 0)
    try:
        samples = scrape(port)
    finally:
        m.shutdown()
    for outcome in ("promoted", "rejected", "failed"):
        assert samples[("nufilt_merges_total", (("outcome", outcome),))] == 0
    for source in ("folder", "mlflow"):
        assert samples[("nufilt_checkpoints_detected_total", (("source", source),))] == 0
        for name in ("nufilt_arrival_to_production_seconds", "nufilt_queue_wait_seconds"):
            assert samples[(f"{name}_count", (("source", source),))] == 0
            assert samples[(f"{name}_bucket", (("le", "86400.0"), ("source", source)))] == 0
    # nothing validated yet: no score is exported (0.0 would read as a perfect, measured score)
    assert not [k for k in samples if k[0] == "nufilt_validation_score"]
    for name in ("nufilt_pending_checkpoints", "nufilt_production_version", "nufilt_merge_step",
                 "nufilt_last_promotion_timestamp_seconds", "nufilt_rollbacks_total"):
        assert samples[(name, ())] == 0
    assert ("nufilt_merge_duration_seconds_bucket", (("le", "3600.0"),)) in samples
    assert ("nufilt_validation_duration_seconds_bucket", (("le", "0.5"),)) in samples
    assert DURATION_BUCKETS[0] == 0.5 and DURATION_BUCKETS[-1] == 3600
    assert LATENCY_BUCKETS[0] == 0.1 and LATENCY_BUCKETS[-1] == 86400  # seconds to a day
    assert any(k[0] == "nufilt_build_info" for k in samples)
    assert any(k[0] == "process_resident_memory_bytes" for k in samples)
    assert not [k for k in samples if k[0].endswith("_created")]  # no creation-time series beside the counters


def test_latency_histograms_observe_per_source_and_never_negative():
    m = Metrics(sources=["folder", "mlflow"])
    m.observe_merge_start("mlflow", arrived_at=100.0, started_at=103.0)
    m.observe_promotion("folder", arrived_at=100.0, promoted_at=700.0)
    m.observe_promotion("folder", arrived_at=100.0, promoted_at=99.0)  # the wall clock stepped back
    port = m.serve("127.0.0.1", 0)
    try:
        samples = scrape(port)
    finally:
        m.shutdown()
    wait = "nufilt_queue_wait_seconds"
    assert samples[(f"{wait}_count", (("source", "mlflow"),))] == 1
    assert samples[(f"{wait}_sum", (("source", "mlflow"),))] == 3.0
    assert samples[(f"{wait}_count", (("source", "folder"),))] == 0
    e2e = "nufilt_arrival_to_production_seconds"
    assert samples[(f"{e2e}_count", (("source", "folder"),))] == 2
    assert samples[(f"{e2e}_sum", (("source", "folder"),))] == 600.0
    assert samples[(f"{e2e}_bucket", (("le", "0.1"), ("source", "folder")))] == 1  # the clamped 0
    assert samples[(f"{e2e}_bucket", (("le", "300.0"), ("source", "folder")))] == 1
    assert samples[(f"{e2e}_bucket", (("le", "600.0"), ("source", "folder")))] == 2


def test_scores_are_exported_only_where_measured(tmp_path):
    """Real surrogate scores of tiny models through the real gate: at step 1 (no previous model) the
    gate still sees stability 0.0 (and accepts under a threshold on it, as before), but the gauge
    shows only what was measured; a later candidate's gauge drops an earlier one's extra series."""
    base = base_state()
    t1, t2 = finetune(base, 1), finetune(base, 2)
    merged = {k: (v + t2[k]) / 2 if v.is_floating_point() else v for k, v in t1.items()}
    ckpt = {name: Checkpoint.open(write_model(state, tmp_path / name))
            for name, state in (("base", base), ("t1", t1), ("t2", t2), ("merged", merged))}
    gate = GateSettings.model_validate({"thresholds": {"stability": {"max": 0.5}}})

    def gate_metrics(previous: Checkpoint | None, new: Checkpoint, candidate: Checkpoint
                     ) -> tuple[dict[str, float], dict[str, float]]:
        scores = surrogate_scores(ckpt["base"], previous, new, candidate, is_linear_weight).as_dict()
        decision = decide({"problems": [], "scores": scores}, candidate.path, gate)
        assert decision.outcome == "accepted", decision.reasons
        return decision.metrics, scores

    step1, scores1 = gate_metrics(None, ckpt["t1"], ckpt["t1"])
    assert scores1["stability_ref"] == 0 and step1["stability"] == 0.0  # nothing measured, gate unchanged
    step2, scores2 = gate_metrics(ckpt["t1"], ckpt["t2"], ckpt["merged"])
    assert scores2["stability_ref"] > 0 and step2["stability"] > 0

    m = Metrics()
    port = m.serve("127.0.0.1", 0)
    try:
        def shown() -> dict[str, float]:
            return {dict(k[1])["metric"]: v for k, v in scrape(port).items() if k[0] == "nufilt_validation_score"}

        m.show_scores(measured_scores(step1, scores1, {}))
        assert set(shown()) == {"plasticity"}
        m.show_scores(measured_scores({**step2, "accuracy": 0.9}, scores2, {"accuracy": 0.9}))
        assert shown() == pytest.approx({**{k: step2[k] for k in ("stability", "plasticity", "harmonic_mean")},
                                         "accuracy": 0.9})
        m.show_scores(measured_scores(step1, scores1, {}))  # the next candidate: step 1 again, no command
        assert set(shown()) == {"plasticity"}
        # a validation command's own "stability" is its measurement, kept even at step 1
        assert measured_scores({**step1, "stability": 0.25}, scores1, {"stability": 0.25})["stability"] == 0.25
    finally:
        m.shutdown()


def test_gpu_memory_is_read_from_nvidia_smi_without_cuda(tmp_path, monkeypatch):
    """No GPU here: a stand-in `nvidia-smi` on PATH prints what the real one prints."""
    from nufilt_daemon.metrics import GpuMemoryCollector

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0, 1024, 81559\\n1, [N/A], [N/A]\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    families = {f.name: f for f in GpuMemoryCollector().collect()}
    used = families["nufilt_gpu_memory_used_bytes"].samples
    assert [(s.labels["device"], s.value) for s in used] == [("cuda:0", 1024 * 1024**2)]
    assert families["nufilt_gpu_memory_total_bytes"].samples[0].value == 81559 * 1024**2
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi at all: no samples, no error
    assert all(not f.samples for f in GpuMemoryCollector().collect())


def test_a_metrics_connection_that_sends_nothing_is_closed():
    import socket
    import time

    m = Metrics(sources=["folder"])
    port = m.serve("127.0.0.1", 0, request_timeout=0.5)
    try:
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        t0 = time.monotonic()
        assert idle.recv(100) == b""  # closed by the server
        assert time.monotonic() - t0 < 5
        idle.close()
        assert ("nufilt_production_version", ()) in scrape(port)  # and it still serves
    finally:
        m.shutdown()
