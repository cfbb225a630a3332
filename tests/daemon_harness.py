"""A real `nufilt daemon` subprocess on a temporary store, for the end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

NUFILT = str(Path(sys.executable).parent / "nufilt")


def toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)  # strings, numbers, booleans and lists of them are valid TOML this way


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 90, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class DaemonProcess:
    def __init__(self, root: Path, base: Path, **overrides: Any):
        self.root = root
        self.inbox, self.store, self.state = root / "inbox", root / "store", root / "state"
        self.log_path = root / "daemon.log"
        self.config = root / "nufilt.toml"
        root.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {
            "base_model": str(base), "watch_dir": str(self.inbox), "store_dir": str(self.store),
            "state_dir": str(self.state), "metrics_port": 0, "log_format": "json", "loop_interval_seconds": 0.2,
            "shutdown_grace_seconds": 2, "device": "cpu", "interrupted_retry_seconds": 0.2,
            # the paper's NUFILT, few Adam steps: fast merges (the math and the default are tested elsewhere)
            "method_settings": {"profile": "paper", "iters": 3},
        }
        sections: dict[str, dict[str, Any]] = {"folder": {"settle_seconds": 0.2, "rescan_interval_seconds": 1}}
        for k, v in overrides.items():
            if k in ("folder", "gate", "mlflow"):
                sections.setdefault(k, {}).update(v)
            else:
                settings[k] = v
        lines = [f"{k} = {toml_value(v)}" for k, v in settings.items()]
        for name, sec in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in sec.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready_before = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUFILT_")}
        env["OMP_NUM_THREADS"] = "1"  # a shared 2-core machine: no thread oversubscription
        return env

    def start(self, extra_env: dict[str, str] | None = None, wait_ready: bool = True) -> DaemonProcess:
        """Start the daemon; unless `wait_ready` is False, return once this process logged daemon_ready."""
        # the log is appended across restarts: count the earlier daemons' daemon_ready lines
        self._ready_before = len(self.logged("daemon_ready")) if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([NUFILT, "daemon", "--config", str(self.config)], stdout=log,
                                     stderr=subprocess.STDOUT, env={**self.env(), **(extra_env or {})})
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Until the running process logged its own daemon_ready (its metrics endpoint is up by then)."""
        wait_for("daemon_ready in the log", lambda: len(self.logged("daemon_ready")) > self._ready_before
                 or self._died(), timeout=60)
        assert self.proc is not None and self.proc.poll() is None, \
            f"daemon exited with {self.proc.returncode if self.proc else None}:\n{self.log_path.read_text()}"

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("daemon did not stop within 30 s of SIGTERM") from None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    # --- observing ------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event]

    def jobs(self) -> list[dict[str, Any]]:
        db = self.state / "journal.db"
        if not db.exists():
            return []
        with sqlite3.connect(db, timeout=10) as con:
            con.row_factory = sqlite3.Row
            return [dict(r) for r in con.execute("SELECT * FROM jobs ORDER BY id")]

    def in_states(self, *states: str) -> list[dict[str, Any]]:
        return [j for j in self.jobs() if j["state"] in states]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = json.loads((self.state / "daemon.json").read_text())["metrics_url"]
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([NUFILT, *args, "--config", str(self.config)], capture_output=True, text=True,
                              timeout=120, env=self.env())
        if check and proc.returncode != 0:
            raise AssertionError(f"nufilt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    # --- dropping checkpoints -------------------------------------------------------------

    def drop(self, src: Path, name: str | None = None) -> Path:
        """Copy under a temporary name in the inbox, then rename: how a careful writer delivers."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        name = name or src.name
        tmp = self.inbox / f"tmp-{uuid.uuid4().hex[:6]}-{name}"
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)
        os.rename(tmp, self.inbox / name)
        return self.inbox / name
