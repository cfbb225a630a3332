"""Durable file-system steps shared by the engine and the daemon."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

AT_FDCWD = -100
RENAME_NOREPLACE = 1


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` in one step unless `dst` exists (FileExistsError then, `src` untouched): a check
    followed by a rename would let a concurrent writer's `dst` be replaced. Linux's renameat2(RENAME_NOREPLACE);
    where the system or the file system lacks it, a file is hard-linked then unlinked (a link never replaces),
    and a folder renamed (which cannot replace a folder that holds anything)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE)
    except (OSError, AttributeError):  # no renameat2 in this C library
        rc, err = -1, errno.ENOSYS
    else:
        err = ctypes.get_errno()
    if rc == 0:
        return
    if err == errno.EEXIST:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    if err not in (errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err), str(src))
    if os.path.isdir(src) and not os.path.islink(src):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
    else:
        os.link(src, dst, follow_symlinks=False)
        os.unlink(src)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
