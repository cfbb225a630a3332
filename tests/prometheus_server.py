"""A real Prometheus (the Debian package's /usr/bin/prometheus) on loopback, for the deploy tests.

Started from a config file the test writes, with its TSDB in a temporary folder; always killed
(its whole process group) on leaving the `with`, so no server outlives a test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from mlflow_server import free_port


def require_binary(name: str, package: str = "the Debian package prometheus") -> str:
    """The binary's path. Missing: a failure in CI (CI=true), else a skip that says how to install it."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"`{name}` not found: install {package} (as .ci/run does with apt-get)"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}; CI must have it")
    pytest.skip(reason)


class Prometheus:
    def __init__(self, config: Path, root: Path):
        self.binary = require_binary("prometheus")
        self.config, self.root = config, root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.root / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self._ready():
            if self._proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self._proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready after 30 s:\n{self.log()}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH; returns `data`, raises with Prometheus's own error message."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query at now: the result vector (a scalar comes back as one unlabelled sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", f"{expr}: unexpected {data['resultType']}"
        return data["result"]
