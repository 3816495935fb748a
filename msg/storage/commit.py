"""Group commit: many writers, few fsyncs, and never an fsync on the event loop.

Theory of operation
-------------------
Writers write on the event loop thread (into the page cache: fast), tell the
:class:`GroupCommit` what they dirtied, and ask to be called back once everything
written so far is durable. Each write bumps a generation counter. A sync round
snapshots the dirty files and directories and the current generation, then fsyncs
them on a dedicated single-thread executor. While a round runs, new writes go ahead
and their callbacks wait for the *next* round, which starts as soon as the current
one ends and covers everything written up to its start. So under load one fsync
serves many batches, and at most two rounds are ever waited for.

Callbacks run on the loop thread in the order they were registered, right when
their round completes. Stores do their bookkeeping inside the callbacks (a message
becomes claimable, a settle takes effect), not after an ``await``, so a caller
being cancelled cannot leave the index half updated.

Directories are synced after files: a new segment or a rename is durable only when
its directory entry is. A failed sync is final: its error is handed to every waiting
and every later callback and to ``on_failure`` (the store turns read-only). Retrying
an fsync after an error and then reporting success would be a lie: Linux may have
already dropped the dirty pages it could not write.

Only :attr:`FsyncPolicy.ALWAYS` waits; under EVERYSEC and NEVER callbacks run at
once and rounds happen only when the store asks (:meth:`sync_now`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

from msg.persistence import FsyncPolicy
from msg.storage.fs import FileSystem

__all__ = ["Callback", "GroupCommit"]

logger = logging.getLogger(__name__)

Callback = Callable[[OSError | None], None]


class GroupCommit:
    """Tracks what is dirty and runs sync rounds; see the module docstring."""

    def __init__(
        self,
        fs: FileSystem,
        policy: FsyncPolicy,
        loop: asyncio.AbstractEventLoop,
        executor: Executor,
        on_failure: Callable[[OSError], None],
    ) -> None:
        self._fs = fs
        self._policy = policy
        self._loop = loop
        self._executor = executor
        self._on_failure = on_failure
        self._written = 0
        self._synced = 0
        self._dirty_fds: set[int] = set()
        self._dirty_paths: dict[str, None] = {}
        self._dirty_dirs: dict[str, None] = {}
        self._waiters: deque[tuple[int, Callback]] = deque()
        self._round: asyncio.Future[None] | None = None
        self._busy: frozenset[int] = frozenset()
        self._closing: set[int] = set()
        self.failure: OSError | None = None

    # -- what writers report -------------------------------------------------------

    def wrote(self, fd: int) -> None:
        self._written += 1
        self._dirty_fds.add(fd)

    def created(self, path: str) -> None:
        """A file written by path (a fresh meta.json, a compacted log) needs a sync."""
        self._written += 1
        self._dirty_paths[path] = None

    def changed_dir(self, path: str) -> None:
        """An entry of directory ``path`` was added, renamed or removed."""
        self._written += 1
        self._dirty_dirs[path] = None

    @property
    def dirty(self) -> bool:
        return self._synced < self._written

    def close_fd(self, fd: int) -> None:
        """Close ``fd`` once no sync round needs it any more."""
        self._closing.add(fd)
        self._close_idle()

    def close_all(self) -> None:
        """Close every deferred descriptor now (the store is closing; no rounds follow)."""
        self._dirty_fds.clear()
        self._close_idle()

    def _close_idle(self) -> None:
        for fd in [
            fd for fd in self._closing if fd not in self._dirty_fds and fd not in self._busy
        ]:
            self._closing.discard(fd)
            try:
                self._fs.close(fd)
            except OSError as exc:
                logger.error("closing a log file failed: %s", exc)

    # -- waiting for durability ----------------------------------------------------

    def after_durable(self, callback: Callback) -> None:
        """Call ``callback`` once everything written so far is durable under the policy."""
        if self.failure is not None:
            callback(self.failure)
        elif self._policy is not FsyncPolicy.ALWAYS or self._synced >= self._written:
            callback(None)
        else:
            self._waiters.append((self._written, callback))
            if self._round is None:
                self._start()

    async def durable(self) -> None:
        """Wait until everything written so far is durable; raises the sync's OSError."""
        future: asyncio.Future[None] = self._loop.create_future()
        self.after_durable(lambda error: _resolve(future, error))
        await future

    async def sync_now(self) -> None:
        """Sync everything written so far, whatever the policy (timed sync, close)."""
        if self.failure is not None:
            raise self.failure
        if self._synced >= self._written:
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append((self._written, lambda error: _resolve(future, error)))
        if self._round is None:
            self._start()
        await future

    async def drain(self) -> None:
        """Wait for a running sync round to end (success or not)."""
        while self._round is not None:
            await asyncio.wait([self._round])

    # -- sync rounds ---------------------------------------------------------------

    def _start(self) -> None:
        fds = list(self._dirty_fds)
        paths = list(self._dirty_paths)
        dirs = list(self._dirty_dirs)
        self._dirty_fds.clear()
        self._dirty_paths.clear()
        self._dirty_dirs.clear()
        self._busy = frozenset(fds)
        target = self._written
        round_ = self._loop.run_in_executor(self._executor, self._sync, fds, paths, dirs)
        self._round = round_
        round_.add_done_callback(lambda done: self._finished(done, target))

    def _sync(self, fds: list[int], paths: list[str], dirs: list[str]) -> None:
        # Runs on the sync thread. Files before directories: an entry made durable
        # must point at data that is.
        fs = self._fs
        for fd in fds:
            fs.sync(fd)
        for path in paths:
            fs.sync_path(path)
        for path in dirs:
            fs.sync_path(path)

    def _finished(self, done: asyncio.Future[None], target: int) -> None:
        self._round = None
        self._busy = frozenset()
        error: OSError | None = None
        if done.cancelled():
            error = OSError("sync round cancelled")
        else:
            raised = done.exception()
            if isinstance(raised, OSError):
                error = raised
            elif raised is not None:
                # A bug, not a disk fault; still nothing written can be vouched for.
                logger.error("sync round failed unexpectedly", exc_info=raised)
                error = OSError(f"sync failed: {raised!r}")
        if error is not None and self.failure is None:
            self.failure = error
            self._on_failure(error)
        waiters = self._waiters
        if self.failure is not None:
            while waiters:
                _run(waiters.popleft()[1], self.failure)
        else:
            self._synced = target
            while waiters and waiters[0][0] <= target:
                _run(waiters.popleft()[1], None)
            if waiters:
                self._start()
        self._close_idle()


def _resolve(future: asyncio.Future[None], error: OSError | None) -> None:
    if future.done():  # the waiter was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _run(callback: Callback, error: OSError | None) -> None:
    try:
        callback(error)
    except Exception:
        # A bug in one store callback must not strand the callbacks queued behind it.
        logger.exception("storage commit callback failed")
