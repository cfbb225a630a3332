"""The publishing outbox: registry updates that must happen, even if the registry is down now.

Promotions and rollbacks add a work item to the journal's `outbox` table in the same transaction
that records them. This thread works through the items strictly in order (a rollback after a
publish must not overtake it): `publish` uploads a store version as a new registry version
(moving the production/previous aliases), `set_production` moves the alias back for a rollback.
A failure is counted in nufilt_registry_errors_total{operation}, logged, and retried with
exponential back-off (1 s doubling to 5 min); nothing is dropped. An item that can never succeed
(its version was pruned before it could be uploaded, or a rollback target that was never
published) is marked skipped with the reason.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import structlog

from nufilt_core.lineage import LineageRecord

from ..journal import Journal, OutboxItem
from ..metrics import Metrics
from ..states import OutboxKind, OutboxState
from ..store import Store

log = structlog.get_logger("nufilt.publishers.outbox")

MIN_BACKOFF, MAX_BACKOFF = 1.0, 300.0


class Publisher(Protocol):
    def publish(self, model_dir: Path, store_version: int, record: LineageRecord) -> str: ...

    def set_production(self, registry_version: str) -> None: ...


class Outbox:
    def __init__(self, journal: Journal, store: Store, publisher: Publisher, metrics: Metrics,
                 min_backoff: float = MIN_BACKOFF, max_backoff: float = MAX_BACKOFF):
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.journal = journal
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.backoff = 0.0

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="registry-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.metrics.registry_pending.set(len(self.journal.outbox_pending()))
            item = self.journal.next_outbox()
            if item is None:
                self._wake.wait(5.0)
                self._wake.clear()
                continue
            try:
                self._do(item)
                self.backoff = 0.0
            except Exception as e:
                self.backoff = min(self.max_backoff, max(self.min_backoff, self.backoff * 2))
                self.metrics.registry_errors.labels(item.kind).inc()
                self.journal.outbox_failed_attempt(item.id, f"{type(e).__name__}: {e}")
                log.warning("registry_error", operation=item.kind, version=item.version, attempts=item.attempts + 1,
                            retry_in=self.backoff, error=f"{type(e).__name__}: {e}")
                self._stop.wait(self.backoff)

    def _do(self, item: OutboxItem) -> None:
        if item.kind == OutboxKind.PUBLISH:
            v = self.store.version(item.version)
            if v is None:
                self.journal.finish_outbox(item.id, OutboxState.SKIPPED,
                                           note="version removed by retention before publishing")
                log.warning("registry_publish_skipped", version=item.version, reason="version removed")
                return
            published = str(self.publisher.publish(v.path, v.number, v.lineage()))
            self.journal.finish_outbox(item.id, OutboxState.DONE, registry_version=published)
            log.info("registry_published", version=item.version, registry_version=published)
        elif item.kind == OutboxKind.SET_PRODUCTION:
            registry_version = self.journal.registry_version_of(item.version)
            if registry_version is None:
                self.journal.finish_outbox(item.id, OutboxState.SKIPPED, note="that version was never published")
                log.warning("registry_rollback_skipped", version=item.version, reason="never published")
                return
            self.publisher.set_production(registry_version)
            self.journal.finish_outbox(item.id, OutboxState.DONE, registry_version=registry_version)
            log.info("registry_production_moved", version=item.version, registry_version=registry_version)
        else:
            self.journal.finish_outbox(item.id, OutboxState.SKIPPED, note=f"unknown kind {item.kind!r}")
