"""A real `mlflow server` for tests: SQLite backend, local artifact store, loopback, a free port.

Usage (module-scoped, one server per test module, because a start costs several seconds):

    @pytest.fixture(scope="module")
    def mlflow_server(tmp_path_factory):
        with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
            yield server

`stop()` then `start()` restarts it on the same port and the same database, which is how tests
take MLflow down and bring it back. The process runs in its own process group and is always killed
(group-wide) on stop, on exit of the `with`, and at interpreter exit, so no server outlives a test run.
"""

from __future__ import annotations

import atexit
import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

START_TIMEOUT_SECONDS = 120.0  # first start runs the SQLite migrations; a busy 2-core host is slow
# a fixed Fernet key, so webhook secrets stored by one run of the server decrypt in the next
WEBHOOK_ENCRYPTION_KEY = base64.urlsafe_b64encode(b"nufilt-tests-webhook-key-32bytes").decode()


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_executable() -> str:
    # the venv's mlflow, beside the interpreter running the tests
    candidate = Path(sys.executable).with_name("mlflow")
    return str(candidate) if candidate.exists() else "mlflow"


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None, extra_env: dict[str, str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.db_path = self.root / "mlflow.db"
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self.env = {
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": WEBHOOK_ENCRYPTION_KEY,
            # no background job runner (an extra process, and a folder in /dev/shm a kill leaves behind)
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **(extra_env or {}),
        }
        self._process: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        if self.running:
            return
        command = [
            mlflow_executable(), "server",
            "--backend-store-uri", f"sqlite:///{self.db_path}",
            "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
        ]
        env = {**os.environ, **self.env}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # the server forks workers: signal the whole group, give it a moment, then kill what is left
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
        # wait until the port is free again, so a restart on the same port does not race
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                return
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
