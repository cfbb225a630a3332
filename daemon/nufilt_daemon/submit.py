"""`nufilt submit`: a checkpoint copied into the inbox under a temporary name on the same filesystem, then
renamed into place, so the daemon never sees a half-copied one; with `--wait`, its outcome followed through the
journal (and, with a model registry, its publication)."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
import uuid
from pathlib import Path

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.errors import NufiltError
from nufilt_core.fsutil import rename_no_replace
from nufilt_core.interrupts import check_for_stop

from .config import Settings
from .intake import content_hash
from .journal import JOURNAL_NAME, Job, Journal
from .names import printable
from .states import FINAL_STATES, JobState, OutboxKind
from .store import version_name


def submit_checkpoint(settings: Settings, src: Path, name: str | None, wait: bool, timeout: float) -> int:
    """Copy `src` into the inbox as `name` (default: its own); with `wait`, follow it until the daemon has
    decided. The exit status: 0 once submitted, or with `wait` only if promoted."""
    if not src.exists() and not src.is_symlink():
        raise NufiltError(f"{src}: does not exist")
    # what the daemon will accept, refused here with the same reason (a pickle with the conversion command)
    Checkpoint.open(src, strict=True)
    # with --wait: the content's identity and the journal's last job of it, taken before the copy is
    # renamed into the inbox, where the daemon may journal it at once
    mark = journal_mark(settings, src) if wait else None
    dest = copy_into_inbox(src, Path(settings.watch_dir), name)
    print(f"submitted {src} as {dest}", flush=True)
    return wait_for_outcome(settings, *mark, timeout) if mark else 0


# --- the copy ----------------------------------------------------------------------------


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def _share_with_group(path: Path) -> None:
    """The copy in the inbox readable by the daemon's group (a shared inbox, deploy/README.md), whatever the
    trainer's umask or the writer (safetensors saves 0600): files g+r, folders g+rwx, so that the daemon can
    read the files and move the folder out of the inbox once it is journaled."""
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        mode = os.lstat(p).st_mode
        if stat.S_ISDIR(mode):
            os.chmod(p, stat.S_IMODE(mode) | stat.S_IRWXG)
        elif stat.S_ISREG(mode):
            os.chmod(p, stat.S_IMODE(mode) | stat.S_IRGRP)


def _copy_unless_stopped(src: str, dst: str) -> str:
    check_for_stop()
    return shutil.copy2(src, dst)


def copy_into_inbox(src: Path, inbox: Path, name: str | None) -> Path:
    """`src` (a file or a folder) copied into `inbox` as `name` (default: its own, a file's with .safetensors):
    under a temporary name the watcher ignores, synced, then renamed, never over an entry already there. The
    temporary copy is removed on any failure or stop. Returns the inbox entry."""
    inbox.mkdir(parents=True, exist_ok=True)
    name = name or src.name
    if src.is_file() and not name.endswith(".safetensors"):
        name += ".safetensors"
    if name.startswith((".", "tmp-")) or name.endswith(".partial"):
        raise NufiltError(f"{name}: the inbox ignores hidden and temporary names; choose another --name")
    dest = inbox / name
    if dest.exists():
        raise NufiltError(f"{dest}: already in the inbox (pass --name to choose another name)")
    tmp = inbox / f"tmp-{uuid.uuid4().hex[:8]}-{name}"  # ignored by the watcher until renamed
    try:
        if src.is_dir():
            # a link swapped in since the check is refused, not followed; a stop is honoured between files
            shutil.copytree(src, tmp, symlinks=True, copy_function=_copy_unless_stopped)
        else:
            shutil.copy2(src, tmp)
        _share_with_group(tmp)
        _fsync_tree(tmp)
        try:  # never over an entry another submit renamed in meanwhile
            rename_no_replace(tmp, dest)
        except FileExistsError:
            raise NufiltError(f"{dest}: already in the inbox (pass --name to choose another name)") from None
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return dest


# --- --wait ------------------------------------------------------------------------------


def _lookup(settings: Settings, sha: str, after: int) -> tuple[Job | None, Job | None]:
    """(newest job of this content above id `after`, the job it duplicates if it is a duplicate)."""
    path = Path(settings.state_dir) / JOURNAL_NAME
    if not path.exists():  # the daemon has not started yet
        return None, None
    journal = Journal(path, create=False)
    try:
        job = journal.latest_with_content(sha, after)
        first = journal.job(job.duplicate_of) if job and job.duplicate_of is not None else None
        return job, first
    finally:
        journal.close()


def journal_mark(settings: Settings, src: Path) -> tuple[str, int]:
    """(content hash, id of the last job of that content so far): jobs up to it are not this submission's."""
    sha = content_hash(src)  # the identity the daemon journals (the copy in the inbox has the same)
    earlier, _ = _lookup(settings, sha, 0)
    return sha, earlier.id if earlier else 0


def wait_for_outcome(settings: Settings, sha: str, after: int, timeout: float) -> int:
    """Follow the submitted content through the journal until it is promoted, rejected or failed."""
    t0, last = time.monotonic(), None
    while time.monotonic() - t0 < timeout:
        job, first = _lookup(settings, sha, after)
        took = f"{time.monotonic() - t0:.1f} s"
        if job is not None and job.state == JobState.DUPLICATE:
            print(f"duplicate of job {job.duplicate_of} ({first.state if first else '?'}), never merged twice")
            return 0 if first is not None and first.state == JobState.PROMOTED else 1
        if job is not None and job.state != last:
            last = job.state
            if job.state == JobState.PROMOTED and job.version is not None:
                print(f"promoted as {version_name(job.version)} (step {job.step}) in {took}", flush=True)
                wait_for_publication(settings, job.version, t0, timeout)
                return 0
            if job.state in FINAL_STATES:
                print(f"{job.state} after {took}: {printable(job.reason or '')}")
                return 1
        time.sleep(0.5)
    print(f"still {last or 'not journaled'} after {timeout:g} s; it stays in the daemon's hands "
          "(follow it with `nufilt status`)", file=sys.stderr)
    return 1


def wait_for_publication(settings: Settings, version: int, t0: float, timeout: float) -> None:
    """With a registry (the promotion queued a publish item in the journal): until the daemon has
    published `version` and moved the production alias to it, so that what the user looks at next
    (the registry) agrees. Not while the registry fails: that is said once and left to the daemon."""
    while time.monotonic() - t0 < timeout:
        journal = Journal(Path(settings.state_dir) / JOURNAL_NAME, create=False)
        try:
            pending = journal.outbox_pending()
            mine = next((i for i in pending if i.kind == OutboxKind.PUBLISH and i.version == version), None)
            registry_version = journal.registry_version_of(version) if mine is None else None
        finally:
            journal.close()
        took = f"{time.monotonic() - t0:.1f} s"
        if mine is None:  # published, skipped, or no registry configured
            if registry_version is not None:
                print(f"published to the model registry as version {registry_version} in {took}")
            return
        failing = [i for i in pending if i.id <= mine.id and i.attempts > 0]  # in order: earlier ones block it
        if failing:
            print(f"not published to the model registry yet ({printable(failing[0].last_error or '?')}); the "
                  "daemon retries (`nufilt status` shows what waits)")
            return
        time.sleep(0.5)
