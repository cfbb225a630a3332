"""The folder source: checkpoints dropped into an inbox.

What counts as a checkpoint (top-level entries of WATCH_DIR only):
- a `*.safetensors` file;
- a folder holding one safetensors file, or shards with `model.safetensors.index.json`, that
  appears by rename (write it elsewhere on the same filesystem, then `mv`), or a folder holding a
  `_COMPLETE` marker (written last, for people who copy by hand).
Ignored: hidden names (`.*`, which also hides `.processed/`), `tmp-*` and `*.partial`.

How it decides an entry is complete: every file's size and mtime unchanged for `settle_seconds`,
and then either the `_COMPLETE` marker or the checkpoint opens (index vs shards, every header
consistent with its file size). An entry that settles but never opens is handed on after
`incomplete_timeout_seconds` anyway, so it is journaled as rejected with the reason instead of
waiting silently for ever.

Events and rescans: watchdog's handler only records which top-level entry changed (an exception
in a handler would kill the observer thread); one scanner thread does all the work. A full
rescan every `rescan_interval_seconds` (and at start) catches what events missed (NFS/CIFS give
none: set `polling = true`). Once an entry is journaled it is moved to WATCH_DIR/.processed/
(or deleted, `after = "delete"`), so the inbox shows only what is still waiting.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.errors import NufiltError

from ..config import FolderSettings
from .base import Arrival, Emit

log = structlog.get_logger("nufilt.sources.folder")

COMPLETE_MARKER = "_COMPLETE"
PROCESSED_DIR = ".processed"
# whitelisted event types: our own reads inside the inbox raise opened/closed_no_write events
RELEVANT_EVENTS = {"created", "modified", "moved", "closed"}


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.startswith("tmp-") or name.endswith(".partial")


Signature = tuple[tuple[str, int, int], ...]


def signature(path: Path) -> Signature | None:
    """(relative path, size, mtime) of every file; None when the entry vanished."""
    try:
        if not path.exists():
            return None
        if path.is_file():
            st = path.stat()
            return (("", st.st_size, st.st_mtime_ns),)
        out = []
        for root, _, files in os.walk(path):
            for f in files:
                st = (Path(root) / f).stat()
                out.append((str((Path(root) / f).relative_to(path)), st.st_size, st.st_mtime_ns))
        return tuple(sorted(out))
    except FileNotFoundError:
        return None


def completeness(path: Path) -> tuple[bool, str | None]:
    """(ready to hand on, why not yet). A marker makes a folder ready even if it will not open."""
    if path.is_dir() and (path / COMPLETE_MARKER).exists():
        return True, None
    if path.is_file() and path.suffix != ".safetensors":
        return False, "not a .safetensors file"
    try:
        Checkpoint.open(path)
    except NufiltError as e:
        return False, str(e)
    return True, None


@dataclass
class _Entry:
    first_seen: float
    stable_since: float
    sig: Signature | None
    warned: bool = False


class _Handler(FileSystemEventHandler):
    """Only enqueues the top-level name; never raises, never touches the disk."""

    def __init__(self, root: Path, names: queue.SimpleQueue[str]):
        self.root = root
        self.names = names

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in RELEVANT_EVENTS:
            return
        for p in (getattr(event, "dest_path", ""), event.src_path):
            if not p:
                continue
            try:
                rel = Path(os.fsdecode(p)).relative_to(self.root)
            except ValueError:
                continue
            if rel.parts:
                self.names.put(rel.parts[0])


class FolderSource:
    name = "folder"

    def __init__(self, watch_dir: Path, settings: FolderSettings):
        self.root = Path(watch_dir).absolute()
        self.settings = settings
        self._names: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._pending: dict[str, _Entry] = {}
        self._stop = threading.Event()
        self._observer: Observer | PollingObserver | None = None
        self._thread: threading.Thread | None = None
        self._emit: Emit | None = None
        self._emit_failures = 0

    # --- Source protocol -------------------------------------------------------------------

    def start(self, emit: Emit) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._emit = emit
        self._stop.clear()
        if self.settings.polling:
            observer = PollingObserver(timeout=self.settings.poll_interval_seconds)
        else:
            observer = Observer()
        # top level only: a new entry is all an event needs to tell; its contents are followed by
        # polling their sizes (fewer inotify watches, no events for files inside big checkpoints)
        observer.schedule(_Handler(self.root, self._names), str(self.root), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._thread = threading.Thread(target=self._run, name="folder-source", daemon=True)
        self._thread.start()
        log.info("folder_source_started", watch_dir=str(self.root), polling=self.settings.polling)

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            try:
                self._observer.join(timeout=5)
            except RuntimeError:  # never started
                pass
            self._observer = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)  # an emit in progress (hashing) finishes first
            self._thread = None

    def healthy(self) -> bool:
        return bool(self._observer and self._observer.is_alive() and self._thread and self._thread.is_alive())

    # --- the scanner thread ----------------------------------------------------------------

    def _run(self) -> None:
        next_rescan = 0.0
        tick = max(0.05, min(0.5, self.settings.settle_seconds / 4))
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_rescan:
                    self._rescan()
                    next_rescan = now + self.settings.rescan_interval_seconds
                self._drain_events()
                self._check_pending()
            except Exception:  # keep scanning; a bug here must not silently stop the inbox
                log.exception("folder_source_error")
            self._stop.wait(tick)

    def _note(self, name: str) -> None:
        if is_ignored(name) or name in self._pending:
            return
        now = time.monotonic()
        self._pending[name] = _Entry(first_seen=now, stable_since=now, sig=signature(self.root / name))

    def _rescan(self) -> None:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            self.root.mkdir(parents=True, exist_ok=True)
            names = []
        for name in sorted(names):  # a deterministic order for what was there before the start
            self._note(name)

    def _drain_events(self) -> None:
        while True:
            try:
                self._note(self._names.get_nowait())
            except queue.Empty:
                return

    def _check_pending(self) -> None:
        s = self.settings
        for name in list(self._pending):
            if self._stop.is_set():
                return
            entry = self._pending[name]
            path = self.root / name
            now = time.monotonic()
            sig = signature(path)
            if sig is None:  # gone (moved away by someone)
                del self._pending[name]
                continue
            if sig != entry.sig:
                entry.sig, entry.stable_since = sig, now
                continue
            if now - entry.stable_since < s.settle_seconds:
                continue
            ready, why = completeness(path)
            timed_out = now - entry.first_seen >= s.incomplete_timeout_seconds
            if not ready and not timed_out:
                if not entry.warned:
                    log.info("inbox_entry_waiting", checkpoint=name, reason=why)
                    entry.warned = True
                continue
            if not ready and path.is_file() and path.suffix != ".safetensors":
                log.warning("inbox_entry_ignored", checkpoint=name, reason=why)
                self._set_aside(name)
                del self._pending[name]
                continue
            if self._hand_on(name, path):
                del self._pending[name]

    def _hand_on(self, name: str, path: Path) -> bool:
        assert self._emit is not None
        try:
            self._emit(Arrival(path=path, source=self.name, reference=name))
        except Exception:
            self._emit_failures += 1
            log.exception("inbox_entry_not_journaled", checkpoint=name, failures=self._emit_failures)
            return False  # stays pending: retried on the next tick
        self._emit_failures = 0
        self._set_aside(name)
        return True

    def _set_aside(self, name: str) -> None:
        path = self.root / name
        try:
            if self.settings.after == "delete":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            else:
                done = self.root / PROCESSED_DIR
                done.mkdir(exist_ok=True)
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
                os.rename(path, done / f"{stamp}-{name}")
        except OSError as e:
            log.error("inbox_entry_not_moved", checkpoint=name, error=str(e))
