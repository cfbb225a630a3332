"""Logs are JSON lines with context, stdlib loggers included; metrics exist before any event."""

from __future__ import annotations

import io
import json
import logging
import os
import urllib.request

import structlog
from nufilt_daemon.logging import configure_logging
from nufilt_daemon.metrics import DURATION_BUCKETS, Metrics
from prometheus_client.parser import text_string_to_metric_families


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


def test_metrics_are_served_with_every_label_set_from_the_start():
    m = Metrics(sources=["folder", "mlflow"], score_names=["accuracy"])
    port = m.serve("127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        m.shutdown()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    for outcome in ("promoted", "rejected", "failed"):
        assert samples[("nufilt_merges_total", (("outcome", outcome),))] == 0
    for source in ("folder", "mlflow"):
        assert samples[("nufilt_checkpoints_detected_total", (("source", source),))] == 0
    for metric in ("stability", "plasticity", "harmonic_mean", "accuracy"):
        assert ("nufilt_validation_score", (("metric", metric),)) in samples
    for name in ("nufilt_pending_checkpoints", "nufilt_production_version", "nufilt_merge_step",
                 "nufilt_last_promotion_timestamp_seconds", "nufilt_rollbacks_total"):
        assert samples[(name, ())] == 0
    assert ("nufilt_merge_duration_seconds_bucket", (("le", "3600.0"),)) in samples
    assert ("nufilt_validation_duration_seconds_bucket", (("le", "0.5"),)) in samples
    assert DURATION_BUCKETS[0] == 0.5 and DURATION_BUCKETS[-1] == 3600
    assert any(k[0] == "nufilt_build_info" for k in samples)
    assert any(k[0] == "process_resident_memory_bytes" for k in samples)
    assert not [k for k in samples if k[0].endswith("_created")]  # no creation-time series beside the counters


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
