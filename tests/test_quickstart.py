"""scripts/quickstart.sh stops cleanly: a signal to the script's own PID leaves no daemon or MLflow
process behind (the script runs the daemon in the background and waits for it)."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from daemon_harness import wait_for
from mlflow_server import free_port
from models import base_state, write_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (the test's own folder: the daemon and MLflow name it)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(proc.name))
            except OSError:
                continue
    return out


@pytest.mark.parametrize("sig,mlflow", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_a_signal_to_the_script_stops_the_daemon_and_mlflow(tmp_path: Path, sig: signal.Signals, mlflow: bool):
    base = write_model(base_state(), tmp_path / "base")
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUFILT_")}
    env.update(NUFILT_BASE_MODEL=str(base), NUFILT_WATCH_DIR=str(tmp_path / "inbox"),
               NUFILT_STORE_DIR=str(tmp_path / "store"), NUFILT_STATE_DIR=str(tmp_path / "state"),
               NUFILT_METRICS_PORT=str(metrics_port), MLFLOW_PORT=str(free_port()))
    args = ["bash", str(ROOT / "scripts" / "quickstart.sh"), *([] if mlflow else ["--no-mlflow"])]
    # a session of its own, so that whatever happens the test can clean up the whole group at the end
    script = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        def ready() -> bool:
            assert script.poll() is None, script.stderr.read().decode()[-2000:] if script.stderr else ""
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).status == 200
            except OSError:
                return False

        wait_for("the daemon serving metrics", ready, timeout=300, interval=0.5)
        started = processes_mentioning(str(tmp_path))
        assert len(started) >= (2 if mlflow else 1), started  # the daemon (and MLflow)
        script.send_signal(sig)  # to the script's PID only, not its group
        assert script.wait(timeout=120) == 128 + sig
        wait_for("no daemon or MLflow process left", lambda: processes_mentioning(str(tmp_path)) == [], timeout=30)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
        for pid in processes_mentioning(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
