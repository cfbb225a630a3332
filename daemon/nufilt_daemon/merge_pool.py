"""The merge processes (merge_process.py) the worker runs its jobs in: at most one running a job, and at
most one spare, started while the worker is idle so that its interpreter start and imports are off the
next job's path. A spare waits for its request on stdin; an empty request (stdin closed) ends it.

Each process writes its stdout and stderr to a log under STATE/logs/ (the spare's until a job takes it,
then the job's), and its events, JSON lines, to a pipe the worker reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("nufilt.worker")  # the worker's processes: its logger name

KEEP_CHILD_LOGS = 200  # STATE/logs/job-*.log: the merge processes' own output, for post-mortems
SPARE_LOG = "merge-spare.log"  # the pre-started merge process's output until a job takes it


@dataclass
class ChildProcess:
    """A merge process and its side of the events pipe; `log` is where its stdout and stderr go."""

    proc: subprocess.Popen[bytes]
    events_fd: int
    log: Path


def spawn(log_path: Path) -> ChildProcess:
    """A new merge process, waiting for its request on stdin."""
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with log_path.open("ab") as child_log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nufilt_daemon.merge_process", "--events-fd", str(write_fd),
                 "--parent-pid", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=child_log, stderr=subprocess.STDOUT, pass_fds=(write_fd,), env=env,
                start_new_session=True)  # a Ctrl-C on the terminal is the daemon's to handle, not the child's
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return ChildProcess(proc, read_fd, log_path)


class MergeProcessPool:
    def __init__(self, logs_dir: Path):
        self.logs_dir = Path(logs_dir)
        self.spare: ChildProcess | None = None  # started while idle, taken by the next job
        self._running: subprocess.Popen[bytes] | None = None  # the job's; read by the timeout timer and stop()
        self._lock = threading.Lock()

    @property
    def running(self) -> subprocess.Popen[bytes] | None:
        with self._lock:
            return self._running

    def prestart(self) -> None:
        """Start a spare unless one is alive already."""
        if self.spare is not None:
            if self.spare.proc.poll() is None:
                return
            self._discard_spare()  # it died while waiting (killed from outside): its log says why
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        (self.logs_dir / SPARE_LOG).unlink(missing_ok=True)
        self.spare = spawn(self.logs_dir / SPARE_LOG)
        log.debug("merge_process_prestarted", pid=self.spare.proc.pid)

    def take(self, log_path: Path) -> tuple[ChildProcess, bool]:
        """The process for a job, now the running one: the spare when it is alive (its log renamed to
        `log_path`), else a new one. True when it was the spare."""
        with self._lock:
            child, prestarted = self._spare_or_new(log_path)
            self._running = child.proc
        return child, prestarted

    def _spare_or_new(self, path: Path) -> tuple[ChildProcess, bool]:
        spare = self.spare
        if spare is not None and spare.proc.poll() is None:
            self.spare = None
            if path.exists():  # a redone attempt's earlier log: keep both
                path = path.with_name(f"{path.stem}-{spare.proc.pid}.log")
            os.replace(spare.log, path)  # the process keeps writing to the same file, now under the job's name
            return ChildProcess(spare.proc, spare.events_fd, path), True
        self._discard_spare()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        return spawn(path), False

    def finished(self) -> None:
        """The running process has been waited for."""
        with self._lock:
            self._running = None

    def terminate_running(self) -> None:
        """SIGTERM to the running process (merge_step cleans its temporary folder on the way out), SIGKILL
        if it is still there 5 s later."""
        proc = self.running
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()

    def release_spare(self) -> None:
        """End the waiting process: an empty request (its stdin closed) is its cue to exit."""
        spare = self.spare
        if spare is None:
            return
        try:
            assert spare.proc.stdin is not None  # started with stdin=PIPE
            spare.proc.stdin.close()
            spare.proc.wait(10)
        except subprocess.TimeoutExpired:
            spare.proc.kill()
            spare.proc.wait()
        except OSError:
            pass
        self._discard_spare()

    def _discard_spare(self) -> None:
        spare, self.spare = self.spare, None
        if spare is not None:
            os.close(spare.events_fd)

    def prune_logs(self, keep: int = KEEP_CHILD_LOGS) -> None:
        logs = sorted(self.logs_dir.glob("job-*.log"), key=lambda p: p.stat().st_mtime)
        for old in logs[:-keep]:
            old.unlink(missing_ok=True)
