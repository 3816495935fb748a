"""Log files and the bounded cache of their open descriptors.

Theory of operation
-------------------
A :class:`LogFile` is a file that only grows, batch by batch, at an offset it tracks
itself. It does not own a descriptor: it asks the store's :class:`OpenFiles` for one
each time it writes or is read, and the cache opens the file on demand. So a store
with 100,000 topics does not hold 100,000 descriptors: at most ``limit`` log files
are open, and the least recently used one is closed when another must be opened
(an LRU: a dict in use order, moved to the end on every use, which costs one pop and
one insert per batch and file, never per message).

The limit. Descriptors are shared with the broker's sockets, which need most of them:
:func:`default_limit` is a quarter of the process's soft ``RLIMIT_NOFILE``, at most
:data:`MAX_DEFAULT_LIMIT` (beyond that a larger cache saves nothing measurable: a
reopen costs a few microseconds). ``FileStore(max_open_files=...)`` overrides it.

Closing and group commit. The cache never closes a descriptor itself: it hands
every one it lets go of to :meth:`GroupCommit.close_fd`, which closes an idle one at
once, and a dirty one at once too under ``everysec`` and ``never`` (its path is then
synced by the next round), but under ``always`` only right after the round that
syncs it (rounds fsync by descriptor there). The file's next use opens a new
descriptor; both are the same inode, so writes through either are covered by an
fsync of either. A dirty descriptor's number is not reused while the group commit
still knows it, because it is still open.

Running out of descriptors (EMFILE: this process; ENFILE: the whole system) is
transient, not a disk fault, and never turns the store read-only. The rule:

1. An ``open`` that fails with EMFILE/ENFILE makes the cache close the older half of
   its idle files (:meth:`OpenFiles.shed`), at least halve its limit (so it stops
   competing with the sockets; never below :data:`MIN_DEFAULT_LIMIT` unless
   configured lower; one WARNING per lowering, so a few at most), and retry once.
   Shedding also syncs, on the loop thread, and closes the descriptors it let go of
   that wait for a sync round (:meth:`GroupCommit.sync_closing`): a batch writing
   more logs than the cache holds keeps one per log beyond it, and could otherwise
   run out with nothing idle to close.
2. If the retry fails too, the operation that needed the file fails: an append or a
   settle gets ``storage_error`` for the items bound for that file only, a topic
   read raises :class:`~msg.errors.StorageError`. Nothing was written, nothing is
   lost, the store stays writable, and the next batch tries again.
3. The sync thread opens files by path too (a new ``meta.json``, directories). It
   never sheds (the cache is the loop thread's); see :mod:`.commit` for how a round
   that could not open a path retries.
"""

from __future__ import annotations

import errno
import logging
import sys
from typing import TYPE_CHECKING, Final

from msg.storage.fs import FileSystem

if TYPE_CHECKING:
    from msg.storage.commit import GroupCommit

__all__ = [
    "FD_EXHAUSTED",
    "MAX_DEFAULT_LIMIT",
    "MIN_DEFAULT_LIMIT",
    "LogFile",
    "OpenFiles",
    "default_limit",
]

logger = logging.getLogger(__name__)

FD_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE})
"""Errnos that mean "no descriptor free now": transient, never a disk fault."""

# A quarter of the soft RLIMIT_NOFILE for log files; the rest is the sockets' (a
# broker's connections are its main use of descriptors) and the sync threads' (each
# opens at most one path at a time).
_SHARE: Final = 4
# 4,096 open logs: beyond this the hit rate gained is worth less than the descriptors
# (a reopen costs ~5 microseconds; a batch writes each file once at most).
MAX_DEFAULT_LIMIT: Final = 4096
# Below 64 a busy store would reopen files on nearly every batch; with a soft limit
# under 256 the broker has bigger problems than its cache.
MIN_DEFAULT_LIMIT: Final = 64
# Where RLIMIT_NOFILE cannot be read (Windows), assume the common Linux default.
_ASSUMED_RLIMIT: Final = 1024


def default_limit() -> int:
    """How many log files a store keeps open: a quarter of the soft RLIMIT_NOFILE,
    between :data:`MIN_DEFAULT_LIMIT` and :data:`MAX_DEFAULT_LIMIT`."""
    soft = _ASSUMED_RLIMIT
    if sys.platform != "win32":
        import resource

        found, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        soft = MAX_DEFAULT_LIMIT * _SHARE if found == resource.RLIM_INFINITY else found
    return max(MIN_DEFAULT_LIMIT, min(MAX_DEFAULT_LIMIT, soft // _SHARE))


class LogFile:
    """A file that only grows, batch by batch, at offsets it tracks itself.

    Open or closed is the cache's business: :meth:`append` and :meth:`descriptor` open
    it on demand. If a write fails (disk full) or is cut short, the file is truncated
    back to its last good length, so no partial record stays behind and the next
    batch lands where the failed one would have. Only if that truncate fails too is
    the file ``damaged``: the store then stops writing.
    """

    __slots__ = ("damaged", "fd", "files", "path", "size")

    def __init__(self, files: OpenFiles, path: str, size: int) -> None:
        self.files = files
        self.path = path
        self.size = size
        """Length of the good records; writes go here."""
        self.fd: int | None = None
        """The open descriptor, while the cache holds one for this file."""
        self.damaged = False

    @classmethod
    def create(cls, files: OpenFiles, path: str) -> LogFile:
        """Open ``path``, creating it if missing, and keep it open in the cache.

        The caller makes the new directory entry durable (``changed_dir``).
        """
        file = cls(files, path, 0)
        fd = files.descriptor(file)
        try:
            file.size = files.fs.size(fd)
        except OSError:
            files.release(file)
            raise
        return file

    def descriptor(self) -> int:
        """An open descriptor of this file (opened now if the cache had closed it)."""
        fd = self.fd
        if fd is None:
            return self.files.descriptor(self)
        self.files.touch(self)
        return fd

    def append(self, data: bytes) -> int:
        """Write all of ``data`` at the end, or nothing (raising the OSError).

        Returns the descriptor written, for the group commit.
        """
        if self.damaged:
            raise OSError(errno.EIO, "log file is damaged by an earlier failed write", self.path)
        fd = self.descriptor()  # EMFILE here: nothing written, nothing damaged
        fs = self.files.fs
        start = self.size
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                count = fs.pwrite(fd, view[written:], start + written)
                if count <= 0:
                    raise OSError(errno.EIO, "write made no progress", self.path)
                written += count
        except OSError:
            if written:
                try:
                    fs.truncate(fd, start)
                except OSError as exc:
                    self.damaged = True
                    logger.error(
                        "cannot cut a failed write off %s at %d: %s", self.path, start, exc
                    )
            raise
        finally:
            view.release()
        self.size = start + written
        return fd


class OpenFiles:
    """The log files with an open descriptor, least recently used first.

    Loop thread only (and the storage thread during recovery, before the loop uses
    it). See the module docstring.
    """

    __slots__ = ("_failing", "_open", "commit", "fs", "limit")

    def __init__(self, fs: FileSystem, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the open file limit must be at least 1, not {limit}")
        self.fs = fs
        self.limit = limit
        self.commit: GroupCommit | None = None
        """Set once the store is open: closes go through it (see the module docstring)."""
        self._open: dict[LogFile, None] = {}
        self._failing = 0
        """Opens failed with EMFILE/ENFILE since the last one that worked."""

    def __len__(self) -> int:
        return len(self._open)

    def touch(self, file: LogFile) -> None:
        """``file`` was used: it becomes the most recently used."""
        cached = self._open
        del cached[file]
        cached[file] = None

    def descriptor(self, file: LogFile) -> int:
        """An open descriptor of ``file``: opened (and cached) if it had none."""
        if file.fd is not None:
            self.touch(file)
            return file.fd
        fd = self.open(file.path)
        file.fd = fd
        self._open[file] = None
        if len(self._open) > self.limit:
            self._evict(len(self._open) - self.limit)
        return fd

    def open(self, path: str) -> int:
        """``fs.open(path)``, shedding idle files and retrying once on EMFILE/ENFILE.

        Also for descriptors the caller closes itself (reads of older segments).
        """
        try:
            fd = self.fs.open(path)
        except OSError as exc:
            if exc.errno not in FD_EXHAUSTED:
                raise
            self.shed()
            try:
                fd = self.fs.open(path)
            except OSError as again:
                if again.errno in FD_EXHAUSTED:
                    if not self._failing:
                        logger.error(
                            "cannot open %s: %s (%d log files open); operations that need "
                            "it fail with storage_error until descriptors are free",
                            path,
                            again.strerror,
                            len(self._open),
                        )
                    self._failing += 1
                raise
        if self._failing:
            logger.warning(
                "file descriptors are available again, after %d failed opens", self._failing
            )
            self._failing = 0
        return fd

    def shed(self) -> int:
        """Close the older half of the idle open files, and the descriptors the cache
        let go of that wait for a sync round (synced first), and lower the limit to
        what is left open (the process ran out of descriptors); return how many were
        closed."""
        commit = self.commit
        idle = [
            file
            for file in self._open
            if file.fd is not None and (commit is None or commit.idle(file.fd))
        ]
        victims = idle[: max(1, len(idle) // 2)] if idle else []
        for file in victims:
            self.release(file)
        synced = 0 if commit is None else commit.sync_closing()
        # At least halve the limit, so this warning can only come a few times, but
        # not below the default minimum unless the operator configured less.
        floor = min(self.limit, MIN_DEFAULT_LIMIT)
        lowered = max(floor, min(len(self._open), self.limit // 2))
        if lowered < self.limit:
            logger.warning(
                "the process ran out of file descriptors: closed %d idle log files (and "
                "synced and closed %d) and keep at most %d open from now on (was %d); "
                "raise the open-file limit (ulimit -n) or lower max_open_files",
                len(victims),
                synced,
                lowered,
                self.limit,
            )
            self.limit = lowered
        return len(victims) + synced

    def release(self, file: LogFile) -> None:
        """Let go of ``file``'s descriptor (it is closed once its writes are synced)."""
        fd = file.fd
        if fd is None:
            return
        file.fd = None
        self._open.pop(file, None)
        self._close(fd, file.path)

    def _evict(self, count: int) -> None:
        victims = list(self._open)[:count] if count > 1 else [next(iter(self._open))]
        for file in victims:
            self.release(file)

    def _close(self, fd: int, path: str) -> None:
        commit = self.commit
        if commit is not None:
            commit.close_fd(fd, path)
            return
        try:
            self.fs.close(fd)
        except OSError as exc:
            logger.error("closing a log file failed: %s", exc)

    def close_all(self) -> None:
        """Close every cached descriptor now (the store is closing: no round follows)."""
        fs = self.fs
        for file in self._open:
            fd = file.fd
            file.fd = None
            if fd is not None:
                try:
                    fs.close(fd)
                except OSError as exc:
                    logger.error("closing a log file failed: %s", exc)
        self._open.clear()
