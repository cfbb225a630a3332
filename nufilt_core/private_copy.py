"""A private copy of a checkpoint and its content hash from one read of its bytes.

The daemon's intake must own what it merges: a hard link shares the inode, so a writer that
rewrites the inbox file in place would change the staged copy too. A real copy reads every byte,
and so does the content hash; doing both from the same buffers halves the intake's reads and
makes the hash describe exactly the bytes that were staged (not the file as it was a moment before).

Each weight file is copied as its header, then each tensor's byte range in file order (and any
padding between them): one tensor in memory at a time, the next one read and hashed on a helper
thread meanwhile (readahead.py). Every other file of the entry (index, config.json, tokenizer, ...)
is copied as it is. The source file is opened once and read through that descriptor, so a name
swapped for a link meanwhile is never followed. The copy's header is read back and must describe
the layout that was hashed, or the checkpoint changed while it was copied.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

from .errors import CheckpointError
from .fsguard import entry_stat, open_regular, os_reason
from .fsutil import fsync_dir
from .readahead import read_ahead
from .safetensors_io import MAX_HEADER_BYTES, TensorInfo, read_header, read_raw, tensor_digest

COPY_CHUNK_BYTES = 8 * 1024 * 1024  # side files and padding: streamed, never held whole


def copy_and_digest(src: Path, tensors: Iterable[TensorInfo], dst: Path, strict: bool) -> list[str]:
    """Copy the checkpoint at `src` (one weight file, or a folder; an index file opens as its folder), whose
    weight files hold `tensors`, to `dst`, which must not exist, and return the digest lines of the bytes
    copied (Checkpoint.content_hash makes them its content hash). Files and folders are fsynced. `strict`:
    links, FIFOs, devices and sockets anywhere in the entry raise CheckpointError. Faults of the source raise
    CheckpointError; write errors (a full disk) raise OSError. On failure `dst` may hold a partial copy: the
    caller removes it."""
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in tensors:
        by_file.setdefault(info.file, []).append(info)
    if not stat.S_ISDIR(entry_stat(src, strict).st_mode):
        if src not in by_file:  # not its weight file (an index opens as its folder): nothing hashed would be copied
            raise CheckpointError(src, "holds none of the checkpoint's tensors")
        digests = _copy_weight_file(src, dst, by_file.pop(src), strict)
    else:
        digests = _copy_tree(src, dst, by_file, strict)
    fsync_dir(dst.parent)  # the entry's own name
    return digests


def _copy_tree(src: Path, dst: Path, by_file: dict[Path, list[TensorInfo]], strict: bool) -> list[str]:
    """Every file under `src`: weight files tensor by tensor (their digest lines returned), the rest as is."""
    digests: list[str] = []
    os.mkdir(dst)

    def unlistable(e: OSError) -> None:
        raise CheckpointError(Path(e.filename or src), f"cannot be listed: {os_reason(e)}")

    for dirpath, dirnames, filenames in os.walk(src, onerror=unlistable, followlinks=not strict):
        here, there = Path(dirpath), dst / Path(dirpath).relative_to(src)
        for name in dirnames:
            entry_stat(here / name, strict)  # strict: a link to a folder is refused, never copied empty
            os.mkdir(there / name)
        for name in filenames:
            infos = by_file.pop(here / name, None)
            if infos is not None:
                digests += _copy_weight_file(here / name, there / name, infos, strict)
            else:
                _copy_plain_file(here / name, there / name, strict)
        fsync_dir(there)
    if by_file:  # a weight file that was opened is gone: what was hashed would not be what is staged
        raise CheckpointError(next(iter(by_file)), "disappeared while the checkpoint was copied")
    return digests


def _copy_weight_file(src: Path, dst: Path, infos: list[TensorInfo], strict: bool) -> list[str]:
    """Header, then tensors and padding in file order, through one descriptor; the tensors' digest lines."""
    infos = sorted(infos, key=lambda i: i.start)
    fd = open_regular(src, strict)
    try:
        with _create(dst, os.fstat(fd).st_mode) as out:
            (header_len,) = struct.unpack("<Q", _pread_exact(fd, src, 8, 0))
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(src, "changed while it was copied (header length)")
            out.write(_pread_exact(fd, src, 8 + header_len, 0))
            digests = _copy_tensors(fd, src, infos, 8 + header_len, out)
            out.flush()
            os.fsync(out.fileno())
    finally:
        os.close(fd)
    _check_layout(src, dst, infos)
    return digests


def _copy_tensors(fd: int, src: Path, infos: list[TensorInfo], pos: int, out: io.BufferedWriter) -> list[str]:
    """Each tensor's bytes, read once (ahead, on the helper thread), hashed and written; padding copied."""

    def load(info: TensorInfo) -> tuple[bytearray, str]:
        raw = read_raw(info, fd)
        return raw, tensor_digest(info.name, info.dtype, info.shape, raw)

    digests = []
    loaded = read_ahead(infos, load, lambda i: i.nbytes)
    try:  # closed before the caller closes `fd`: no read may still be running on it
        for info, done in loaded:
            if info.start < pos:  # the header grew into the data since it was read
                raise CheckpointError(src, "changed while it was copied (header)", tensor=info.name)
            _copy_range(fd, src, pos, info.start, out)
            raw, digest = done or load(info)
            out.write(raw)
            digests.append(digest)
            pos = info.start + info.nbytes
            del raw, done  # one tensor in memory (plus the one read ahead)
    finally:
        loaded.close()
    return digests


def _check_layout(src: Path, dst: Path, infos: list[TensorInfo]) -> None:
    """The copy's header must describe the tensors that were hashed, byte range for byte range."""
    copied, _ = read_header(dst, strict=True)
    want = [(i.name, i.dtype, i.shape, i.start, i.nbytes) for i in infos]
    got = [(i.name, i.dtype, i.shape, i.start, i.nbytes) for i in copied.values()]  # in file order
    if got != want:
        raise CheckpointError(src, "changed while it was copied (its header no longer matches its tensors)")


def _copy_plain_file(src: Path, dst: Path, strict: bool) -> None:
    fd = open_regular(src, strict)
    try:
        with _create(dst, os.fstat(fd).st_mode) as out:
            _copy_range(fd, src, 0, None, out)
            out.flush()
            os.fsync(out.fileno())
    finally:
        os.close(fd)


def _copy_range(fd: int, src: Path, start: int, end: int | None, out: io.BufferedWriter) -> None:
    """Bytes start..end of `fd` (to its end when `end` is None) into `out`, a chunk at a time."""
    pos = start
    while end is None or pos < end:
        want = COPY_CHUNK_BYTES if end is None else min(COPY_CHUNK_BYTES, end - pos)
        try:
            chunk = os.pread(fd, want, pos)
        except OSError as e:
            raise CheckpointError(src, f"cannot read: {os_reason(e)}") from e
        if not chunk:
            if end is None:
                return
            raise CheckpointError(src, "file ended while it was copied")
        out.write(chunk)
        pos += len(chunk)


def _pread_exact(fd: int, src: Path, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        try:
            chunk = os.pread(fd, n - got, offset + got)
        except OSError as e:
            raise CheckpointError(src, f"cannot read: {os_reason(e)}") from e
        if not chunk:
            raise CheckpointError(src, "file ended while it was copied")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _create(dst: Path, src_mode: int) -> io.BufferedWriter:
    """A new file (never an existing one, never through a link) with the source's permissions, for writing.
    Buffered: it loops over short writes (Linux writes at most 2 GiB per call)."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                 stat.S_IMODE(src_mode) | stat.S_IRUSR | stat.S_IWUSR)
    return open(fd, "wb")  # the caller's `with` closes it

