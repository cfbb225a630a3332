"""File-type guards: what a checkpoint may be made of on disk.

A checkpoint is regular files (and, for a folder, directories). Anything else is refused with a
CheckpointError naming it: a FIFO or a device would block or never end a read, a socket cannot be
read, and a symbolic link or a hard link (in strict mode, used for everything that arrives in the
daemon's inbox) would make us read, stage and publish a file from outside the entry, e.g. a secret.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

from .errors import CheckpointError

# O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer (the
# fstat that follows then refuses it); no effect on regular files.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a file")):
        if test(mode):
            return name
    return "not a regular file"


def os_reason(e: OSError) -> str:
    """Why an OS call on a checkpoint failed; for a permission error, which user was refused and the fix."""
    text = e.strerror or str(e)
    if e.errno in (errno.EACCES, errno.EPERM):
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            user = f"uid {os.geteuid()}"
        text += (f" (for user {user}: make the checkpoint readable by it, e.g. `chmod -R g+rX` with {user} "
                 "in the files' group)")
    return text


def entry_stat(path: Path, strict: bool) -> os.stat_result:
    """stat (strict: lstat) of `path`, refusing anything but a regular file or a directory."""
    try:
        st = os.lstat(path) if strict else os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(path, "does not exist") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot be examined: {os_reason(e)}") from e
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        hint = " (links are never followed in the inbox: copy the file itself)" if stat.S_ISLNK(st.st_mode) else ""
        raise CheckpointError(path, f"is {kind_of(st.st_mode)}, not a regular file or folder{hint}")
    if strict and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        # another name of the same file may lie outside the entry (a hard link to a secret, copied into a version)
        raise CheckpointError(path, f"is a hard link (the file has {st.st_nlink} names): copy the file itself "
                              "into the inbox")
    return st


def open_regular(path: Path, strict: bool) -> int:
    """An fd open for reading on a regular file; refuses FIFOs, devices, sockets (and, strict, links)."""
    flags = OPEN_FLAGS | (os.O_NOFOLLOW if strict else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if strict and os.path.islink(path):
            raise CheckpointError(path, "is a symbolic link, not a regular file (links are never followed "
                                  "in the inbox)") from None
        raise CheckpointError(path, f"cannot read: {os_reason(e)}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(path, f"is {kind_of(st.st_mode)}, not a regular file")
    return fd


def check_tree(root: Path) -> None:
    """Strict mode for a folder: every entry under it, at any depth, is a regular file or a directory."""
    entry_stat(root, strict=True)
    if not root.is_dir():
        return
    try:
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
            for name in (*dirnames, *filenames):
                entry_stat(Path(dirpath) / name, strict=True)
    except OSError as e:
        raise CheckpointError(getattr(e, "filename", None) or root, f"cannot be listed: {os_reason(e)}") from e


def _raise(e: OSError) -> None:
    raise e


def plain_file_name(name: object) -> bool:
    """A shard name an index may use: one path component in the index's own folder."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\x00" not in name
            and (os.altsep is None or os.altsep not in name) and not os.path.isabs(name))
