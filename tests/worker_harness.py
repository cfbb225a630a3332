"""The merge worker in-process, with a real journal, store, intake and merge child (no supervisor, no sources)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from daemon_harness import wait_for
from nufilt_daemon.config import Settings
from nufilt_daemon.intake import Intake
from nufilt_daemon.journal import Journal
from nufilt_daemon.metrics import Metrics
from nufilt_daemon.promoter import Promoter
from nufilt_daemon.store import Store
from nufilt_daemon.worker import MergeWorker


def make_worker(tmp_path: Path, base: Path, **settings: object) -> tuple[MergeWorker, Intake, Journal, Store]:
    """A worker over `tmp_path`/store and `tmp_path`/state; a stopped worker stays stopped, so make another."""
    s = Settings(base_model=base, store_dir=tmp_path / "store", state_dir=tmp_path / "state", device="cpu",
                 **{"method_settings": {"iters": 2}, **settings})
    journal = Journal.in_state_dir(tmp_path / "state")
    store = Store(tmp_path / "store").ensure()
    worker = MergeWorker(s, journal, store, Promoter(store, journal, 5, 5, publish=False), Metrics(),
                         tmp_path / "state" / "logs")
    intake = Intake(journal, tmp_path / "state" / "staged", lambda job, arrival: worker.wake())
    return worker, intake, journal, store


def run_until(worker: MergeWorker, what: str, done: Callable[[], object], timeout: float = 120) -> None:
    """Start the worker, wait for `done()`, and stop the worker whatever happened."""
    worker.start()
    try:
        wait_for(what, done, timeout=timeout)
    finally:
        worker.stop(0)
