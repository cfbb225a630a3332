"""The folder source: checkpoints dropped into an inbox.

What counts as a checkpoint (top-level entries of WATCH_DIR only):
- a `*.safetensors` file;
- a folder holding one safetensors file, or shards with `model.safetensors.index.json`, or a PEFT LoRA
  adapter (`adapter_config.json`), that appears by rename (write it elsewhere on the same filesystem,
  then `mv`), or a folder holding a `_COMPLETE` marker (written last, for people who copy by hand).
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

import hashlib
import os
import queue
import shutil
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from nufilt_core.checkpoint import INDEX_NAME, PICKLE_SUFFIXES, Checkpoint
from nufilt_core.errors import CheckpointError, NufiltError
from nufilt_core.fsguard import check_tree

from ..config import FolderSettings
from ..names import printable
from .base import Arrival, Emit, InboxEntry, SourceHealth

log = structlog.get_logger("nufilt.sources.folder")

COMPLETE_MARKER = "_COMPLETE"
PROCESSED_DIR = ".processed"
# whitelisted event types: our own reads inside the inbox raise opened/closed_no_write events
RELEVANT_EVENTS = {"created", "modified", "moved", "closed"}
MAX_RETRY_SECONDS = 300.0  # back-off of an entry whose intake failed, from settings.retry_seconds
NAME_MAX = 255  # bytes of one file name (Linux file systems)


def processed_name(name: str, now: datetime | None = None) -> str:
    """The entry's name in .processed/: a UTC time stamp before it; a name the stamp would push past the file
    system's limit (255 bytes) keeps its hash and its end instead."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")
    full = f"{stamp}-{name}"
    if len(os.fsencode(full)) <= NAME_MAX:
        return full
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    tail = os.fsencode(name)[-64:].decode("utf-8", "ignore")
    return f"{stamp}-{digest}-{tail}"


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.startswith("tmp-") or name.endswith(".partial")


Signature = tuple[tuple[str, int, int], ...]
WAITING, IGNORED, ERROR = "waiting", "ignored", "error"  # entry states in status and nufilt_inbox_entries
UNHEALTHY_AFTER_ERRORS = 5  # scanner-loop errors in a row that make the source unhealthy
UNHEALTHY_AFTER_FAILURES = 3  # failed examinations or hand-ons of one entry, same (until it is journaled)
MAX_REMEMBERED_IGNORED = 100


def signature(path: Path) -> Signature | None:
    """(relative path, size or file type, mtime) of every entry, by lstat (links are not followed);
    None when the entry vanished."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            size = st.st_size if stat.S_ISREG(st.st_mode) else -stat.S_IFMT(st.st_mode)
            return (("", size, st.st_mtime_ns),)
        out = []
        for root, dirs, files in os.walk(path):
            for f in (*files, *(d for d in dirs if (Path(root) / d).is_symlink())):
                st = os.lstat(Path(root) / f)
                out.append((str((Path(root) / f).relative_to(path)), st.st_size, st.st_mtime_ns))
        return tuple(sorted(out))
    except FileNotFoundError:
        return None


def is_special(path: Path) -> bool:
    """A link, FIFO, device or socket anywhere in the entry: refused now, waiting cannot fix it."""
    if not os.path.lexists(path):
        return False
    try:
        check_tree(path)
    except CheckpointError:
        return True
    return False


def completeness(path: Path) -> tuple[bool, str | None]:
    """(ready to hand on, why not yet). A marker makes a folder ready even if it will not open;
    an entry refused for what it is (a link, a FIFO, a pickle, a folder whose weights are only pickles, such
    as `pytorch_model.bin` or a PEFT adapter's `adapter_model.bin`) is ready at once, to be rejected."""
    if is_special(path):
        return True, None
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        return True, None
    if path.is_dir() and only_pickled_weights(path):
        return True, None
    if path.is_dir() and (path / COMPLETE_MARKER).exists():
        return True, None
    if path.is_file() and path.suffix != ".safetensors":
        return False, "not a .safetensors file"
    try:
        Checkpoint.open(path, strict=True)
    except NufiltError as e:
        return False, str(e)
    return True, None


def only_pickled_weights(folder: Path) -> bool:
    """The folder's weight files are pickles, none safetensors: waiting cannot make it a checkpoint."""
    names = [p.name for p in folder.iterdir()]
    return (any(n.endswith(PICKLE_SUFFIXES) for n in names)
            and not any(n.endswith(".safetensors") or n == INDEX_NAME for n in names))


@dataclass
class _Entry:
    first_seen: float
    stable_since: float
    sig: Signature | None
    warned: bool = False
    state: str = WAITING  # waiting | error, for status and the gauge
    reason: str | None = None
    failures: int = 0  # hand-ons (intake) failed in a row
    next_try: float = 0.0  # back-off after a failed hand-on
    seen_at: float = field(default_factory=time.time)


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
        self._observer: BaseObserver | None = None
        self._thread: threading.Thread | None = None
        self._emit: Emit | None = None
        self._emit_failures = 0
        self._errors_in_a_row = 0  # scanner-loop errors in a row (reset by a clean pass); healthy() looks at it
        self.last_error: str | None = None
        self.errors_total = 0
        self._ignored: deque[InboxEntry] = deque(maxlen=MAX_REMEMBERED_IGNORED)
        self._stranded: dict[str, tuple[Signature | None, str]] = {}  # journaled, could not be moved: (as seen, why)
        self._view_lock = threading.Lock()
        self.on_error: Callable[[], None] | None = None  # the supervisor's metric

    # --- Source protocol -------------------------------------------------------------------

    def start(self, emit: Emit) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._emit = emit
        self._stop.clear()
        observer: BaseObserver  # Observer is the platform's (inotify on Linux), chosen at import
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
        """False when a thread died, the scanner loop keeps failing, or an entry cannot be journaled."""
        with self._view_lock:
            stuck = any(e.failures >= UNHEALTHY_AFTER_FAILURES for e in self._pending.values())
        return bool(self._observer and self._observer.is_alive() and self._thread and self._thread.is_alive()
                    and self._errors_in_a_row < UNHEALTHY_AFTER_ERRORS and not stuck)

    def entries(self) -> list[InboxEntry]:
        """Every entry seen and not yet journaled (waiting, error), journaled ones that could not be moved out of
        the inbox (error), and the ones set aside as ignored."""
        with self._view_lock:
            pending = [InboxEntry(name=printable(n), state=e.state, reason=e.reason, seen_at=e.seen_at,
                                  failures=e.failures) for n, e in self._pending.items()]
            stranded = [InboxEntry(name=printable(n), state=ERROR, reason=why, seen_at=None, failures=0)
                        for n, (_, why) in self._stranded.items()]
            return pending + stranded + list(self._ignored)

    def health(self) -> SourceHealth:
        return {"healthy": self.healthy(), "errors_in_a_row": self._errors_in_a_row,
                "errors_total": self.errors_total, "last_error": self.last_error}

    def _error(self, what: str) -> None:
        self._errors_in_a_row += 1
        self.errors_total += 1
        self.last_error = printable(what)
        if self.on_error is not None:
            self.on_error()

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
                self._errors_in_a_row = 0
            except Exception as e:  # keep scanning; a bug here must not silently stop the inbox
                log.exception("folder_source_error")
                self._error(f"{type(e).__name__}: {e}")
            self._stop.wait(tick)

    def _note(self, name: str) -> None:
        if is_ignored(name) or name in self._pending:
            return
        stranded = self._stranded.get(name)
        if stranded is not None:
            if signature(self.root / name) == stranded[0]:
                return  # journaled already; it only could not be moved away
            with self._view_lock:
                self._stranded.pop(name, None)  # changed or gone: what is there now is new
        now = time.monotonic()
        with self._view_lock:
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
        for name in list(self._pending):
            if self._stop.is_set():
                return
            entry = self._pending[name]
            try:
                self._check_one(name, entry)
            except Exception as e:  # contained: this entry shows as `error` and backs off, the others go on
                log.exception("inbox_entry_error", checkpoint=printable(name))
                self._entry_failed(entry, f"{type(e).__name__}: {e}")
                self._error(f"{printable(name)}: {type(e).__name__}: {e}")

    def _check_one(self, name: str, entry: _Entry) -> None:
        s = self.settings
        path = self.root / name
        now = time.monotonic()
        if now < entry.next_try:
            return
        if entry.state == ERROR and entry.failures >= UNHEALTHY_AFTER_FAILURES:
            ready, timed_out, why = True, True, None  # cannot be examined: intake opens it and journals why
        elif self._not_settled(name, path, entry, now):
            return
        else:
            ready, why = completeness(path)
            timed_out = now - entry.first_seen >= s.incomplete_timeout_seconds
        if not ready and not timed_out:
            entry.reason = printable(why or "")
            if not entry.warned:
                log.info("inbox_entry_waiting", checkpoint=printable(name), reason=entry.reason)
                entry.warned = True
            return
        if not ready and path.is_file() and path.suffix != ".safetensors":
            log.warning("inbox_entry_ignored", checkpoint=printable(name), reason=why)
            self._set_aside(name)
            self._forget(name)
            self._ignored.append(InboxEntry(name=printable(name), state=IGNORED, reason=why, seen_at=time.time(),
                                            failures=0))
            return
        if self._hand_on(name, path, entry):
            self._forget(name)

    def _not_settled(self, name: str, path: Path, entry: _Entry, now: float) -> bool:
        sig = signature(path)
        if sig is None:  # gone (moved away by someone)
            self._forget(name)
            return True
        if sig != entry.sig:
            entry.sig, entry.stable_since = sig, now
            return True
        return now - entry.stable_since < self.settings.settle_seconds

    def _entry_failed(self, entry: _Entry, error: str) -> float:
        entry.failures += 1
        delay = min(MAX_RETRY_SECONDS, self.settings.retry_seconds * 2 ** (entry.failures - 1))
        entry.next_try = time.monotonic() + delay
        entry.state, entry.reason = ERROR, printable(error)
        return delay

    def _forget(self, name: str) -> None:
        with self._view_lock:
            self._pending.pop(name, None)

    def _hand_on(self, name: str, path: Path, entry: _Entry) -> bool:
        assert self._emit is not None
        try:
            self._emit(Arrival(path=path, source=self.name, reference=name))
        except Exception as e:  # intake removed what it staged; retried with exponential back-off
            self._emit_failures += 1
            delay = self._entry_failed(entry, f"not journaled ({entry.failures + 1}x): {e}")
            log.error("inbox_entry_not_journaled", checkpoint=printable(name), failures=entry.failures,
                      retry_in=delay, error=printable(str(e)))
            self._error(f"{printable(name)}: {e}")
            return False  # stays pending
        self._emit_failures = 0
        self._set_aside(name)
        return True

    def _set_aside(self, name: str) -> None:
        """Out of the inbox once journaled. An entry that cannot be moved (or deleted) is remembered as it is, so
        the rescans do not copy, hash and journal it again as a duplicate each time; it shows as `error`."""
        path = self.root / name
        try:
            if self.settings.after == "delete":  # lstat: a link is removed, never what it points at
                is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
                shutil.rmtree(path) if is_dir else path.unlink()
            else:
                done = self.root / PROCESSED_DIR
                done.mkdir(exist_ok=True)
                os.rename(path, done / processed_name(name))
        except OSError as e:
            log.error("inbox_entry_not_moved", checkpoint=printable(name), error=str(e))
            reason = printable(f"journaled, but cannot be moved out of the inbox ({e.strerror or e}): move or "
                               "delete it by hand")
            with self._view_lock:
                self._stranded[name] = (signature(path), reason)
