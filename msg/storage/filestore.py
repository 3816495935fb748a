"""The default store: per-queue and per-topic append-only logs of JSON lines.

Theory of operation
-------------------
Layout of the data directory::

    LOCK                                 flock: one broker per data directory
    queues/<encoded name>/meta.json      {"v":1,"kind":"queue","name":"<true name>"}
    queues/<encoded name>/<20 digits>.log   segments, oldest first
    topics/<encoded name>/meta.json, <20 digits>.log, cursors.log
    lost+found/                          directories whose meta.json was unreadable,
                                         and files with corrupt records, kept

Names are encoded by :mod:`msg.storage.filenames`; records are described in
:mod:`msg.storage.records`. A segment's number is the first position in it (topics)
or, for queues, a number no sequence number assigned before the segment was created
reaches, so numbers only grow and a restart never reuses a sequence number. Every
file operation goes through the :class:`~msg.storage.fs.FileSystem` passed as ``fs``
(the seam for fault injection). The delivery state lives in the shared
:class:`~msg.storage.index.Index`, as in the memory store; this module adds the log
that makes each change durable, and the recovery that rebuilds the index from it.

Writing. Every operation builds its records as bytes, does one write per file for
the whole call, and registers a callback with the :class:`~.commit.GroupCommit`.
Records are built a batch at a time (:func:`.records.pub_batch`, one ``Append`` at a
time; :func:`.records.seq_records`, one settle group at a time), and the index takes
an append as one :class:`~.index.Run`, so the per-message cost is a few C-level
passes, not a Python loop: about 1 µs per appended and per settled message.
The index changes take effect in that callback, once the write is durable under
the fsync policy: appended messages only then become claimable (until then they
are PENDING; topic reads stop at the last durable position), a settle only then
removes or requeues its message (meanwhile SETTLING, which ``release`` and
``reclaim`` leave alone). A write that fails with ENOSPC/EDQUOT is cut off and its
items fail with ``storage_full``; the store keeps going. Any other write error, or
any sync error, fails the items with ``storage_error`` and turns the store
read-only for good: it cannot vouch for what is on disk.

Free space (``min_free_bytes``, RabbitMQ's ``disk_free_limit``): publishes are
refused with ``storage_full`` while the file system has less than that free, before
it is actually full, so that consumers' acks, dead letters and compaction (which
writes before it deletes) still have room. The free space is read with one
``statvfs`` at most every :data:`FREE_CHECK_INTERVAL` (in :meth:`FileStore.writable`,
which the broker calls once per loop iteration), and between two reads the store
subtracts what it writes itself, per batch, so a burst cannot overshoot the mark by
more than one batch. Publishing resumes as soon as a read finds enough room again
(the operator freed space, or acks let compaction delete segments).

Fsync policies: ALWAYS waits for the group commit before any result; EVERYSEC
returns after the write and :meth:`FileStore.maintain` syncs once a second; NEVER
syncs only in :meth:`FileStore.close`. Whatever the policy, maintenance makes copies
durable before it deletes the originals (Redis fsyncs its AOF rewrite under
``appendfsync no`` too): otherwise a power loss could take messages acked hours ago,
not just the ones the kernel had not written back yet.

What is written: queues get ``pub`` records, ``ack``/``dead``/``req`` when
settled (a settle group's records go out in one write, and the group succeeds or
fails as a whole), ``con`` for auto_ack claims. A dead letter is written in two steps: its
copy in ``$dead.<queue>`` is durable before the ``dead`` record that removes it
from its queue, so a crash between them may duplicate it but never loses it.
Claims without auto_ack write nothing: in-flight state is volatile, and after a
restart every unsettled message is ready again (its attempt count is the one last
written: by a requeue or a compaction copy). Topics get ``pub`` records only;
durable cursors go to ``cursors.log``.

Segments and reclaiming space (in :meth:`FileStore.maintain`, never on the hot
path). A log writes to its newest segment and starts a new one once that reaches
``segment_bytes``. A queue segment counts its live messages (not yet acked,
consumed or dead-lettered); the *oldest* segment is deleted when its count is
zero. Only the oldest, because an ``ack`` in a later segment may refer to a message
in an older one: deleting from the middle could bring acked messages back at the
next replay. When the oldest segment is mostly dead (at most one live message in
:data:`COMPACT_LIVE_RATIO`), its live messages are copied (same id, sequence number
and attempt) to the newest segment, made durable, and the old file is deleted.
Replay keeps the newest copy of a sequence number, so a crash between copy and
delete is harmless. Topic retention drops whole oldest segments, while the rest
still meets every limit (count, bytes) or once all of a segment is older than
``max_age``; the granularity of retention is therefore one segment, and at least
the configured limit is kept.

Reading topics. Topic payloads stay on disk. Each segment keeps a sparse index
(:mod:`msg.storage.segments`); a read bisects to the segment and the mark, and
reads forward. An append places the marks for its whole batch by bisecting the
records' start offsets, exactly where recovery, record by record, puts them. Queue
payloads are held in memory (the index needs them to deliver).

Recovery (:meth:`FileStore.open`, on the storage thread; see :mod:`.logs`). Every
segment is read and checked (in bulk when it is intact, record by record when
not). A torn tail of a log's newest file is cut off with one WARNING; corrupt
records elsewhere are skipped with one ERROR each, and the records around them
survive. A file with corrupt records is never rewritten or deleted in place: it
goes to ``lost+found`` first (:mod:`.lostfound`). A torn or missing ``meta.json``
of a log that holds records is rebuilt from the directory's name (a crash during
the log's creation); one that holds none is removed (a creation cut short); any
other unreadable one moves its directory to ``lost+found``. The directories the
store creates are fsynced in their parents (:func:`.fs.make_durable_dirs`).
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import attrgetter
from typing import Final

from msg.errors import StorageError
from msg.persistence import (
    Append,
    Appended,
    Capabilities,
    Claim,
    Cursor,
    CursorCommit,
    Delivery,
    FsyncPolicy,
    Kind,
    Outcome,
    Reclaimed,
    Recovery,
    Retention,
    Settle,
    Settled,
    StoreFailure,
    StoreStats,
    TopicMessage,
    TopicRead,
)
from msg.storage import records
from msg.storage.commit import GroupCommit
from msg.storage.filenames import encode_name, segment_file_name
from msg.storage.files import FD_EXHAUSTED, LogFile, OpenFiles, default_limit
from msg.storage.fs import FileSystem, make_durable_dirs
from msg.storage.index import (
    DEAD_LETTER_PREFIX,
    Entry,
    Index,
    Offer,
    QueueFull,
    Run,
    State,
    check_columns,
    unknown_ids,
)
from msg.storage.logs import (
    CURSORS,
    Counts,
    Log,
    QueueLog,
    TopicLog,
    holds_records,
    rebuild_meta,
    recover_queue,
    recover_topic,
)
from msg.storage.lostfound import LOST_FOUND, copy_aside, move_aside
from msg.storage.segments import SPARSE_INDEX_BYTES, Segment, read_topic_segment
from msg.storage.thread import StorageThread

__all__ = ["COMPACT_LIVE_RATIO", "DEFAULT_SEGMENT_BYTES", "FREE_CHECK_INTERVAL", "FileStore"]

logger = logging.getLogger(__name__)

# 16 MiB: small enough that a drained queue gives its space back soon and a segment
# is read at start-up in a few milliseconds, large enough that a busy log rolls only
# every few seconds. (Kafka's 1 GiB suits few large logs; msg has many small ones.)
DEFAULT_SEGMENT_BYTES: Final = 16 * 1024 * 1024
# Compact the oldest queue segment when at most 1 in 10 of its messages is live:
# copying 10% of a segment to free all of it bounds the extra writes at about 11%.
COMPACT_LIVE_RATIO: Final = 10
# Rewrite cursors.log once it holds this many records and four times the live
# cursors: a few hundred KiB of replay at most, rewritten rarely.
CURSOR_COMPACT_RECORDS: Final = 4096
# ... or once it is this large and four times its size after the last rewrite: a
# record holds a cursor's acked ranges too, so a few records can be large (a
# subscriber holding every other message of a 65,535 prefetch: ~1 MB each).
CURSOR_COMPACT_BYTES: Final = 4 * 1024 * 1024
# EVERYSEC: Redis's appendfsync everysec interval.
EVERYSEC_INTERVAL: Final = 1.0
# Seconds between two reads of the free space (one statvfs each): ten a second is
# nothing next to the writes, and the store counts its own writes in between, so
# only space taken by others is noticed this late.
FREE_CHECK_INTERVAL: Final = 0.1

_QUEUES: Final = "queues"
_TOPICS: Final = "topics"
_LOST: Final = LOST_FOUND
_META: Final = "meta.json"
_LOCK: Final = "LOCK"
_TMP: Final = ".tmp"
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
_DEFAULT_RETENTION: Final = Retention()
_SETTLED: Final = Settled()
_MOVABLE: Final = frozenset({State.READY, State.IN_FLIGHT})
_SEGMENT_OF: Final = attrgetter("segment")

_CursorChange = tuple[int, str, Cursor | None, Cursor]
"""One item of a cursor commit: (its index, the cursor's name, before, after)."""


class _Write:
    """The records one append call writes to one log, and what they stand for."""

    __slots__ = (
        "count",
        "first",
        "items",
        "log",
        "offers",
        "parts",
        "payload_bytes",
        "runs",
        "segment",
        "sizes",
    )

    def __init__(self, log: QueueLog | TopicLog, segment: Segment, first: int) -> None:
        self.log = log
        self.segment = segment
        self.first = first
        """The first position (sequence number) this write gives out."""
        self.parts: list[bytes] = []
        """The records of the new messages, a batch of them per part."""
        self.count = 0
        """How many records the parts hold."""
        self.sizes: list[int] = []
        """Each record's length in bytes."""
        self.items: list[int] = []
        """Indexes of the call's items that went to this log."""
        self.runs: list[Run] = []
        """Queues: the runs staged (PENDING until the write is durable)."""
        self.offers: list[tuple[Offer, float]] = []
        """Topics: the offers with new messages, and their published_at."""
        self.payload_bytes = 0

    def add(self, batch: records.PubRecords) -> None:
        """Add records made by :func:`.records.pub_batch`."""
        self.parts.append(batch.data)
        self.sizes += batch.sizes
        self.count += len(batch.sizes)
        self.payload_bytes += batch.payload_bytes

    def undo(self) -> None:
        """Forget what was staged (the write failed, or was never made)."""
        log = self.log
        if isinstance(log, QueueLog):
            for run in reversed(self.runs):
                log.index.discard(run)
        else:
            for offer, _ in reversed(self.offers):
                log.index.discard(offer)


@dataclass(slots=True, eq=False)
class _Settling:
    """One settle group on its way to the log."""

    index: int
    log: QueueLog
    item: Settle
    entries: list[Entry]
    missing: frozenset[str]
    copy: tuple[QueueLog, Run] | None = None
    """Dead letters: the copies staged in the dead-letter queue."""
    failed: bool = False


class FileStore:
    """Queues and topics in append-only JSON-lines logs; see the module docstring."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = FsyncPolicy.ALWAYS,
        retention: Retention = _DEFAULT_RETENTION,
        max_queue_messages: int | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        min_free_bytes: int = 0,
        free_check_interval: float = FREE_CHECK_INTERVAL,
        max_open_files: int | None = None,
        fs: FileSystem | None = None,
    ) -> None:
        """A store in ``data_dir`` (created if missing); nothing is read until :meth:`open`.

        ``min_free_bytes``: refuse publishes while the file system has less free (0:
        never; see the module docstring). ``free_check_interval``: seconds between two
        reads of the free space. ``max_open_files``: log files kept open at most
        (None: a quarter of the soft RLIMIT_NOFILE, see :mod:`.files`). ``fs``: the
        file-system seam (tests inject faults).
        """
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, not {segment_bytes}")
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must not be negative, not {min_free_bytes}")
        if max_open_files is not None and max_open_files < 1:
            raise ValueError(f"max_open_files must be at least 1, not {max_open_files}")
        self._root = os.path.abspath(os.fspath(data_dir))
        self._policy = fsync
        self._retention = retention
        self._segment_bytes = segment_bytes
        self._fs = fs if fs is not None else FileSystem()
        self._files = OpenFiles(
            self._fs, default_limit() if max_open_files is None else max_open_files
        )
        self._index = Index(max_queue_messages)
        self._queues: dict[str, QueueLog] = {}
        self._topics: dict[str, TopicLog] = {}
        self._executor: StorageThread | None = None
        self._commit: GroupCommit | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None
        self._read_only: str | None = None
        self._full = False
        self._min_free = min_free_bytes
        self._free_interval = free_check_interval
        self._free_next = 0.0
        """When (time.monotonic) to read the free space again."""
        self._free = 0
        """Free bytes at the last read, less what the store wrote since."""
        self._low = False
        """Below min_free_bytes: publishes are refused."""
        self._closed = False
        self._last_sync: float | None = None
        self._maintaining = False

    # -- lifecycle -------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(durable=True)

    @property
    def data_dir(self) -> str:
        return self._root

    async def open(self) -> Recovery:
        if self._executor is not None or self._closed:
            raise StorageError("the store was already opened")
        loop = asyncio.get_running_loop()
        # One thread: syncs must not overlap (a later round must not finish first),
        # and recovery runs there too so the event loop stays responsive.
        self._executor = StorageThread()
        started = time.perf_counter()
        try:
            recovery = await loop.run_in_executor(self._executor, self._recover)
        except BaseException:
            # Also when cancelled: let the recovery thread finish before closing its files.
            self._executor.shutdown(wait=True)
            self._release_files()
            self._closed = True
            raise
        self._loop = loop
        self._commit = GroupCommit(
            self._fs,
            self._policy,
            loop,
            self._executor,
            self._sync_failed,
            on_exhausted=self._files.shed,
        )
        self._files.commit = self._commit
        if self._min_free:
            self._check_free(time.monotonic())
        logger.info(
            "opened %s: %d queues (%d ready messages), %d topics in %.3f s; at most %d "
            "log files open",
            self._root,
            len(recovery.queues),
            sum(recovery.queues.values()),
            len(recovery.topics),
            time.perf_counter() - started,
            self._files.limit,
        )
        return recovery

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        commit = self._commit
        if commit is not None:
            if commit.failure is None:
                try:
                    await commit.sync_now()
                except OSError:
                    # Already logged and made the store read-only (see _sync_failed).
                    logger.debug("final sync of %s failed", self._root)
            await commit.drain()
        self._release_files()
        if commit is not None:
            commit.close_all()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _release_files(self) -> None:
        # Every log file's descriptor is in the cache, or deferred in the group commit.
        self._files.commit = None
        self._files.close_all()
        if self._lock_fd is not None:
            self._fs.unlock(self._lock_fd)
            self._lock_fd = None

    def _ready(self) -> GroupCommit:
        commit = self._commit
        if commit is None or self._closed:
            raise StorageError("the store is not open")
        return commit

    def writable(self) -> StoreFailure | None:
        if self._read_only is not None:
            return StoreFailure.STORAGE_ERROR
        if self._min_free:
            now = time.monotonic()
            if now >= self._free_next:
                self._check_free(now)
            if self._low:
                return StoreFailure.STORAGE_FULL
        return None

    def _check_free(self, now: float) -> None:
        """Read the free space (one statvfs) and note whether it is below the mark."""
        self._free_next = now + self._free_interval
        try:
            self._free = self._fs.free_bytes(self._root)
        except OSError as exc:
            # Not knowing is no reason to refuse: writes still report a full disk.
            logger.debug("cannot read the free space of %s: %s", self._root, exc)
            return
        self._set_low(self._free < self._min_free)

    def _set_low(self, low: bool) -> None:
        if low is self._low:
            return
        self._low = low
        if low:
            logger.error(
                "free space on %s is %d bytes, below min_free_bytes (%d): publishes are "
                "refused until space is freed",
                self._root,
                max(self._free, 0),
                self._min_free,
            )
        else:
            logger.info(
                "free space on %s is %d bytes again: publishes are accepted", self._root, self._free
            )

    def _set_read_only(self, why: str) -> None:
        if self._read_only is None:
            self._read_only = why
            logger.error("storage error in %s: %s; the store is now read-only", self._root, why)

    def _sync_failed(self, error: OSError) -> None:
        self._set_read_only(f"fsync failed: {error}")

    # -- writing ---------------------------------------------------------------------

    def _write(self, segment: Segment | LogFile, data: bytes) -> StoreFailure | None:
        """Append ``data`` to a segment or log file: None, or why it failed (logged)."""
        if self._read_only is not None:
            return StoreFailure.STORAGE_ERROR
        file = segment if isinstance(segment, LogFile) else segment.file
        assert file is not None, "only the active segment is written"
        try:
            fd = file.append(data)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS and not file.damaged:
                self._disk_full(f"cannot write to {file.path}: {exc.strerror}")
                return StoreFailure.STORAGE_FULL
            if exc.errno in FD_EXHAUSTED:
                # The file could not be opened: nothing written, so nothing to vouch
                # for; these items fail and the store stays writable (see .files).
                return StoreFailure.STORAGE_ERROR
            self._set_read_only(f"write to {file.path} failed: {exc}")
            return StoreFailure.STORAGE_ERROR
        if self._full:
            self._full = False
            logger.info("storage has room again: wrote to %s", file.path)
        if self._min_free:
            # One subtraction per batch: a burst is noticed before the next statvfs.
            self._free -= len(data)
            if self._free < self._min_free:
                self._set_low(True)
        if isinstance(segment, Segment):
            segment.size = file.size
        self._ready().wrote(fd)
        return None

    def _active(self, log: Log, next_number: int) -> Segment:
        """The segment to write to, after rolling to a new one if this one is full."""
        segment = log.active
        if segment.size < self._segment_bytes:
            return segment
        # If rolling fails, keep writing to the full segment: it only grows past the
        # target size.
        return self._roll(log, next_number) or segment

    def _roll(self, log: Log, next_number: int) -> Segment | None:
        """Start a new active segment; None if its file cannot be created (logged)."""
        segment = log.active
        number = max(next_number, segment.number + 1)
        path = os.path.join(log.dir, segment_file_name(number))
        try:
            file = LogFile.create(self._files, path)
        except OSError as exc:
            logger.error("cannot start segment %s: %s", path, exc)
            return None
        commit = self._ready()
        commit.changed_dir(log.dir)
        old = segment.file
        if old is not None:
            segment.size = old.size
            self._files.release(old)
            segment.file = None
        fresh = Segment(number, path, size=file.size, file=file)
        log.add(fresh)
        return fresh

    def _create_log(self, kind: Kind, name: str) -> QueueLog | TopicLog:
        """Make the directory, meta.json and first segment of a new queue or topic.

        Out of descriptors (EMFILE/ENFILE): shed idle files and try once more (every
        step can be redone); then the OSError goes to the caller, which fails the
        items without turning the store read-only (see :mod:`.files`).
        """
        try:
            return self._make_log(kind, name)
        except OSError as exc:
            if exc.errno not in FD_EXHAUSTED:
                raise
            self._files.shed()
            return self._make_log(kind, name)

    def _make_log(self, kind: Kind, name: str) -> QueueLog | TopicLog:
        fs = self._fs
        commit = self._ready()
        base = os.path.join(self._root, _QUEUES if kind is Kind.QUEUE else _TOPICS)
        directory = os.path.join(base, encode_name(name))
        fs.makedirs(directory)
        meta = os.path.join(directory, _META)
        fs.write_file(meta + _TMP, records.meta_bytes(kind.value, name))
        fs.rename(meta + _TMP, meta)
        path = os.path.join(directory, segment_file_name(0))
        file = LogFile.create(self._files, path)
        if file.size:
            # Left by an earlier attempt that failed half-way.
            fs.truncate(file.descriptor(), 0)
            file.size = 0
        commit.created(meta)
        commit.changed_dir(directory)
        commit.changed_dir(base)
        segments = [Segment(0, path, file=file)]
        if kind is Kind.QUEUE:
            queue = QueueLog(name, directory, segments, self._index.queue(name))
            self._queues[name] = queue
            return queue
        topic = TopicLog(name, directory, segments, self._index.topic(name))
        self._topics[name] = topic
        return topic

    def _queue_log(self, name: str) -> QueueLog:
        log = self._queues.get(name)
        if log is None:
            created = self._create_log(Kind.QUEUE, name)
            assert isinstance(created, QueueLog)
            log = created
        return log

    def _topic_log(self, name: str) -> TopicLog:
        log = self._topics.get(name)
        if log is None:
            created = self._create_log(Kind.TOPIC, name)
            assert isinstance(created, TopicLog)
            log = created
        return log

    def _disk_full(self, why: str) -> None:
        """A write found no space: log it once, and refuse publishes until a read of the
        free space finds room (with a watermark; else each write tries again)."""
        if not self._full:
            self._full = True
            logger.error("storage full: %s", why)
        if self._min_free:
            self._free = 0
            self._set_low(True)

    def _create_failed(self, name: str, exc: OSError) -> Appended:
        if exc.errno in _FULL_ERRNOS:
            self._disk_full(f"cannot create the log of {name!r}: {exc.strerror}")
            return Appended(failure=StoreFailure.STORAGE_FULL, detail="no space to create the log")
        if exc.errno in FD_EXHAUSTED:
            # Transient (logged by the file cache); the store stays writable.
            return Appended(
                failure=StoreFailure.STORAGE_ERROR,
                detail=f"cannot create the log now: {exc.strerror}",
            )
        self._set_read_only(f"cannot create the log of {name!r}: {exc}")
        return Appended(failure=StoreFailure.STORAGE_ERROR, detail=f"cannot create the log: {exc}")

    # -- append ----------------------------------------------------------------------

    async def append(self, items: Sequence[Append]) -> list[Appended]:
        commit = self._ready()
        refused = self.writable()
        if refused is not None:
            detail = (
                self._read_only
                if refused is StoreFailure.STORAGE_ERROR
                else f"less than min_free_bytes ({self._min_free}) free on the storage device"
            )
            return [Appended(failure=refused, detail=detail or "")] * len(items)
        check_columns(items)
        results: list[Appended] = [_PLACEHOLDER] * len(items)
        writes: dict[tuple[Kind, str], _Write] = {}
        try:
            self._stage(items, results, writes)
        except BaseException:
            # A bug, or an id no JSON encoder takes: nothing may stay staged.
            for write in writes.values():
                write.undo()
            raise
        written = [w for w in writes.values() if w.parts and self._write_batch(w, results)]
        future: asyncio.Future[list[Appended]] = self._running_loop().create_future()

        def finish(error: OSError | None) -> None:
            if error is None:
                for write in written:
                    if isinstance(write.log, QueueLog):
                        commit_run = write.log.index.commit
                        for run in write.runs:
                            commit_run(run)
                    else:
                        topic = write.log.index
                        topic.end = max(topic.end, write.first + write.count)
                        topic.bytes += write.payload_bytes
            else:
                for write in written:
                    if isinstance(write.log, QueueLog):
                        queue = write.log.index
                        for run in reversed(write.runs):
                            queue.discard(run)
                        write.segment.live -= write.count
                failed = Appended(
                    failure=StoreFailure.STORAGE_ERROR, detail=f"sync failed: {error}"
                )
                for i, result in enumerate(results):
                    if result.failure is not StoreFailure.STORAGE_ERROR:
                        results[i] = failed
            _set_result(future, results)

        commit.after_durable(finish)
        return await future

    def _stage(
        self,
        items: Sequence[Append],
        results: list[Appended],
        writes: dict[tuple[Kind, str], _Write],
    ) -> None:
        """Give the new messages positions and build their records, one write per log."""
        for i, item in enumerate(items):
            key = (item.kind, item.name)
            write = writes.get(key)
            if write is None:
                try:
                    log = (
                        self._queue_log(item.name)
                        if item.kind is Kind.QUEUE
                        else self._topic_log(item.name)
                    )
                except OSError as exc:
                    results[i] = self._create_failed(item.name, exc)
                    continue
                first = log.index.next_seq if isinstance(log, QueueLog) else log.index.next_position
                write = writes[key] = _Write(log, self._active(log, first), first)
            write.items.append(i)
            if isinstance(write.log, QueueLog):
                offer, run = write.log.index.offer(
                    item.message_ids,
                    item.payloads,
                    item.published_at,
                    write.segment.number,
                    fresh=item.fresh,
                )
                if run is not None:
                    write.runs.append(run)
                    write.add(records.pub_batch(run.seqs, run.ids, run.payloads, item.published_at))
                if offer.full:
                    results[i] = Appended(
                        offer.positions, StoreFailure.QUEUE_FULL, _full(item.name)
                    )
                    continue
            else:
                offer = write.log.index.offer(item.message_ids, item.payloads, fresh=item.fresh)
                if offer.seqs:
                    write.offers.append((offer, item.published_at))
                    write.add(
                        records.pub_batch(
                            offer.seqs, offer.new_ids, offer.new_payloads, item.published_at
                        )
                    )
            results[i] = Appended(offer.positions)

    def _write_batch(self, write: _Write, results: list[Appended]) -> bool:
        """Write one log's records of an append call; on failure undo and fail its items."""
        segment = write.segment
        offset = segment.size
        data = b"".join(write.parts)
        failure = self._write(segment, data)
        count = write.count
        log = write.log
        if failure is None:
            if isinstance(log, QueueLog):
                segment.live += count
                segment.pubs += count
            else:
                self._index_topic_records(log, segment, write, offset)
            return True
        write.undo()
        detail = _write_detail(failure, self._read_only is not None)
        for i in write.items:
            kept = _stored_before(results[i].positions, write.first)
            results[i] = Appended(kept, failure, detail)
        return False

    def _index_topic_records(
        self, log: TopicLog, segment: Segment, write: _Write, offset: int
    ) -> None:
        """Counts, newest timestamp and sparse index marks for records just written.

        A mark goes on the first record that starts at least SPARSE_INDEX_BYTES after
        the previous mark: found by bisecting the batch's record start offsets, so the
        cost is per mark, not per record.
        """
        starts = list(accumulate(write.sizes, initial=0))
        total = starts.pop()
        # Offset (relative to this batch) of the last mark; unmarked bytes lie after it.
        last = -segment.unmarked
        position = write.first
        marks = segment.marks
        offsets = segment.mark_offsets
        k = bisect.bisect_left(starts, last + SPARSE_INDEX_BYTES)
        while k < len(starts):
            last = starts[k]
            marks.append(position + k)
            offsets.append(offset + last)
            k = bisect.bisect_left(starts, last + SPARSE_INDEX_BYTES, k + 1)
        segment.unmarked = total - last
        count = write.count
        payload_bytes = write.payload_bytes
        for _, published_at in write.offers:
            segment.newest = max(segment.newest, published_at)
        segment.count += count
        segment.bytes += payload_bytes
        log.count += count
        log.bytes += payload_bytes

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    # -- claim, release, reclaim -----------------------------------------------------

    async def claim(self, claims: Sequence[Claim]) -> list[list[Delivery]]:
        self._ready()
        index = self._index
        out: list[list[Delivery]] = []
        consumed: dict[str, list[tuple[int, int]]] = {}
        for claim in claims:
            if claim.auto_ack:
                pairs = consumed.setdefault(claim.queue, [])
                out.append(index.claim(claim, pairs))
            else:
                out.append(index.claim(claim))
        for name, pairs in consumed.items():
            if pairs:
                self._write_consumed(self._queues[name], pairs)
        return out

    def _write_consumed(self, log: QueueLog, pairs: list[tuple[int, int]]) -> None:
        """Log auto_ack deliveries; their durability is not waited for (at-most-once)."""
        by_number = log.by_number
        for number, count in Counter(segment for _, segment in pairs).items():
            by_number[number].live -= count
        if self._read_only is not None:
            return
        segment = self._active(log, log.index.next_seq)
        self._write(segment, b"".join(records.seq_records(b"con", [seq for seq, _ in pairs])))

    async def release(self, queue: str, consumer: str) -> int:
        self._ready()
        return self._index.release(queue, consumer)

    async def reclaim(self, now: float) -> list[Reclaimed]:
        self._ready()
        return self._index.reclaim(now)

    # -- settle ----------------------------------------------------------------------

    async def settle(self, items: Sequence[Settle]) -> list[Settled]:
        commit = self._ready()
        results: list[Settled] = [_SETTLED] * len(items)
        work: list[_Settling] = []
        for i, item in enumerate(items):
            log = self._queues.get(item.queue)
            if log is None:
                results[i] = Settled(frozenset(item.message_ids))
                continue
            begun, unknown = log.index.begin_settle(item.consumer, item.message_ids)
            missing = unknown_ids(unknown, begun)
            if not begun:
                if missing:
                    results[i] = Settled(missing)
                continue
            if self._read_only is not None:
                self._index.abort_settle(log.index, begun)
                results[i] = Settled(missing, StoreFailure.STORAGE_ERROR)
                continue
            work.append(_Settling(i, log, item, begun, missing))
            if missing:
                results[i] = Settled(missing)
        if not work:
            return results
        future: asyncio.Future[list[Settled]] = self._running_loop().create_future()
        dead = [w for w in work if w.item.outcome is Outcome.DEAD]
        if dead:
            # Two steps: the copy in the dead-letter queue is durable before the
            # record that removes the message here, so a crash between them can
            # duplicate a dead letter but never lose it.
            self._copy_dead_letters(dead, results)
            commit.after_durable(lambda error: self._settle_records(work, results, future, error))
        else:
            self._settle_records(work, results, future, None)
        return await future

    def _copy_dead_letters(self, dead: list[_Settling], results: list[Settled]) -> None:
        writes: dict[str, tuple[QueueLog, Segment, list[bytes], list[_Settling]]] = {}
        for w in dead:
            name = DEAD_LETTER_PREFIX + w.log.name
            write = writes.get(name)
            if write is None:
                try:
                    log = self._queue_log(name)
                except OSError as exc:
                    failure = self._create_failed(name, exc).failure
                    assert failure is not None
                    self._fail_settles([w], results, failure)
                    continue
                write = writes[name] = (log, self._active(log, log.index.next_seq), [], [])
            log, segment, parts, members = write
            try:
                run = log.index.stage_dead_letters(w.entries, w.item.reason, segment.number)
            except QueueFull:
                self._fail_settles([w], results, StoreFailure.QUEUE_FULL)
                continue
            if run is None:
                continue  # all already there (a duplicate publish rejected twice)
            for seq, message_id, payload, published_at, _, reason in run.rest():
                parts.extend(records.pub_parts(seq, message_id, published_at, payload, 0, reason))
            w.copy = (log, run)
            members.append(w)
        for log, segment, parts, members in writes.values():
            if not members:
                continue
            failure = self._write(segment, b"".join(parts))
            count = sum(len(w.copy[1].seqs) for w in members if w.copy is not None)
            if failure is None:
                segment.live += count
                segment.pubs += count
                continue
            for w in reversed(members):
                if w.copy is not None:
                    log.index.discard(w.copy[1])
                    w.copy = None
            self._fail_settles(members, results, failure)

    def _settle_records(
        self,
        work: list[_Settling],
        results: list[Settled],
        future: asyncio.Future[list[Settled]],
        error: OSError | None,
    ) -> None:
        """Step two of a settle: log the outcomes in the queues' own logs."""
        live = [w for w in work if not w.failed]
        if error is not None:
            self._fail_settles(live, results, StoreFailure.STORAGE_ERROR)
            _set_settled(future, results)
            return
        by_log: dict[str, tuple[QueueLog, list[bytes], list[_Settling]]] = {}
        for w in live:
            group = by_log.get(w.log.name)
            if group is None:
                group = by_log[w.log.name] = (w.log, [], [])
            outcome = w.item.outcome
            if outcome is Outcome.REQUEUE:
                group[1].extend(
                    records.requeue_records([(e.seq, e.delivery.attempt) for e in w.entries])
                )
            else:
                op = b"ack" if outcome is Outcome.ACK else b"dead"
                group[1].extend(records.seq_records(op, [e.seq for e in w.entries]))
            group[2].append(w)
        done: list[_Settling] = []
        for log, parts, members in by_log.values():
            if self._read_only is not None:
                self._fail_settles(members, results, StoreFailure.STORAGE_ERROR)
                continue
            failure = self._write(self._active(log, log.index.next_seq), b"".join(parts))
            if failure is None:
                done.extend(members)
            else:
                self._fail_settles(members, results, failure)
        if not done:
            _set_settled(future, results)
            return
        self._ready().after_durable(lambda error: self._settle_done(done, results, future, error))

    def _settle_done(
        self,
        done: list[_Settling],
        results: list[Settled],
        future: asyncio.Future[list[Settled]],
        error: OSError | None,
    ) -> None:
        if error is not None:
            self._fail_settles(done, results, StoreFailure.STORAGE_ERROR)
        else:
            for w in done:
                outcome = w.item.outcome
                w.log.index.finish_settle(w.item.consumer, w.entries, outcome)
                if outcome is not Outcome.REQUEUE:
                    by_number = w.log.by_number
                    for number, count in Counter(map(_SEGMENT_OF, w.entries)).items():
                        by_number[number].live -= count
                if w.copy is not None:
                    copy_log, run = w.copy
                    copy_log.index.commit(run)
        _set_settled(future, results)

    def _fail_settles(
        self, work: list[_Settling], results: list[Settled], failure: StoreFailure
    ) -> None:
        for w in work:
            w.failed = True
            self._index.abort_settle(w.log.index, w.entries)
            if w.copy is not None:
                copy_log, run = w.copy
                copy_log.by_number[run.segment].live -= len(run.seqs)
                copy_log.index.discard(run)
                w.copy = None
            results[w.index] = Settled(w.missing, failure)

    # -- topics: read and cursors ----------------------------------------------------

    async def read(self, topic: str, position: int, limit: int) -> TopicRead:
        self._ready()
        log = self._topics.get(topic)
        if log is None:
            return TopicRead((), 0, 0)
        index = log.index
        first, end = index.first, index.end
        start = max(position, first)
        out: list[TopicMessage] = []
        if limit > 0 and start < end:
            at = max(bisect.bisect_right(log.numbers, start) - 1, 0)
            try:
                for segment in log.segments[at:]:
                    read_topic_segment(self._files, segment, start, end, limit, out)
                    if len(out) >= limit or segment.number >= end:
                        break
            except OSError as exc:
                logger.error("reading topic %r failed: %s", topic, exc)
                raise StorageError(f"cannot read topic {topic!r}: {exc}") from exc
        return TopicRead(tuple(out), first, end)

    def _write_cursor_records(self, log: TopicLog, data: bytes, count: int) -> StoreFailure | None:
        if self._read_only is not None:
            return StoreFailure.STORAGE_ERROR
        if log.cursors is None:
            path = os.path.join(log.dir, CURSORS)
            try:
                log.cursors = LogFile.create(self._files, path)
            except OSError as exc:
                full = exc.errno in _FULL_ERRNOS
                if exc.errno not in FD_EXHAUSTED:  # that one is transient, logged by the cache
                    logger.error("cannot create %s: %s", path, exc)
                    if not full:
                        self._set_read_only(f"cannot create {path}: {exc}")
                return StoreFailure.STORAGE_FULL if full else StoreFailure.STORAGE_ERROR
            self._ready().changed_dir(log.dir)
        failure = self._write(log.cursors, data)
        if failure is None:
            log.cursor_records += count
            log.cursor_version += 1
        return failure

    async def _durable(self) -> None:
        try:
            await self._ready().durable()
        except OSError as exc:
            raise StorageError(f"storage failed: {exc}") from exc

    async def open_cursor(self, topic: str, name: str) -> Cursor:
        self._ready()
        try:
            log = self._topic_log(topic)
        except OSError as exc:
            raise StorageError(f"cannot create the log of topic {topic!r}: {exc}") from exc
        cursors = log.index.cursors
        cursor = cursors.get(name)
        if cursor is not None:
            return cursor
        cursor = cursors[name] = Cursor(log.index.end)
        failure = self._write_cursor_records(log, records.cursor_record(name, cursor.position), 1)
        if failure is not None:
            del cursors[name]
            raise StorageError(f"cannot store cursor {name!r} of topic {topic!r}: {failure}")
        await self._durable()
        return cursor

    async def commit_cursors(self, items: Sequence[CursorCommit]) -> list[StoreFailure | None]:
        commit = self._ready()
        results: list[StoreFailure | None] = [None] * len(items)
        groups: dict[str, tuple[TopicLog, list[bytes], list[_CursorChange]]] = {}
        for i, item in enumerate(items):
            group = groups.get(item.topic)
            if group is None:
                try:
                    log = self._topic_log(item.topic)
                except OSError as exc:
                    results[i] = self._create_failed(item.topic, exc).failure
                    continue
                group = groups[item.topic] = (log, [], [])
            cursors = group[0].index.cursors
            # One record per commit, with the cursor's whole state (floor and acked
            # ranges): replay and compaction need only each cursor's last record.
            group[1].append(records.cursor_record(item.name, item.position, item.acked))
            after = Cursor(item.position, item.acked)
            group[2].append((i, item.name, cursors.get(item.name), after))
            cursors[item.name] = after
        written: list[tuple[TopicLog, list[_CursorChange]]] = []
        for log, parts, changes in groups.values():
            failure = self._write_cursor_records(log, b"".join(parts), len(parts))
            if failure is None:
                written.append((log, changes))
                continue
            _undo_cursors(log, changes)
            for i, *_ in changes:
                results[i] = failure
        future: asyncio.Future[list[StoreFailure | None]] = self._running_loop().create_future()

        def finish(error: OSError | None) -> None:
            if error is not None:
                for log, changes in written:
                    _undo_cursors(log, changes)
                    for i, *_ in changes:
                        results[i] = StoreFailure.STORAGE_ERROR
            if not future.done():
                future.set_result(results)

        commit.after_durable(finish)
        return await future

    async def delete_cursor(self, topic: str, name: str) -> bool:
        self._ready()
        log = self._topics.get(topic)
        if log is None or name not in log.index.cursors:
            return False
        cursor = log.index.cursors.pop(name)
        failure = self._write_cursor_records(log, records.cursor_delete_record(name), 1)
        if failure is not None:
            log.index.cursors.setdefault(name, cursor)
            raise StorageError(f"cannot delete cursor {name!r} of topic {topic!r}: {failure}")
        await self._durable()
        return True

    # -- stats and maintenance -------------------------------------------------------

    async def stats(self) -> StoreStats:
        self._ready()
        index = self._index
        return StoreStats(
            queues=index.queue_stats(), topics=index.topic_stats(), read_only=self.writable()
        )

    async def maintain(self, now: float) -> None:
        """Timed fsync (EVERYSEC), topic retention, queue segment deletion and compaction.

        ``now`` is wall-clock time (the clock of ``published_at``), for ``max_age``.
        """
        commit = self._ready()
        if self._maintaining:
            # The previous call is still waiting for a sync; two compactions of one
            # segment must not interleave.
            return
        self._maintaining = True
        try:
            await self._maintain(commit, now)
        finally:
            self._maintaining = False

    async def _maintain(self, commit: GroupCommit, now: float) -> None:
        if (
            self._policy is FsyncPolicy.EVERYSEC
            and commit.dirty
            and (self._last_sync is None or now - self._last_sync >= EVERYSEC_INTERVAL)
        ):
            self._last_sync = now
            await self._sync_quietly()
        if self._read_only is not None:
            return
        self._apply_retention(now)
        for log in list(self._queues.values()):
            if self._read_only is not None or self._closed:
                return
            await self._collect_queue(log)
        for topic in list(self._topics.values()):
            if self._read_only is not None or self._closed:
                return
            await self._compact_cursors(topic)

    async def _sync_quietly(self) -> bool:
        """Sync now whatever the policy; False if it failed (logged, store read-only)."""
        try:
            await self._ready().sync_now()
        except OSError:
            return False
        return True

    async def _sync_before_delete(self) -> bool:
        """Make copies durable before deleting originals, whatever the policy.

        Once a compaction per segment: rare, and off the hot path.
        """
        return await self._sync_quietly()

    def _apply_retention(self, now: float) -> None:
        retention = self._retention
        cutoff = None if retention.max_age is None else now - retention.max_age
        for log in self._topics.values():
            index = log.index
            while True:
                segment = log.segments[0]
                last = len(log.segments) == 1
                if segment.count == 0:
                    if last or not self._drop_segment(log):
                        break
                    continue
                # Never drop a message whose append is still pending.
                if (index.next_position if last else log.numbers[1]) > index.end:
                    break
                if not (
                    (
                        retention.max_messages is not None
                        and log.count - segment.count >= retention.max_messages
                    )
                    or (
                        retention.max_bytes is not None
                        and log.bytes - segment.bytes >= retention.max_bytes
                    )
                    or (cutoff is not None and segment.newest < cutoff)
                ):
                    break
                if last and self._roll(log, index.next_position) is None:
                    break  # try again next time
                log.count -= segment.count
                log.bytes -= segment.bytes
                index.bytes -= segment.bytes
                if not self._drop_segment(log):
                    break
                index.first = min(log.numbers[0], index.end)

    def _drop_segment(self, log: Log) -> bool:
        """Delete the oldest segment of ``log``; False if that failed (logged).

        A segment with corrupt records is moved to lost+found instead: its bad bytes
        are evidence, kept until an operator looks (see :mod:`.lostfound`).
        """
        segment = log.segments[0]
        commit = self._ready()
        try:
            if segment.corrupt:
                kept, changed = move_aside(self._fs, self._root, segment.path)
                for directory in changed:
                    commit.changed_dir(directory)
                logger.warning("segment %s had corrupt records: kept it as %s", segment.path, kept)
            else:
                self._fs.remove(segment.path)
        except FileNotFoundError:
            logger.warning("segment %s was already gone", segment.path)
        except OSError as exc:
            logger.error("cannot delete segment %s: %s", segment.path, exc)
            return False
        if segment.file is not None:
            self._files.release(segment.file)
            segment.file = None
        log.drop_oldest()
        commit.changed_dir(log.dir)
        return True

    async def _collect_queue(self, log: QueueLog) -> None:
        segments = log.segments
        while len(segments) > 1 and segments[0].live == 0:
            if not self._drop_segment(log):
                return
        if len(segments) < 2:
            return
        oldest = segments[0]
        if oldest.live * COMPACT_LIVE_RATIO > oldest.pubs:
            return
        number = oldest.number
        queue = log.index
        if queue.pending_in(number):
            return  # an append to it is not durable yet: next time
        moving: list[Entry] = []
        for entry in queue.entries.values():
            if entry.segment == number:
                if entry.state not in _MOVABLE:
                    return  # a settle is in progress: next time
                moving.append(entry)
        # Every message in the oldest segment has a sequence number below the next
        # segment's number, and runs are in sequence order.
        below = segments[1].number
        runs: list[Run] = []
        for run in queue.runs:
            if run.seqs[run.head] >= below:
                break
            if run.segment == number:
                runs.append(run)
        found = len(moving) + sum(len(run) for run in runs)
        if found != oldest.live:
            logger.error(
                "queue %r: segment %s counts %d live messages, found %d; not compacting",
                log.name,
                oldest.path,
                oldest.live,
                found,
            )
            return
        copies = [
            (e.seq, d.message_id, d.published_at, d.payload, d.attempt, d.reason)
            for e in moving
            for d in (e.delivery,)
        ]
        for run in runs:
            copies.extend(
                (seq, message_id, published_at, payload, attempt, reason)
                for seq, message_id, payload, published_at, attempt, reason in run.rest()
            )
        copies.sort()
        logger.debug(
            "compacting %s: copying %d live messages of %d", oldest.path, found, oldest.pubs
        )
        active = self._active(log, queue.next_seq)
        parts: list[bytes] = []
        for copy in copies:
            parts.extend(records.pub_parts(*copy))
        if self._write(active, b"".join(parts)) is not None:
            return
        for entry in moving:
            entry.segment = active.number
        for run in runs:
            run.segment = active.number
        active.live += found
        active.pubs += found
        oldest.live = 0
        if not await self._sync_before_delete() or self._closed:
            return
        if log.segments and log.segments[0] is oldest and oldest.live == 0:
            self._drop_segment(log)

    async def _compact_cursors(self, log: TopicLog) -> None:
        cursors = log.index.cursors
        if log.cursors is None:
            return
        size = log.cursors.size
        if log.cursor_records <= max(CURSOR_COMPACT_RECORDS, 4 * len(cursors)) and (
            size <= max(CURSOR_COMPACT_BYTES, 4 * log.cursor_live_bytes)
        ):
            return
        fs = self._fs
        path = os.path.join(log.dir, CURSORS)
        if log.cursors_corrupt:
            # The rewrite drops the corrupt records: keep the file as it is first (on
            # the storage thread: a copy and its fsyncs).
            try:
                kept = await self._running_loop().run_in_executor(
                    self._executor, copy_aside, fs, self._root, path
                )
            except OSError as exc:
                logger.error("cannot keep %s aside, so not compacting it: %s", path, exc)
                return
            logger.warning("%s had corrupt records: kept it as %s", path, kept)
        version = log.cursor_version
        # The acked ranges are copied with each floor: a rewrite must not bring back
        # messages the subscriber acked out of order.
        data = b"".join(
            [records.cursor_record(name, c.position, c.acked) for name, c in cursors.items()]
        )
        try:
            fs.write_file(path + _TMP, data)
        except OSError as exc:
            logger.error("cannot compact %s: %s", path, exc)
            return
        self._ready().created(path + _TMP)
        if not await self._sync_before_delete():
            return
        if log.cursor_version != version or self._closed or log.cursors is None:
            # Cursors moved meanwhile; the copy is stale. Try again next time.
            _remove_quietly(fs, path + _TMP)
            return
        try:
            fs.rename(path + _TMP, path)
        except OSError as exc:
            self._set_read_only(f"cannot replace {path}: {exc}")
            return
        # The old descriptor is the replaced file's: let it go (once synced). The new
        # file is opened when next written.
        self._files.release(log.cursors)
        self._ready().changed_dir(log.dir)
        log.cursors = LogFile(self._files, path, len(data))
        log.cursor_records = len(cursors)
        log.cursor_live_bytes = len(data)
        log.cursors_corrupt = False

    # -- recovery --------------------------------------------------------------------

    def _recover(self) -> Recovery:
        """Rebuild the index from the data directory (runs on the storage thread)."""
        fs = self._fs
        try:
            make_durable_dirs(fs, self._root)
            self._lock_fd = fs.lock(os.path.join(self._root, _LOCK))
            counts = Counts()
            for kind, sub in ((Kind.QUEUE, _QUEUES), (Kind.TOPIC, _TOPICS)):
                base = os.path.join(self._root, sub)
                make_durable_dirs(fs, base)
                for entry in sorted(fs.listdir(base)):
                    directory = os.path.join(base, entry)
                    if not fs.is_dir(directory):
                        continue
                    name = self._read_meta(kind, directory, entry)
                    if name is None:
                        continue
                    if kind is Kind.QUEUE:
                        queue = self._index.queue(name)
                        self._queues[name] = recover_queue(
                            fs, self._files, self._root, name, directory, queue, counts
                        )
                    else:
                        topic = self._index.topic(name)
                        self._topics[name] = recover_topic(
                            fs, self._files, self._root, name, directory, topic, counts
                        )
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"cannot open the data directory {self._root}: {exc}") from exc
        return Recovery(
            queues={name: log.index.ready for name, log in self._queues.items()},
            topics={name: log.index.end for name, log in self._topics.items()},
            torn_records=counts.torn,
            corrupt_records=counts.corrupt,
        )

    def _read_meta(self, kind: Kind, directory: str, entry: str) -> str | None:
        """The true name of a log directory, or None after moving a bad one aside."""
        fs = self._fs
        try:
            found_kind, name = records.parse_meta(fs.read_file(os.path.join(directory, _META)))
            if found_kind != kind.value:
                raise ValueError(f"kind {found_kind!r} in the {kind.value} directory")
            if encode_name(name) != entry:
                raise ValueError(f"name {name!r} does not belong in this directory")
        except (OSError, ValueError) as exc:
            rebuilt = (
                rebuild_meta(fs, self._root, kind.value, directory)
                if holds_records(fs, directory)
                else None
            )
            if rebuilt is None:
                self._set_aside(kind, directory, entry, str(exc))
                return None
            logger.warning(
                "rebuilt the unreadable meta.json of %s %r in %s (%s)",
                kind.value,
                rebuilt,
                directory,
                exc,
            )
            name = rebuilt
        for file_name in fs.listdir(directory):
            if file_name.endswith(_TMP):
                # Half-done meta.json or cursors.log rewrite; the original is intact.
                fs.remove(os.path.join(directory, file_name))
        return name

    def _set_aside(self, kind: Kind, directory: str, entry: str, why: str) -> None:
        fs = self._fs
        names = fs.listdir(directory)
        if all(fs.is_empty(os.path.join(directory, n)) for n in names):
            # A log whose creation was cut short by a crash: nothing was ever stored.
            for n in names:
                fs.remove(os.path.join(directory, n))
            fs.remove_dir(directory)
            logger.warning("removed %s, an empty log directory without meta.json", directory)
            return
        lost = os.path.join(self._root, _LOST)
        fs.makedirs(lost)
        target = os.path.join(lost, f"{kind.value}-{entry}")
        suffix = 0
        while fs.exists(target):
            suffix += 1
            target = os.path.join(lost, f"{kind.value}-{entry}.{suffix}")
        fs.rename(directory, target)
        logger.error("cannot use log directory %s (%s); moved it to %s", directory, why, target)


_PLACEHOLDER: Final = Appended()


def _full(queue: str) -> str:
    return f"queue {queue!r} holds its maximum number of messages"


def _write_detail(failure: StoreFailure, read_only: bool) -> str:
    if failure is StoreFailure.STORAGE_FULL:
        return "no space left on the storage device"
    if read_only:
        return "the storage device failed; the store is read-only"
    # The one write failure that leaves the store writable: the log file could not be
    # opened for want of a descriptor (see .files). Nothing was written.
    return "cannot open the log file now: too many open files"


def _undo_cursors(log: TopicLog, changes: list[_CursorChange]) -> None:
    """Put cursors back where they were, unless a later commit moved them again."""
    cursors = log.index.cursors
    for _, name, before, after in reversed(changes):
        if cursors.get(name) is after:
            if before is None:
                del cursors[name]
            else:
                cursors[name] = before


def _stored_before(positions: Sequence[int], first: int) -> Sequence[int]:
    """The leading positions that were stored before ``first`` (a failed write's start)."""
    if isinstance(positions, range):
        return ()  # all were new, so all were in the failed write
    kept = 0
    while kept < len(positions) and positions[kept] < first:
        kept += 1
    return positions[:kept]


def _set_result(future: asyncio.Future[list[Appended]], value: list[Appended]) -> None:
    if not future.done():
        future.set_result(value)


def _set_settled(future: asyncio.Future[list[Settled]], value: list[Settled]) -> None:
    if not future.done():
        future.set_result(value)


def _remove_quietly(fs: FileSystem, path: str) -> None:
    try:
        fs.remove(path)
    except OSError as exc:
        logger.error("cannot remove %s: %s", path, exc)
