"""Every file-system call the file store makes, in one small class.

Theory of operation
-------------------
The file store never calls ``os`` directly: it goes through a :class:`FileSystem`
given to its constructor. That makes this class the seam for fault injection: a
test subclass can fail the Nth write with ``ENOSPC``, make ``fsync`` raise ``EIO``,
count syncs, or (later) simulate a crash by dropping everything not yet synced.

``free_bytes`` (one ``statvfs``) feeds the free-space watermark; the store calls it
at most every few hundred milliseconds, never per message.

Writes go to explicit offsets (``pwrite``) so a failed write can be cut off with
``truncate`` and the next one lands at the right place without seeking. ``sync``
prefers ``fdatasync``: appended data and the file size are flushed, but not the
access times nobody needs. ``sync`` and ``sync_path`` block; the file store only
calls them from its sync thread, never from the event loop.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Final

from msg.errors import StorageError

__all__ = ["FileSystem", "make_durable_dirs"]

_OPEN_FLAGS: Final = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS: Final = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
# rw-r--r--: the logs are meant to be read with cat and jq by anyone on the host
# who can already read the data directory.
_FILE_MODE: Final = 0o644


class FileSystem:
    """The real file system. Subclass to inject faults; every method is one call."""

    def open(self, path: str) -> int:
        """Open ``path`` for reading and writing, creating it if missing."""
        return os.open(path, _OPEN_FLAGS, _FILE_MODE)

    def close(self, fd: int) -> None:
        os.close(fd)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """Write at ``offset``; like the system call, may write less than all of ``data``."""
        return os.pwrite(fd, data, offset)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def truncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def sync(self, fd: int) -> None:
        """Force the file's data (and size) to the disk."""
        if sys.platform == "darwin" or not hasattr(os, "fdatasync"):
            os.fsync(fd)
        else:
            os.fdatasync(fd)

    def sync_path(self, path: str) -> None:
        """Force a file or directory, by path, to the disk (directories: their entries)."""
        fd = os.open(path, _DIR_FLAGS if os.path.isdir(path) else os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as file:
            return file.read()

    def write_file(self, path: str, data: bytes) -> None:
        """Create or replace ``path`` with ``data``; not synced (the caller syncs it)."""
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), _FILE_MODE
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def rename(self, source: str, target: str) -> None:
        os.replace(source, target)

    def remove(self, path: str) -> None:
        os.remove(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def remove_dir(self, path: str) -> None:
        os.rmdir(path)

    def is_empty(self, path: str) -> bool:
        """True for an empty file (a directory is never empty here)."""
        return os.path.isfile(path) and os.path.getsize(path) == 0

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def free_bytes(self, path: str) -> int:
        """Bytes an unprivileged writer may still use on the file system holding ``path``."""
        # One statvfs on POSIX (GetDiskFreeSpaceEx on Windows). "free" is f_bavail, not
        # f_bfree: the blocks reserved for root (5% on ext4) are not ours to count on.
        return shutil.disk_usage(path).free

    def lock(self, path: str) -> int:
        """Take an exclusive lock on ``path`` without waiting; StorageError if another holds it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), _FILE_MODE)
        try:
            _lock_fd(fd)
        except OSError as exc:
            os.close(fd)
            raise StorageError(
                f"data directory is in use: another broker holds the lock on {path}"
                f" ({exc.strerror})"
            ) from exc
        return fd

    def unlock(self, fd: int) -> None:
        # Closing the descriptor drops the lock.
        os.close(fd)


def make_durable_dirs(fs: FileSystem, path: str) -> None:
    """Create directory ``path`` and its missing parents, durably.

    A new directory's name is an entry of its parent, and like any entry it survives a
    power loss only once the parent is fsynced. Without this, a fresh data directory
    could lose its ``queues/`` (and every acked message under it) to a crash in the
    seconds before the kernel writes the parent back on its own.
    """
    missing: list[str] = []
    at = path
    while not fs.exists(at):
        missing.append(at)
        parent = os.path.dirname(at)
        if parent == at:
            break
        at = parent
    if not missing:
        return
    fs.makedirs(path)
    for created in reversed(missing):
        fs.sync_path(os.path.dirname(created))


if sys.platform == "win32":
    import msvcrt

    def _lock_fd(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

else:
    import fcntl

    def _lock_fd(fd: int) -> None:
        # flock, not fcntl locks: an flock belongs to the open file, so a second open in
        # the same process is refused too, and closing any other descriptor of the file
        # does not silently drop it.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
