"""deploy/prometheus and the Grafana dashboard against the real programs: promtool checks and unit
tests the rules; a real Prometheus scrapes a real daemon that merged two checkpoints, and every
dashboard query and every alert expression is evaluated through its HTTP API."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from daemon_harness import DaemonProcess, wait_for
from deploy_files import (
    ALERTS_TEST_YML,
    ALERTS_YML,
    GRAFANA_BUILTINS,
    JOB,
    PROMETHEUS_YML,
    alert_rules,
    dashboard,
    dashboard_targets,
    expand,
    load_yaml,
    metric_names,
)
from models import base_state, finetune, write_model
from nufilt_daemon.metrics import LATENCY_BUCKETS, GpuMemoryCollector
from prometheus_server import Prometheus, require_binary

pytestmark = pytest.mark.slow


def promtool(*args: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run([require_binary("promtool"), *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=cwd)
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_promtool_accepts_the_rules_and_the_config_and_the_rule_unit_tests_pass():
    rules = alert_rules()
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", ALERTS_YML)
    assert "is valid prometheus config file syntax" in promtool("check", "config", PROMETHEUS_YML)
    assert "SUCCESS" in promtool("test", "rules", ALERTS_TEST_YML.name, cwd=ALERTS_TEST_YML.parent)
    # every alert has a case where it must fire, so none is shipped untested
    fired = {case["alertname"] for test in load_yaml(ALERTS_TEST_YML)["tests"]
             for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert {r["alert"] for r in rules} <= fired


def scrape_config(tmp: Path, daemon_target: str) -> Path:
    """deploy/prometheus/prometheus.yml with the nufilt job pointed at the test daemon, 1 s intervals."""
    config = load_yaml(PROMETHEUS_YML)
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert len(jobs) == 1 and len(jobs[0]["static_configs"]) == 1, "expected one static nufilt job"
    job = jobs[0]
    job["static_configs"][0]["targets"] = [daemon_target]
    job["scrape_interval"] = "1s"
    config["scrape_configs"] = [job]  # the self-scrape job's target is the compose host name
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for rule_file in config["rule_files"]:  # relative to the config file, as in deploy/
        shutil.copy(PROMETHEUS_YML.parent / rule_file, tmp / rule_file)
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    promtool("check", "config", path)
    return path


def has_gpu_metrics(d: DaemonProcess) -> bool:
    return any(name.startswith("nufilt_gpu_memory_") for name, _ in d.metrics())


def test_every_dashboard_query_and_alert_evaluates_on_a_real_scrape(tiny: dict[str, Path], tmp_path: Path):
    require_binary("prometheus")  # skip (or fail in CI) before starting anything
    d = DaemonProcess(tmp_path / "svc", tiny["base"]).start()
    try:
        target = json.loads((d.state / "daemon.json").read_text())["metrics_url"].split("/")[2]  # host:port
        with Prometheus(scrape_config(tmp_path, target), tmp_path / "prom") as prom:
            wait_for("the first scrape", lambda: prom.query(f'up{{job="{JOB}"}} == 1'), timeout=30)
            # while Prometheus watches, so rates and quantiles see the merges happen
            d.drop(tiny["t1"], "task1")
            wait_for("Prometheus to see version 1", lambda: prom.query(
                f'nufilt_production_version{{job="{JOB}"}} == 1'), timeout=120)
            check_step_one_scores(prom)
            d.drop(tiny["t2"], "task2")
            wait_for("two promotions", lambda: len(d.in_states("promoted")) == 2, timeout=120)
            wait_for("Prometheus to see version 2 and an empty queue", lambda: prom.query(
                f'nufilt_production_version{{job="{JOB}"}} == 2 and on() nufilt_pending_checkpoints == 0'
                f' and on() nufilt_merges_total{{outcome="promoted"}} == 2'), timeout=30)

            check_dashboard_queries(prom, d, target)
            check_latency_histograms(prom, d)
            check_alert_rules(prom)

            # a healthy daemon raises nothing; a real rejection fires the real alert
            assert prom.api("alerts")["alerts"] == []
            corrupt = write_model(finetune(base_state(), 7), tmp_path / "corrupt")
            data = (corrupt / "model.safetensors").read_bytes()
            (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
            (corrupt / "_COMPLETE").touch()
            d.drop(corrupt, "corrupt")
            firing = wait_for("NufiltCheckpointRejected to fire", lambda: [
                a for a in prom.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "NufiltCheckpointRejected" and a["state"] == "firing"], timeout=30)
            assert firing[0]["labels"]["instance"] == target and firing[0]["labels"]["severity"] == "warning"
    finally:
        assert d.stop() == 0


def check_dashboard_queries(prom: Prometheus, d: DaemonProcess, target: str) -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    # $instance: Grafana's label_values(up{job="nufilt"}, instance), asked of the same API
    assert variables["instance"]["definition"] == f'label_values(up{{job="{JOB}"}}, instance)'
    instances = prom.api("label/instance/values", **{"match[]": f'up{{job="{JOB}"}}'})
    assert instances == [target]
    values = {**GRAFANA_BUILTINS, "instance": target, "datasource": "prometheus"}
    values.update({n: v["current"]["value"] for n, v in variables.items() if v["type"] == "custom"})

    exposed = {name for name, _ in d.metrics()} | {"up"}
    gpu_only = {fam.name for fam in GpuMemoryCollector().collect()}
    gpu = has_gpu_metrics(d)
    empty_on_cpu = []
    targets = dashboard_targets()
    assert len(targets) >= 20
    for title, ref, raw in targets:
        expr = expand(raw, values)
        names = metric_names(expr)
        assert names, f"{title}/{ref}: no metric selector in {expr}"
        unknown = {n for n in names if n not in exposed and not (n in gpu_only and not gpu)}
        assert not unknown, f"{title}/{ref}: the daemon exposes no {sorted(unknown)}"
        result = prom.query(expr)
        if not gpu and names <= gpu_only:
            empty_on_cpu.append(f"{title}/{ref}")  # device-wide GPU memory: only where CUDA is
            continue
        assert result, f"{title}/{ref}: no data for {expr}"
        for sample in result:
            value = float(sample["value"][1])
            assert math.isfinite(value), f"{title}/{ref}: {value} for {sample['metric']} from {expr}"
    assert len(empty_on_cpu) <= 2, empty_on_cpu


def check_step_one_scores(prom: Prometheus) -> None:
    """Step 1 has no previous model: stability (and the harmonic mean) were not measured, so the
    scrape that shows version 1 (a scrape is atomic; the scores are set before the promotion) holds
    plasticity alone, not a 0.0 "lower is better" score."""
    shown = {s["metric"]["metric"] for s in prom.query(f'nufilt_validation_score{{job="{JOB}"}}')}
    assert shown == {"plasticity"}, shown


def check_latency_histograms(prom: Prometheus, d: DaemonProcess) -> None:
    """Both jobs are in the arrival-to-production and queue-wait histograms of their source, and the
    dashboard's quantile of the first lies in the buckets that hold the journal's own latencies."""
    for name in ("nufilt_arrival_to_production_seconds", "nufilt_queue_wait_seconds"):
        counts = {s["metric"]["source"]: float(s["value"][1])
                  for s in prom.query(f'{name}_count{{job="{JOB}"}}')}
        assert counts == {"folder": 2.0}, (name, counts)
    # the journal's promotion time; the metric is taken just after it (milliseconds later: + 1 s)
    latencies = sorted(j["finished_at"] - j["created_at"] for j in d.in_states("promoted"))
    panel = next(p for p in dashboard()["panels"] if p["title"] == "Arrival to production")
    values = {"instance": ".*", "window": "1h"}
    for target in panel["targets"][:2]:  # end to end p50, p95
        (sample,) = prom.query(expand(target["expr"], values))
        quantile = float(sample["value"][1])
        low = max([0.0, *(b for b in LATENCY_BUCKETS if b < latencies[0])])
        high = min(b for b in LATENCY_BUCKETS if b >= latencies[-1] + 1)
        assert sample["metric"] == {"source": "folder"} and low <= quantile <= high, (target["expr"], quantile,
                                                                                     latencies)


def check_alert_rules(prom: Prometheus) -> None:
    rules = alert_rules()
    for rule in rules:
        prom.query(rule["expr"])  # parses and evaluates (raises with Prometheus's error otherwise)
        for name in metric_names(rule["expr"]):  # and every series it watches exists for the job
            assert prom.query(f'count({{__name__="{name}", job="{JOB}"}})'), f"{rule['alert']}: no {name}"
    # the same rules, loaded from the file by the running Prometheus, evaluate without error
    def evaluated() -> list[dict]:
        loaded = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return loaded if loaded and all(r["health"] == "ok" for r in loaded) else []
    loaded = wait_for("every rule evaluated", evaluated, timeout=15)
    assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in rules)
