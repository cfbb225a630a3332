"""The MLflow source: new versions of a registered model in an MLflow Model Registry.

One thread polls `source_model` every `poll_interval_seconds`, and at once on `wake()` (the
webhook calls it; a webhook is only a hint, this poll is the source of truth). Per poll it asks
for the versions after the cursor in version order and takes them strictly one after another:

- READY: download its artifacts into DOWNLOADS/.partial-…, rename into place (so a half download
  never looks complete), find the checkpoint inside, `emit` it, and only then move the cursor
  (`journal` key `mlflow:<model>:last_version`). A crash between emit and cursor re-emits the
  same version on restart; the journal recognises the content as a duplicate.
- PENDING_REGISTRATION (or a status we do not know): stop here and look again next poll; later
  versions wait behind it, so merges stay in registration order.
- FAILED_REGISTRATION: it will never be READY; skipped with a warning so it cannot block the rest.

MLflow unreachable or failing: the poll raises, `errors` counts it (the daemon exports it as a
metric), and the next attempt waits 1, 2, 4, … seconds up to `backoff_max_seconds`. Nothing is
lost, because the cursor only moves after an arrival is journaled.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from nufilt_core.checkpoint import INDEX_NAME
from nufilt_core.lora import CONFIG_NAME as ADAPTER_CONFIG_NAME

from ..config import MlflowSettings
from ..journal import Journal
from ..mlflow_connection import describe_error, error_code, registry_client
from ..store import fsync_dir, remove_tree
from .base import Arrival, Emit, InboxEntry, SourceHealth

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = structlog.get_logger("nufilt.sources.mlflow")

SOURCE_NAME = "mlflow"
PAGE_SIZE = 100
PARTIAL_PREFIX = ".partial-"
STOP_TIMEOUT_SECONDS = 30.0
READY, PENDING, FAILED = "READY", "PENDING_REGISTRATION", "FAILED_REGISTRATION"
# a version whose download the registry answers with "not there" this many times in a row is journaled as
# rejected and passed, so later versions are not held behind it for ever; other failures (MLflow down) wait
MAX_MISSING_ARTIFACT_TRIES = 3
MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "ENDPOINT_NOT_FOUND")
# the same version failing this many times in a row (for any reason) makes the source unhealthy: it is stuck
STUCK_AFTER_FAILURES = 3


def cursor_key(model: str) -> str:
    return f"mlflow:{model}:last_version"


def quote_filter_value(value: str) -> str:
    # MLflow's filter grammar has no escapes: a name with a single quote needs double quotes
    return f'"{value}"' if "'" in value else f"'{value}'"


def download_name(model: str, version: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', model)}-v{version}"


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_checkpoint(root: Path) -> tuple[Path, str | None]:
    """Where the checkpoint sits in a downloaded artifact tree, and a warning when unsure.

    The folder holding the one PEFT adapter (`adapter_config.json`: as `mlflow.transformers` logs a PEFT
    model, beside its tokenizer), else the one shard index, else the folder holding the `.safetensors` file(s).
    When there is none, or several candidates, the root is returned with a warning: the arrival is
    still emitted, so the journal rejects it with Checkpoint.open's reason instead of the version
    blocking the queue for ever.
    """
    for marker, what in ((ADAPTER_CONFIG_NAME, "PEFT adapters"), (INDEX_NAME, "sharded checkpoints")):
        found = sorted(p for p in root.rglob(marker) if _visible(p, root))
        if len(found) == 1:
            return found[0].parent, None
        if found:
            where = ", ".join(str(p.parent.relative_to(root)) for p in found)
            return root, f"artifacts hold {len(found)} {what} ({where}); expected one"
    folders = sorted({p.parent for p in root.rglob("*.safetensors") if p.is_file() and _visible(p, root)})
    if len(folders) == 1:
        return folders[0], None
    if folders:
        where = ", ".join(str(p.relative_to(root)) or "." for p in folders)
        return root, f"artifacts hold .safetensors files in {len(folders)} folders ({where}); expected one checkpoint"
    return root, "artifacts hold no .safetensors file"


class MlflowRegistrySource:
    name = SOURCE_NAME

    def __init__(self, settings: MlflowSettings, downloads_dir: Path, journal: Journal, *,
                 backoff_initial_seconds: float = 1.0, backoff_max_seconds: float = 300.0,
                 on_error: Callable[[BaseException], None] | None = None):
        if not settings.tracking_uri or not settings.source_model:
            raise ValueError("the MLflow source needs mlflow.tracking_uri and mlflow.source_model")
        self.settings = settings
        self.model: str = settings.source_model
        self.tracking_uri: str = settings.tracking_uri
        self.downloads_dir = Path(downloads_dir)
        self.journal = journal
        self.backoff_initial_seconds = backoff_initial_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.on_error = on_error
        # read by the daemon for metrics and status; only this source's thread writes them
        self.errors = 0  # failed polls since construction (a counter: export as nufilt_mlflow_errors_total)
        self.consecutive_errors = 0  # 0 when the last poll succeeded
        self.last_error: str | None = None
        self.emitted = 0
        self._filter_supported = True  # `version_number > N`; False after a store refuses it
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: MlflowClient | None = None
        self._last_attempt: float | None = None  # monotonic start of the last poll
        self.polls = 0
        self._failing: tuple[int, int] | None = None  # (version, downloads failed in a row) of the queue's head

    # --- Source protocol -------------------------------------------------------------------

    def start(self, emit: Emit) -> None:
        if self._thread is not None and self._thread.is_alive():
            if not self._stop.is_set():
                return  # already running
            self._thread.join()  # a stop() that timed out mid-download: let that poll end first
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        self._remove_partials()
        self._stop.clear()
        self._wake.set()  # first poll at once
        self._thread = threading.Thread(target=self._run, args=(emit,), name="mlflow-source", daemon=True)
        self._thread.start()
        log.info("mlflow_source_started", model=self.model, poll_interval_seconds=self.settings.poll_interval_seconds)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        # a poll in flight ends within one MLflow request timeout, but a download can take minutes:
        # do not hold the daemon's shutdown for it (the thread is a daemon thread; the partial
        # download is removed at the next start)
        thread.join(STOP_TIMEOUT_SECONDS)
        if thread.is_alive():
            log.warning("mlflow_source_stop_timeout", model=self.model, seconds=STOP_TIMEOUT_SECONDS)
        else:
            self._thread = None

    def healthy(self) -> bool:
        # MLflow being down is not unhealthy (restarting us would not help; `errors` shows it); a dead thread
        # is, and so is a version that keeps failing while the registry answers (the queue is stuck behind it)
        stuck = self._failing is not None and self._failing[1] >= STUCK_AFTER_FAILURES
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set() and not stuck

    def health(self) -> SourceHealth:
        return {"healthy": self.healthy(), "errors_in_a_row": self.consecutive_errors, "errors_total": self.errors,
                "last_error": self.last_error, "failing_version": self._failing[0] if self._failing else None}

    def entries(self) -> list[InboxEntry]:
        return []  # no inbox of its own: a registry version goes to the journal as soon as it is downloaded

    def wake(self) -> None:
        """Poll now instead of at the next interval (the webhook calls this); while polls are failing,
        not before the back-off has passed (a wake-up never makes a failing registry busier)."""
        self._wake.set()

    # --- the loop --------------------------------------------------------------------------

    def _run(self, emit: Emit) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._next_delay())
            self._wake.clear()
            if self._stop.is_set():
                break
            if self.consecutive_errors and self._last_attempt is not None:  # woken early: honour the back-off
                remaining = self._last_attempt + self._next_delay() - time.monotonic()
                if remaining > 0 and self._stop.wait(remaining):
                    break
            self._last_attempt = time.monotonic()
            self.polls += 1
            try:
                self.poll_once(emit)
            except Exception as e:  # anything: the thread must live on and retry
                self._record_error(e)
            else:
                if self.consecutive_errors:
                    log.info("mlflow_source_recovered", model=self.model, after_errors=self.consecutive_errors)
                self.consecutive_errors = 0
                self.last_error = None

    def _next_delay(self) -> float:
        if not self.consecutive_errors:
            return self.settings.poll_interval_seconds
        return min(self.backoff_max_seconds, self.backoff_initial_seconds * 2 ** (self.consecutive_errors - 1))

    def _record_error(self, e: BaseException) -> None:
        self.errors += 1
        self.consecutive_errors += 1
        self.last_error = describe_error(e)
        log.warning("mlflow_source_error", model=self.model, error=self.last_error,
                    consecutive_errors=self.consecutive_errors, retry_in_seconds=round(self._next_delay(), 3))
        if self.on_error is not None:
            try:
                self.on_error(e)
            except Exception as callback_error:
                log.error("mlflow_source_on_error_failed", error=describe_error(callback_error))
        # a client whose connection pool saw the server die is rebuilt, to be safe
        self._client = None

    # --- one poll --------------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        value = self.journal.get_state(cursor_key(self.model))
        return int(value) if value else 0

    def poll_once(self, emit: Emit) -> int:
        """Emit every READY version after the cursor, in order, up to the first pending one.

        Returns how many were emitted. Raises when MLflow fails (the loop counts and backs off).
        """
        client = self._get_client()
        emitted = 0
        while not self._stop.is_set():
            last = self.cursor
            versions = self._versions_after(client, last)
            for mv in versions:
                if self._stop.is_set():
                    return emitted
                number = int(mv.version)
                if mv.status == FAILED:
                    log.warning("mlflow_version_skipped", model=self.model, version=number,
                                reason=f"registration failed: {mv.status_message or 'no message'}")
                    self.journal.set_state(cursor_key(self.model), str(number))
                    continue
                if mv.status != READY:
                    log.info("mlflow_version_waiting", model=self.model, version=number, status=mv.status)
                    return emitted
                if not self._take(client, mv, emit):
                    return emitted
                emitted += 1
            if len(versions) < PAGE_SIZE:
                return emitted
        return emitted

    def _get_client(self) -> MlflowClient:
        if self._client is None:
            self._client = registry_client(self.tracking_uri)
        return self._client

    def _versions_after(self, client: MlflowClient, last: int) -> list[ModelVersion]:
        """The next versions after `last`, in ascending version order (at most PAGE_SIZE)."""
        name = quote_filter_value(self.model)
        if self._filter_supported:
            try:
                return list(client.search_model_versions(
                    f"name={name} AND version_number > {last}", max_results=PAGE_SIZE,
                    order_by=["version_number ASC"]))
            except Exception as e:
                if error_code(e) != "INVALID_PARAMETER_VALUE":
                    raise
                # an older or other registry store: filter by name only, sort here
                log.warning("mlflow_version_filter_unsupported", model=self.model, error=describe_error(e))
                self._filter_supported = False
        return self._versions_after_by_name(client, last)

    def _versions_after_by_name(self, client: MlflowClient, last: int) -> list[ModelVersion]:
        found: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = client.search_model_versions(
                f"name={quote_filter_value(self.model)}", max_results=PAGE_SIZE, page_token=token)
            found.extend(mv for mv in page if int(mv.version) > last)
            token = page.token
            if not token:
                break
        found.sort(key=lambda mv: int(mv.version))
        return found[:PAGE_SIZE]

    def _take(self, client: MlflowClient, mv: ModelVersion, emit: Emit) -> bool:
        """Download, emit, advance the cursor; False when stopped before emitting."""
        number = int(mv.version)
        reference = f"models:/{self.model}/{number}"
        try:
            folder = self._download(client, number)
        except Exception as e:
            tries = self._failing[1] + 1 if self._failing and self._failing[0] == number else 1
            self._failing = (number, tries)
            if error_code(e) not in MISSING or tries < MAX_MISSING_ARTIFACT_TRIES:
                raise
            why = f"its artifacts cannot be downloaded: the registry answers {error_code(e)} ({describe_error(e)}; " \
                  f"{tries} tries)"
            emit(Arrival(path=self.downloads_dir, source=SOURCE_NAME, reference=reference, refused=why))
            self.journal.set_state(cursor_key(self.model), str(number))
            log.warning("mlflow_version_rejected", model=self.model, version=number, reason=why)
            self._failing = None
            return True
        self._failing = None
        if self._stop.is_set():  # stopped during a long download: the daemon may be shutting down
            return False  # the complete download stays in place and is taken at the next start
        checkpoint, warning = find_checkpoint(folder)
        if warning:
            log.warning("mlflow_version_unclear_checkpoint", model=self.model, version=number, reason=warning)
        emit(Arrival(path=checkpoint, source=SOURCE_NAME, reference=reference))
        self.journal.set_state(cursor_key(self.model), str(number))
        self.emitted += 1
        log.info("mlflow_version_taken", model=self.model, version=number, checkpoint=str(checkpoint))
        # emit returned: the journal holds its own copy, ours can go
        remove_tree(folder)
        return True

    def _download(self, client: MlflowClient, number: int) -> Path:
        """Artifacts of version `number` in DOWNLOADS/<model>-v<number>/, complete or not at all."""
        final = self.downloads_dir / download_name(self.model, number)
        if final.exists():  # renamed into place before a crash: complete
            return final
        partial = self.downloads_dir / f"{PARTIAL_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        partial.mkdir(parents=True)
        try:
            uri = client.get_model_version_download_uri(self.model, str(number))
            _download_artifacts(uri, partial, self.tracking_uri)
            os.rename(partial, final)
            fsync_dir(self.downloads_dir)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return final

    def _remove_partials(self) -> None:
        for leftover in self.downloads_dir.glob(PARTIAL_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _download_artifacts(uri: str, destination: Path, tracking_uri: str) -> Any:
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination), tracking_uri=tracking_uri)
