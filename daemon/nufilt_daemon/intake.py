"""`emit`: turn a source's Arrival into a journaled job, durably, before the source lets go of it.

For each arrival: hash the checkpoint where the source left it (layout-independent content
hash, which also reads every byte once), then, under one lock so two copies of the same content
cannot both be queued, either record a duplicate or stage a private copy in STATE/staged/ and
journal the job as queued. A hard link is used where the filesystem allows (instant, no extra
space), else a full copy, so deleting or moving the inbox entry cannot lose a queued job. The
merge later re-hashes the staged copy and fails the job if it no longer matches.

An arrival that cannot be opened or read is journaled as rejected with the reason, so people see
it in `nufilt history` instead of it vanishing.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import structlog

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.errors import NufiltError
from nufilt_core.safetensors_io import combine_digests

from .journal import DUPLICATE, QUEUED, REJECTED, Job, Journal
from .sources.base import Arrival

log = structlog.get_logger("nufilt.intake")


def content_hash(path: Path) -> str:
    """The same layout-independent hash merge_step records for its inputs."""
    return combine_digests(digest for _, _, digest in Checkpoint.open(path).scan())


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # other filesystem, or links not allowed: copy and make it durable
        shutil.copy2(src, dst)
        with dst.open("rb+") as f:
            os.fsync(f.fileno())


def stage_copy(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a file or folder tree to `dst`, which must not exist."""
    if src.is_file():
        _link_or_copy(src, dst)
        return
    dst.mkdir()
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        for d in dirs:
            (dst / rel / d).mkdir()
        for f in files:
            _link_or_copy(Path(root) / f, dst / rel / f)


class Intake:
    def __init__(self, journal: Journal, staged_dir: Path, on_journaled: Callable[[Job, Arrival], None]):
        self.journal = journal
        self.staged_dir = Path(staged_dir)
        self.on_journaled = on_journaled  # metrics, waking the worker
        self._lock = threading.Lock()

    def emit(self, arrival: Arrival) -> None:
        bound = log.bind(source=arrival.source, checkpoint=arrival.reference)
        try:
            sha = content_hash(arrival.path)
        except NufiltError as e:
            job = self.journal.add_job(arrival.source, arrival.reference, None, None, REJECTED, str(e))
            bound.warning("checkpoint_unreadable", job=job.id, reason=str(e))
            self.on_journaled(job, arrival)
            return
        with self._lock:  # one arrival at a time from here: two copies of new content cannot both queue
            job = self.journal.add_if_duplicate(arrival.source, arrival.reference, sha)
            if job is None:
                job = self._stage_and_queue(arrival, sha)
        event = "checkpoint_duplicate" if job.state == DUPLICATE else "checkpoint_queued"
        bound.info(event, job=job.id, sha256=sha[:16], duplicate_of=job.duplicate_of)
        self.on_journaled(job, arrival)

    def _stage_and_queue(self, arrival: Arrival, sha: str) -> Job:
        self.staged_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:12]
        partial = self.staged_dir / f".{token}.partial"
        final = self.staged_dir / token
        try:
            partial.mkdir()
            stage_copy(arrival.path, partial / arrival.path.name)
            os.rename(partial, final)  # a crash before the commit below leaves an orphan: gc_staged
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        job = self.journal.add_job(arrival.source, arrival.reference, sha, str(final / arrival.path.name), QUEUED)
        if job.state == DUPLICATE:  # cannot happen under our lock, but never keep a copy nobody owns
            shutil.rmtree(final, ignore_errors=True)
        return job

    def gc_staged(self) -> list[Path]:
        """Remove staged copies no queued or running job refers to (crash leftovers)."""
        if not self.staged_dir.is_dir():
            return []
        wanted = {Path(j.staged_path).parent for j in self.journal.jobs(limit=1_000_000)
                  if j.staged_path and j.state in ("queued", "merging", "validating")}
        removed = []
        for p in self.staged_dir.iterdir():
            if p not in wanted:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
        return removed
