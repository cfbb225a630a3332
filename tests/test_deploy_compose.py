"""deploy/compose.yaml, the daemon's Dockerfile and the Grafana files, checked statically (no Docker
engine here): services, volumes, ports and environment agree with each other, with the daemon's
real settings, with deploy/prometheus and with MLflow's own host check."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
from deploy_files import (
    COMPOSE,
    DASHBOARD,
    DEPLOY,
    JOB,
    PROMETHEUS_YML,
    alert_rules,
    dashboard,
    dashboard_targets,
    load_yaml,
)
from mlflow.server.security_utils import is_allowed_host_header
from nufilt_daemon.config import load_settings, unknown_env_keys
from prometheus_server import require_binary

HOST_ENV = {"NUFILT_BASE_MODEL_DIR": "/srv/models/base", "GRAFANA_ADMIN_PASSWORD": "pw"}  # what README exports


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} (a missing required variable raises)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value)


def compose(env: dict[str, str] = HOST_ENV) -> dict[str, Any]:
    return interpolate(load_yaml(COMPOSE), env)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source (a named volume, or a path relative to deploy/)."""
    out = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        out[target] = source
    return out


def under_mount(path: str, service: dict[str, Any]) -> str | None:
    """The mount target that holds `path`, if any."""
    hits = [t for t in mounts(service) if PurePosixPath(path).is_relative_to(t)]
    return max(hits, key=len) if hits else None


def flags(command: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in command if a.startswith("--") and "=" in a)


def test_services_volumes_and_published_ports():
    c = compose()
    assert set(c["services"]) == {"nufilt", "mlflow", "prometheus", "grafana"}
    named = set()
    for name, svc in c["services"].items():
        for source in mounts(svc).values():
            if source.startswith("."):  # bind mounts of shipped files; ./inbox is the operator's to create
                assert (DEPLOY / source).exists() or source == "./inbox", f"{name}: {source} missing"
            elif not source.startswith("/"):
                named.add(source)
        for port in svc.get("ports", []):  # nothing listens beyond this host without a proxy in front
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"
    assert named == set(c["volumes"])
    with pytest.raises(KeyError, match="NUFILT_BASE_MODEL_DIR"):
        compose({"GRAFANA_ADMIN_PASSWORD": "pw"})  # no silent empty base model mount
    with pytest.raises(KeyError, match="GRAFANA_ADMIN_PASSWORD"):
        compose({"NUFILT_BASE_MODEL_DIR": "/m"})  # no admin/admin Grafana


def daemon_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    for k in list(os.environ):
        if k.startswith("NUFILT_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    return load_settings()


def test_daemon_environment_is_a_valid_config_that_fits_its_volumes_and_neighbours(monkeypatch):
    c = compose()
    svc = c["services"]["nufilt"]
    env = svc["environment"]
    assert unknown_env_keys(env) == []
    s = daemon_settings(env, monkeypatch)
    m = mounts(svc)
    # the base model is mounted read-only; inbox, store and state live on volumes (survive a re-create)
    assert m[str(s.base_model)] == HOST_ENV["NUFILT_BASE_MODEL_DIR"]
    assert any(v.endswith(f":{s.base_model}:ro") for v in svc["volumes"])
    assert str(s.watch_dir) in m
    for d in (s.store_dir, s.state_dir):
        assert under_mount(str(d), svc) and not m[under_mount(str(d), svc)].startswith("."), d
    # /metrics: reachable from Prometheus's container, on the port it scrapes and compose publishes
    assert s.metrics_host == "0.0.0.0"
    job = next(j for j in load_yaml(PROMETHEUS_YML)["scrape_configs"] if j["job_name"] == JOB)
    assert job["static_configs"][0]["targets"] == [f"nufilt:{s.metrics_port}"]
    assert f"127.0.0.1:{s.metrics_port}:{s.metrics_port}" in svc["ports"]
    dockerfile = (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
    assert f"EXPOSE {s.metrics_port}" in dockerfile.read_text()
    # stopping: the merge gets its grace, the daemon its clean-up, before Docker's SIGKILL
    grace = svc["stop_grace_period"]
    assert int(grace.rstrip("m")) * 60 >= s.shutdown_grace_seconds + 30 and svc["init"] is True

    # MLflow: the daemon's URL names the service and its port, and MLflow accepts that Host header
    ml = c["services"]["mlflow"]
    url = urlsplit(s.mlflow.tracking_uri)
    args = flags(ml["command"])
    assert url.hostname == "mlflow" and str(url.port) == args["port"] and args["host"] == "0.0.0.0"
    allowed = ml["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert is_allowed_host_header(allowed, url.netloc)
    assert is_allowed_host_header(allowed, f"localhost:{args['port']}")  # the published port, from a browser
    assert not is_allowed_host_header(allowed, f"evil.example:{args['port']}")
    assert svc["depends_on"]["mlflow"]["condition"] == "service_healthy" and "healthcheck" in ml
    # its database and artifacts are on its volume
    db = args["backend-store-uri"].removeprefix("sqlite:///")
    assert args["backend-store-uri"].startswith("sqlite:////") and under_mount(db, ml)
    assert under_mount(args["artifacts-destination"], ml)
    assert s.mlflow.source_model and s.mlflow.target_model


def test_compose_files_match_the_compose_specification(tmp_path: Path):
    """Docker's compose-spec JSON schema (vendored in check-jsonschema): no engine needed."""
    exe = Path(sys.executable).with_name("check-jsonschema")
    if not exe.exists():
        exe = Path(require_binary("check-jsonschema", "the PyPI package check-jsonschema (a dev extra)"))
    proc = subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", str(COMPOSE),
                           str(DEPLOY / "compose.gpu.yaml")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "compose.yaml"  # and the check does reject a misspelt key
    bad.write_text(COMPOSE.read_text().replace("    depends_on:", "    depend_on:", 1))
    proc = subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "depend_on" in proc.stdout, proc.stdout + proc.stderr


def test_gpu_override_only_adds_the_gpu(monkeypatch):
    gpu = load_yaml(DEPLOY / "compose.gpu.yaml")
    assert set(gpu["services"]) == {"nufilt"}
    svc = gpu["services"]["nufilt"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    env = {**compose()["services"]["nufilt"]["environment"], **svc["environment"]}
    assert daemon_settings(env, monkeypatch).device == "cuda"


def test_prometheus_and_grafana_wiring():
    c = compose()
    prom = c["services"]["prometheus"]
    args, m = flags(prom["command"]), mounts(prom)
    config = args["config.file"]
    assert m[config] == "./prometheus/prometheus.yml"
    for rule_file in load_yaml(PROMETHEUS_YML)["rule_files"]:  # resolved next to the config file
        assert m[str(PurePosixPath(config).parent / rule_file)] == f"./prometheus/{rule_file}"
    assert under_mount(args["storage.tsdb.path"], prom) and "web.listen-address" not in args  # :9090

    graf = c["services"]["grafana"]
    gm = mounts(graf)
    ds_dir = "/etc/grafana/provisioning/datasources"
    assert gm[ds_dir] == "./grafana/provisioning/datasources"
    (ds,) = [d for f in (DEPLOY / gm[ds_dir]).glob("*.yml") for d in load_yaml(f)["datasources"]]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["isDefault"] is True
    job = next(j for j in load_yaml(PROMETHEUS_YML)["scrape_configs"] if j["job_name"] == JOB)
    assert ds["jsonData"]["timeInterval"] == job["scrape_interval"]  # what $__rate_interval is built on
    db_dir = "/etc/grafana/provisioning/dashboards"
    (provider,) = load_yaml(DEPLOY / gm[db_dir] / "nufilt.yml")["providers"]
    dash_target = next(t for t, src in gm.items() if src == "./grafana/nufilt-dashboard.json")
    assert PurePosixPath(dash_target).parent == PurePosixPath(provider["options"]["path"])
    assert graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dash_target


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    allowed = True
    for p in patterns:
        negate = p.startswith("!")
        pat = p.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            allowed = negate
    return allowed


def test_dockerfile_builds_from_what_the_context_sends():
    svc = compose()["services"]["nufilt"]
    context = (DEPLOY / svc["build"]["context"]).resolve()
    dockerfile = context / svc["build"]["dockerfile"]
    text = dockerfile.read_text()
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in ignore if ln.strip() and not ln.startswith("#")]
    sources = [src for line in text.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert {"pyproject.toml", "nufilt_core", "daemon"} <= set(sources)
    for src in sources:
        assert (context / src).exists() and dockerignore_allows(patterns, src), src
    assert not dockerignore_allows(patterns, ".venv") and not dockerignore_allows(patterns, ".git")
    assert re.search(r"^USER nufilt$", text, re.M) and 'ENTRYPOINT ["nufilt"]' in text and 'CMD ["daemon"]' in text
    uid = re.search(r"--uid (\d+)", text).group(1)  # the compose comment tells operators to chown the inbox to it
    assert f"install -d -o {uid} -g {uid} inbox" in COMPOSE.read_text()


def test_dashboard_is_well_formed_and_covers_what_operators_watch():
    board = dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and board["uid"] == "nufilt"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "instance"} <= names
    exprs = [e for _, _, e in dashboard_targets()] + [r["expr"] for r in alert_rules()]
    for expr in exprs:  # every selector picks the nufilt job (process_* exists in every job)
        for selector in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*\{[^}]*\}", expr):
            assert f'job="{JOB}"' in selector, f"{selector} in {expr}"
    everything = json.dumps(board)
    for must in ("nufilt_production_version", "time() - (nufilt_last_promotion_timestamp_seconds",
                 "sum by (outcome) (increase(nufilt_merges_total", "histogram_quantile(0.5,",
                 "histogram_quantile(0.95,", "nufilt_pending_checkpoints", "nufilt_validation_score",
                 "process_resident_memory_bytes", "nufilt_gpu_memory_used_bytes", "nufilt_rollbacks_total",
                 "nufilt_arrival_to_production_seconds_bucket", "nufilt_queue_wait_seconds_bucket"):
        assert must in everything, must
    assert DASHBOARD.stat().st_size < 200_000


def test_operator_guide_links_resolve():
    guide = DEPLOY / "README.md"
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", guide.read_text())
    assert len(links) >= 10
    for link in links:
        assert (guide.parent / link).exists(), link
