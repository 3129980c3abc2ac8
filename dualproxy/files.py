"""Writing the files other processes read while we write them: chains, manifests, challenges,
session-ticket keys, the canary's halt record; and the lock that makes a read-modify-write of
one of them a single step across processes.

No trio and no other I/O: the pure commands (`dualproxy manifest sign`) use it as well as the
serving side.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["locked", "write_atomically"]


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` in one rename (a temporary file in the same folder, fsynced
    first, created with `mode`): a reader (a serving process polling its files) sees the old
    content or the new, never a torn file; the folder is fsynced too, so the rename survives a
    crash."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on PATH.lock (created 0600 beside `path`) for the block, so that
    processes (replicas on a shared folder: NFSv4 and Filestore honour flock) that read and
    then replace `path` do it one at a time: `path` itself is replaced by each write (a
    rename), so it cannot carry the lock. Blocking: hold it for a read and one small write.
    Without a lock file (a read-only folder), go on unlocked: writing fails there too, and
    says so."""
    try:
        fd = os.open(
            path.with_name(path.name + ".lock"),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
