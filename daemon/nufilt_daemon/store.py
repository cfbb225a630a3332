"""The model store: numbered versions, the `production` symlink, candidates and quarantine.

    STORE/
      production -> versions/v000003     relative symlink, switched atomically
      versions/v000003/                  weights, nufilt-lineage.json, validation.json
      candidates/job-000004-a1/          merge output being validated (discarded after a crash)
      quarantine/job-000005/             a rejected candidate and its validation.json
      .lock                              flock: one production change at a time (daemon, CLI)

A version folder only ever appears complete: the candidate is renamed into `versions/`, so
production always points at a complete, validated version. `validation.json` carries the job
id and the parent version (what production was when the merge started): rollback follows it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nufilt_core.checkpoint import LINEAGE_NAME
from nufilt_core.errors import NufiltError
from nufilt_core.fsutil import fsync_dir
from nufilt_core.lineage import LineageRecord

VALIDATION_NAME = "validation.json"
VERSION_RE = re.compile(r"^v(\d{6,})$")


class StoreError(NufiltError):
    """A store operation that cannot be done (nothing to roll back to, version missing, ...)."""


@dataclass(frozen=True)
class Version:
    number: int
    path: Path

    @property
    def name(self) -> str:
        return version_name(self.number)

    def report(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / VALIDATION_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def lineage(self) -> LineageRecord:
        return LineageRecord.read(self.path)

    @property
    def parent(self) -> int | None:
        return self.report().get("parent_version")


def version_name(number: int) -> str:
    return f"v{number:06d}"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_tree(path: Path) -> None:
    """Rename aside first, so a half-deleted folder never looks like a version or candidate."""
    if not path.exists() and not path.is_symlink():
        return
    trash = path.parent / f".deleting-{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.candidates_dir = self.root / "candidates"
        self.quarantine_dir = self.root / "quarantine"
        self.production_link = self.root / "production"

    def ensure(self) -> Store:
        for d in (self.versions_dir, self.candidates_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes: the daemon's promoter and `nufilt rollback`."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- reading ---------------------------------------------------------------------------

    def versions(self) -> list[Version]:
        if not self.versions_dir.is_dir():
            return []
        out = []
        for p in self.versions_dir.iterdir():
            m = VERSION_RE.match(p.name)
            if m and p.is_dir():
                out.append(Version(int(m.group(1)), p))
        return sorted(out, key=lambda v: v.number)

    def version(self, number: int) -> Version | None:
        p = self.versions_dir / version_name(number)
        return Version(number, p) if p.is_dir() else None

    def production(self) -> Version | None:
        try:
            target = os.readlink(self.production_link)
        except FileNotFoundError:
            return None
        except OSError as e:  # not a link, or the store itself is not a folder any more
            raise StoreError(f"{self.production_link}: cannot be read as the production link "
                             f"({e.strerror or e})") from None
        m = VERSION_RE.match(Path(target).name)
        if not m:
            raise StoreError(f"{self.production_link}: points at {target}, not a version folder")
        v = Version(int(m.group(1)), self.versions_dir / Path(target).name)
        if not v.path.is_dir():
            raise StoreError(f"{self.production_link}: points at {target}, which is missing")
        return v

    # --- candidates ------------------------------------------------------------------------

    def candidate_path(self, job_id: int, attempt: int) -> Path:
        return self.candidates_dir / f"job-{job_id:06d}-a{attempt}"

    def clean_candidates(self) -> list[Path]:
        """After a crash: every candidate (and merge_step's hidden temporaries) is half-done work."""
        removed = []
        leftovers = list(self.candidates_dir.iterdir()) if self.candidates_dir.is_dir() else []
        if self.versions_dir.is_dir():  # versions being deleted when the daemon stopped
            leftovers += [p for p in self.versions_dir.iterdir() if p.name.startswith(".")]
        for p in leftovers:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
        for p in self.root.glob(".production.tmp-*"):
            p.unlink(missing_ok=True)
        return removed

    # --- production changes (call under self.lock()) ----------------------------------------

    def add_version(self, candidate: Path, report: dict[str, Any], floor: int = 0) -> Version:
        """Write the report into the candidate, then rename it to the next version number."""
        write_json_atomic(candidate / VALIDATION_NAME, report)
        fsync_dir(candidate)
        existing = [v.number for v in self.versions()]
        number = max([floor, *existing]) + 1
        target = self.versions_dir / version_name(number)
        os.rename(candidate, target)
        fsync_dir(self.versions_dir)
        return Version(number, target)

    def set_production(self, number: int) -> None:
        """New symlink beside the old one, then rename over it: readers see old or new, never none."""
        if self.version(number) is None:
            raise StoreError(f"version {version_name(number)} does not exist in {self.versions_dir}")
        tmp = self.root / f".production.tmp-{uuid.uuid4().hex[:8]}"
        os.symlink(Path("versions") / version_name(number), tmp)
        os.replace(tmp, self.production_link)
        fsync_dir(self.root)

    def rollback_target(self) -> tuple[Version, Version]:
        """(current production, the version it was merged from)."""
        current = self.production()
        if current is None:
            raise StoreError(f"{self.root}: no production version yet, nothing to roll back")
        parent = current.parent
        if parent is None:
            raise StoreError(f"production {current.name} is the first version (step 1); there is nothing before it")
        target = self.version(parent)
        if target is None:
            raise StoreError(f"production {current.name} was merged from {version_name(parent)}, which retention "
                             "has removed; nothing to roll back to")
        return current, target

    def prune(self, keep: int) -> list[int]:
        """Keep the newest `keep` versions, production and production's parent; delete the rest."""
        versions = self.versions()
        prod = self.production()
        keep_numbers = {v.number for v in versions[-keep:]}
        if prod is not None:
            keep_numbers.add(prod.number)
            if prod.parent is not None:
                keep_numbers.add(prod.parent)
        removed = []
        for v in versions:
            if v.number not in keep_numbers:
                remove_tree(v.path)
                removed.append(v.number)
        return removed

    # --- quarantine ------------------------------------------------------------------------

    def quarantine(self, job_id: int, candidate: Path | None, report: dict[str, Any], keep: int) -> Path:
        """Keep a rejected candidate (if there is one) with its report; the oldest beyond `keep` go."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / f"job-{job_id:06d}"
        remove_tree(target)
        if candidate is not None and candidate.is_dir():
            os.rename(candidate, target)
        else:
            target.mkdir()
        write_json_atomic(target / VALIDATION_NAME, report)
        entries = sorted(p for p in self.quarantine_dir.iterdir() if p.name.startswith("job-"))
        for old in entries[: max(0, len(entries) - keep)]:
            if old != target:
                remove_tree(old)
        return target


def lineage_of(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / LINEAGE_NAME).read_text())
    except (OSError, ValueError):
        return None
