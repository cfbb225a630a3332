"""The shipped operations files (systemd/, deploy/), read the way the deploy tests need them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
DEPLOY = REPO / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST_YML = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "nufilt-dashboard.json"
COMPOSE = DEPLOY / "compose.yaml"
JOB = "nufilt"  # the scrape job the rules and the dashboard select on

# Grafana's built-in variables, as a test evaluates them: windows wide enough to hold the whole run
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every panel."""
    out = []
    for panel in dashboard()["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["refId"], t["expr"]))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def expand(expr: str, values: dict[str, str]) -> str:
    """Substitute Grafana variables ($name, ${name}, [[name]]); an unknown one is an error."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"{expr}: no value for the variable ${name}")
        return values[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", sub, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names of the vector selectors in a PromQL expression (every selector here has `{...}`)."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
