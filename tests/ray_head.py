"""A real Ray head for tests: on loopback only, a free port, a short temporary folder.

`ray start --head` leaves its daemons (GCS, raylet, agents) running and returns; the raylet's worker processes
each make their own process group. All of them keep the SID (setsid(2)) `ray start` ran with, so the head starts
with a SID of its own and `stop()` kills every process with that SID: this head's and nothing else of the
machine's (never `ray stop`, which stops every Ray on the host). Also at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from mlflow_server import free_port

# For the head and its drivers. On loopback: without the first, Ray 2.60 binds every interface and replaces
# 127.0.0.1 with the host's address (nufilt sets it itself for a loopback address: ray_executor.import_ray). No
# token authentication: otherwise whether a head wants a token depends on whether some earlier local Ray instance
# left one in ~/.ray/auth_token, and a driver joining it without one is refused
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def processes_with_sid(sid: int) -> list[int]:
    """Every live process whose SID is `sid` (a zombie is dead: its parent, init here, reaps it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if os.getsid(int(entry.name)) == sid and state != "Z":
                    pids.append(int(entry.name))
            except (OSError, IndexError):  # gone meanwhile
                pass
    return pids


def process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


class RayHead:
    def __init__(self, cpus: int = 2, object_store_bytes: int = 100_000_000, gpus: int = 0):
        self.cpus, self.gpus = cpus, gpus  # gpus: a resource Ray schedules by, whether or not the host has them
        self.object_store_bytes = object_store_bytes  # Ray's default, 30 % of memory, is a lot for a test
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's unix sockets live under the temp folder and must stay under 108 bytes: a short one, not tmp_path
        self.temp = Path(tempfile.mkdtemp(prefix="nufilt-ray-", dir="/tmp"))
        self.sid: int | None = None

    def start(self) -> RayHead:
        ray = str(Path(sys.executable).with_name("ray"))
        proc = subprocess.Popen(
            [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", f"--num-cpus={self.cpus}",
             f"--num-gpus={self.gpus}", "--include-dashboard=false", "--disable-usage-stats",
             f"--object-store-memory={self.object_store_bytes}", f"--temp-dir={self.temp}"],
            env={**os.environ, **LOOPBACK_ENV}, start_new_session=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.sid = proc.pid
        atexit.register(self.stop)
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out}")
        return self

    def processes(self) -> list[int]:
        return processes_with_sid(self.sid) if self.sid is not None else []

    def running_tasks(self, function: str) -> list[int]:
        """Worker processes of this head running `function` now (Ray titles them ray::FUNCTION)."""
        return [p for p in self.processes() if process_title(p) == f"ray::{function}"]

    def stop(self) -> None:
        if self.sid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (3 if sig == signal.SIGTERM else 10)
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.1)
        left = self.processes()
        self.sid = None
        shutil.rmtree(self.temp, ignore_errors=True)
        if left:
            raise RuntimeError(f"Ray head processes outlived SIGKILL: {left}")

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
