"""File systems with faults, for the file store tests: real subclasses of the seam."""

from __future__ import annotations

import errno
import os
import threading

from msg.storage.fs import FileSystem


class CountingFS(FileSystem):
    """Counts syncs and notes which threads ran them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.syncs = 0
        self.sync_threads: set[int] = set()
        self.writes = 0

    def _note(self) -> None:
        with self._lock:
            self.syncs += 1
            self.sync_threads.add(threading.get_ident())

    def sync(self, fd: int) -> None:
        self._note()
        super().sync(fd)

    def sync_path(self, path: str) -> None:
        self._note()
        super().sync_path(path)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        self.writes += 1
        return super().pwrite(fd, data, offset)


class GatedFS(CountingFS):
    """Syncs block until ``gate`` is set, so tests can act while an fsync runs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def sync(self, fd: int) -> None:
        self.entered.set()
        if not self.gate.wait(timeout=10):
            raise OSError(errno.ETIMEDOUT, "test gate never opened")
        super().sync(fd)


class LimitedFS(FileSystem):
    """A disk with ``space`` bytes left (None: unlimited), like a real full disk:
    a write that does not fit writes what fits, the next one raises ENOSPC."""

    def __init__(self) -> None:
        self.space: int | None = None
        self.errno = errno.ENOSPC

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        if self.space is None:
            return super().pwrite(fd, data, offset)
        if self.space <= 0:
            raise OSError(self.errno, os.strerror(self.errno))
        count = super().pwrite(fd, bytes(data[: self.space]), offset)
        self.space -= count
        return count

    def write_file(self, path: str, data: bytes) -> None:
        if self.space is not None and len(data) > self.space:
            raise OSError(self.errno, os.strerror(self.errno))
        super().write_file(path, data)


class FailingSyncFS(FileSystem):
    """fsync fails with EIO once ``broken`` is set (a dying disk)."""

    def __init__(self) -> None:
        self.broken = False

    def sync(self, fd: int) -> None:
        if self.broken:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().sync(fd)


class ExhaustedFS(FileSystem):
    """A process out of file descriptors on demand: the next ``fail_opens`` opens (log
    files and ``write_file``) and the next ``fail_sync_paths`` syncs by path (the sync
    thread opens those) of a path ending in ``sync_suffix`` fail with EMFILE, as the
    system calls would. Also counts the log-file descriptors open now and at most
    (``open_fds``, ``peak``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fail_opens = 0
        self.fail_sync_paths = 0
        self.sync_suffix = ""
        self.max_fds: int | None = None
        """Like RLIMIT_NOFILE for log files: opens beyond this many fail (None: no limit)."""
        self.failed = 0
        """Opens and path syncs that failed with EMFILE so far."""
        self.open_fds: set[int] = set()
        self.peak = 0

    def _exhausted(self, attribute: str) -> bool:
        with self._lock:
            left: int = getattr(self, attribute)
            if left <= 0:
                return False
            setattr(self, attribute, left - 1)
            self.failed += 1
            return True

    def open(self, path: str) -> int:
        full = self.max_fds is not None and len(self.open_fds) >= self.max_fds
        if full or self._exhausted("fail_opens"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
        fd = super().open(path)
        with self._lock:
            self.open_fds.add(fd)
            self.peak = max(self.peak, len(self.open_fds))
        return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self.open_fds.discard(fd)
        super().close(fd)

    def write_file(self, path: str, data: bytes) -> None:
        if self._exhausted("fail_opens"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
        super().write_file(path, data)

    def sync_path(self, path: str) -> None:
        if path.endswith(self.sync_suffix) and self._exhausted("fail_sync_paths"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
        super().sync_path(path)
