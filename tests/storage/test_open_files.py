"""The file store's bounded cache of open log files, on real files.

- With far more queues and topics than ``max_open_files``, interleaved publishes,
  settles, topic reads, cursor commits and maintenance keep the process's open
  descriptors (``/proc/self/fd``) within the bound whenever the store is idle, and a
  restart finds everything.
- Out of descriptors (EMFILE from a :class:`~tests.storage.faulty.ExhaustedFS`): the
  store sheds idle files and retries; if the retry fails too, only the items bound for
  the file that could not be opened fail, with ``storage_error``; the store stays
  writable and the next batch works. The same for a path the sync thread could not
  open (a new queue's ``meta.json``, a directory).
- Shutdown with thousands of logs written under ``fsync never`` completes and loses
  nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import sys
from pathlib import Path

import pytest

from msg.persistence import (
    Append,
    Claim,
    CursorCommit,
    FsyncPolicy,
    Kind,
    Outcome,
    Settle,
    StoreFailure,
)
from msg.storage.commit import EXHAUSTED_RETRIES, GroupCommit
from msg.storage.filestore import FileStore
from msg.storage.fs import FileSystem
from msg.storage.thread import StorageThread
from tests.storage.faulty import ExhaustedFS

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd"
)

LIMIT = 6
SEGMENT_BYTES = 1024
"""Small, so logs roll, old segments are deleted and reads open older segments."""


def open_fds() -> int:
    """Descriptors this process has open now (the listing's own is the same each time)."""
    return len(os.listdir("/proc/self/fd"))


def queue(name: str, *message_ids: str) -> Append:
    return Append(Kind.QUEUE, name, message_ids, [b'"%s"' % m.encode() for m in message_ids], 1.0)


def topic(name: str, *message_ids: str) -> Append:
    return Append(Kind.TOPIC, name, message_ids, [b'"%s"' % m.encode() for m in message_ids], 1.0)


async def ready(store: FileStore, name: str) -> list[str]:
    """Every ready message id of queue ``name``, in order (claimed, then released)."""
    [deliveries] = await store.claim([Claim(name, ("peek",) * 100_000)])
    await store.release(name, "peek")
    return [d.message_id for d in deliveries]


async def topic_ids(store: FileStore, name: str) -> list[str]:
    read = await store.read(name, 0, 100_000)
    return [m.message_id for m in read.messages]


@pytest.mark.parametrize("policy", [FsyncPolicy.ALWAYS, FsyncPolicy.NEVER])
@pytest.mark.timeout(120)
async def test_descriptors_stay_bounded_with_hundreds_of_logs(
    tmp_path: Path, policy: FsyncPolicy, slow: bool
) -> None:
    rng = random.Random(f"{policy}-bounded")
    count = 400 if slow else 100
    queues = [f"q{i}" for i in range(count)]
    topics = [f"t{i}" for i in range(count)]
    expect_ready: dict[str, list[str]] = {q: [] for q in queues}
    expect_topic: dict[str, list[str]] = {t: [] for t in topics}
    cursors: dict[str, int] = {}
    baseline = open_fds()
    # The lock file, and the log files the cache keeps.
    bound = baseline + 1 + LIMIT
    peak = 0
    store = FileStore(tmp_path, fsync=policy, segment_bytes=SEGMENT_BYTES, max_open_files=LIMIT)
    await store.open()

    async def idle_check(what: str) -> None:
        nonlocal peak
        if policy is not FsyncPolicy.ALWAYS:
            # Under never a dirty descriptor the cache let go of is closed by a
            # partial sync round: wait for the rounds, not for time.
            await store._ready().drain()  # white box: the group commit
        now = open_fds()
        peak = max(peak, now)
        assert now <= bound, f"{now - baseline} descriptors open after {what}, limit {LIMIT}"

    try:
        serial = 0
        for step in range(30 if slow else 12):
            # Publish to a random third of all logs in one batch.
            items: list[Append] = []
            for name in rng.sample(queues + topics, (2 * count) // 3):
                new = [f"{name}-{serial}", f"{name}-{serial + 1}"]
                serial += 2
                items.append(queue(name, *new) if name in expect_ready else topic(name, *new))
                (expect_ready if name in expect_ready else expect_topic)[name] += new
            results = await store.append(items)
            assert [r.failure for r in results] == [None] * len(items)
            await idle_check(f"publishing to {len(items)} logs")

            # Consumers take some and ack or requeue them (requeued go to the back).
            for name in rng.sample(queues, count // 4):
                [got] = await store.claim([Claim(name, ("c",) * 3)])
                acked = [d.message_id for d in got if rng.random() < 0.7]
                again = [d.message_id for d in got if d.message_id not in acked]
                settles = [Settle(name, "c", acked, Outcome.ACK)] if acked else []
                if again:
                    settles.append(Settle(name, "c", again, Outcome.REQUEUE))
                assert all(s.failure is None for s in await store.settle(settles))
                expect_ready[name] = [m for m in expect_ready[name] if m not in acked]
                await store.release(name, "c")
            await idle_check("settling")

            # Readers read topics from random positions (older segments included).
            for name in rng.sample(topics, count // 4):
                start = rng.randrange(len(expect_topic[name]) + 1)
                read = await store.read(name, start, 10)
                assert [m.message_id for m in read.messages] == expect_topic[name][start:][:10]
            await idle_check("reading")

            # Durable subscribers move (each topic's cursors.log is a cached file too).
            commits = []
            for name in rng.sample(topics, count // 6):
                cursors[name] = rng.randrange(len(expect_topic[name]) + 1)
                commits.append(CursorCommit(name, "d", cursors[name]))
            assert await store.commit_cursors(commits) == [None] * len(commits)
            await idle_check("committing cursors")

            await store.maintain(1000.0 + step)
            await idle_check("maintenance")
    finally:
        await store.close()
    assert open_fds() == baseline  # nothing leaked
    logging.getLogger(__name__).info(
        "%s: %d logs, at most %d descriptors open when idle (limit %d)",
        policy,
        2 * count,
        peak - baseline - 1,
        LIMIT,
    )

    reopened = FileStore(tmp_path, fsync=policy, segment_bytes=SEGMENT_BYTES, max_open_files=LIMIT)
    await reopened.open()
    try:
        for name in queues:
            assert sorted(await ready(reopened, name)) == sorted(expect_ready[name]), name
        stats = await reopened.stats()
        for name in topics:
            assert await topic_ids(reopened, name) == expect_topic[name], name
            if name in cursors:
                assert stats.topics[name].cursors == {"d": cursors[name]}
        assert open_fds() <= bound
    finally:
        await reopened.close()


_filler = itertools.count()


async def fill_cache(store: FileStore, names: list[str]) -> None:
    """Write a message to each of queues ``names`` (created if new): the last
    ``max_open_files`` of them stay open, idle, and older files are closed."""
    serial = next(_filler)
    results = await store.append([queue(name, f"f{serial}") for name in names])
    assert [r.failure for r in results] == [None] * len(names)


FILLERS = ["f0", "f1", "f2", "f3"]


async def test_an_open_that_fails_twice_fails_only_its_items(tmp_path: Path) -> None:
    fs = ExhaustedFS()
    store = FileStore(tmp_path, max_open_files=4, fs=fs)
    await store.open()
    try:
        results = await store.append([queue("q0", "q0-0"), queue("q1", "q1-0")])
        assert [r.failure for r in results] == [None, None]
        await fill_cache(store, FILLERS)  # q0's and q1's files are closed
        fs.fail_opens = 2  # the open of q0's file, and the retry after shedding
        results = await store.append([queue("q0", "q0-1"), queue("f3", "f3-1")])
        assert results[0].failure is StoreFailure.STORAGE_ERROR
        assert "too many open files" in results[0].detail
        assert "read-only" not in results[0].detail
        assert results[1].failure is None  # its file was open: unaffected
        assert fs.failed == 2
        assert store.writable() is None  # not read-only
        assert (await store.stats()).read_only is None

        # The next batch opens the file and works.
        results = await store.append([queue("q0", "q0-2"), queue("q1", "q1-1")])
        assert [r.failure for r in results] == [None, None]
        assert await ready(store, "q0") == ["q0-0", "q0-2"]

        # Settles and cursor commits bound for a file that cannot be opened fail the
        # same way, and only they.
        await fill_cache(store, FILLERS)
        [got] = await store.claim([Claim("q0", ("c",))])
        fs.fail_opens = 2
        [settled] = await store.settle([Settle("q0", "c", [got[0].message_id], Outcome.ACK)])
        assert settled.failure is StoreFailure.STORAGE_ERROR
        [settled] = await store.settle([Settle("q0", "c", [got[0].message_id], Outcome.ACK)])
        assert settled.failure is None
        await store.open_cursor("news", "d")
        await fill_cache(store, FILLERS)  # cursors.log closed again
        fs.fail_opens = 2
        assert await store.commit_cursors([CursorCommit("news", "d", 1)]) == [
            StoreFailure.STORAGE_ERROR
        ]
        assert await store.commit_cursors([CursorCommit("news", "d", 2)]) == [None]
        assert store.writable() is None
    finally:
        await store.close()

    again = FileStore(tmp_path, max_open_files=4)
    await again.open()
    try:
        assert await ready(again, "q0") == ["q0-2"]
        assert await ready(again, "q1") == ["q1-0", "q1-1"]
        assert (await again.stats()).topics["news"].cursors == {"d": 2}
    finally:
        await again.close()


async def test_an_open_that_fails_once_sheds_idle_files_and_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fs = ExhaustedFS()
    # Above the default minimum (64), so shedding also lowers the limit.
    store = FileStore(tmp_path, max_open_files=80, fs=fs)
    await store.open()
    try:
        await fill_cache(store, [f"q{i}" for i in range(80)])  # all 80 open, idle
        assert len(fs.open_fds) == 80
        fs.fail_opens = 1
        with caplog.at_level(logging.WARNING, logger="msg.storage"):
            [result] = await store.append([queue("fresh", "x")])
        assert result.failure is None
        # The older half of the idle files was closed, and the limit came down to
        # the default minimum, once, with one warning naming the way out.
        assert len(fs.open_fds) == 41
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "keep at most 64 open from now on (was 80)" in warnings[0]
        assert "ulimit -n" in warnings[0]
        results = await store.append([queue(f"q{i}", f"q{i}-1") for i in range(80)])
        assert [r.failure for r in results] == [None] * 80
        assert len(fs.open_fds) <= 64
        assert store.writable() is None
    finally:
        await store.close()
    assert fs.open_fds == set()


@pytest.mark.parametrize("policy", list(FsyncPolicy))
async def test_a_batch_writing_more_logs_than_descriptors_left(
    tmp_path: Path, policy: FsyncPolicy
) -> None:
    fs = ExhaustedFS()
    store = FileStore(tmp_path, fsync=policy, max_open_files=4, fs=fs)
    await store.open()
    names = [f"q{i}" for i in range(40)]
    try:
        await fill_cache(store, names)
        await store._ready().drain()  # white box: no round may still hold a descriptor
        fs.max_fds = 8  # room for the cache and a few more
        fs.peak = len(fs.open_fds)
        # Each file written and then let go of stays open until a sync round has
        # synced it; once none is left, those are synced and closed on the spot.
        results = await store.append([queue(name, f"{name}-1") for name in names])
        assert [r.failure for r in results] == [None] * len(names)
        assert store.writable() is None
        assert fs.peak <= 8
    finally:
        await store.close()
    again = FileStore(tmp_path)
    await again.open()
    try:
        for name in names:
            assert (await ready(again, name))[1:] == [f"{name}-1"]  # after the filler
    finally:
        await again.close()


async def test_creating_a_log_without_descriptors_fails_its_items_not_the_store(
    tmp_path: Path,
) -> None:
    fs = ExhaustedFS()
    store = FileStore(tmp_path, max_open_files=4, fs=fs)
    await store.open()
    try:
        # Creation is tried twice, shedding idle files in between; each try fails at
        # its first open (writing meta.json).
        fs.fail_opens = 2
        results = await store.append([topic("new", "a"), queue("other", "b")])
        assert results[0].failure is StoreFailure.STORAGE_ERROR
        assert "cannot create the log now" in results[0].detail
        assert results[1].failure is None
        assert store.writable() is None
        results = await store.append([topic("new", "a2")])
        assert results[0].failure is None
        assert await topic_ids(store, "new") == ["a2"]
    finally:
        await store.close()
    again = FileStore(tmp_path)
    await again.open()
    try:
        assert await topic_ids(again, "new") == ["a2"]
        assert await ready(again, "other") == ["b"]
    finally:
        await again.close()


@pytest.mark.parametrize("failures", [EXHAUSTED_RETRIES - 1, EXHAUSTED_RETRIES])
async def test_a_sync_round_that_cannot_open_a_path_retries(tmp_path: Path, failures: int) -> None:
    fs = ExhaustedFS()
    store = FileStore(tmp_path, max_open_files=4, fs=fs)
    await store.open()
    try:
        # A new queue's meta.json is synced by path, on the sync thread: that open
        # fails in ``failures`` rounds in a row.
        fs.sync_suffix = "meta.json"
        fs.fail_sync_paths = failures
        [result] = await store.append([queue("new", "a")])
        if failures < EXHAUSTED_RETRIES:
            assert result.failure is None  # retried until it worked
        else:
            # The publisher gets an answer; the path is synced with the next round.
            assert result.failure is StoreFailure.STORAGE_ERROR
        assert store.writable() is None
        [result] = await store.append([queue("new", "b")])
        assert result.failure is None
        assert fs.fail_sync_paths == 0
    finally:
        await store.close()
    again = FileStore(tmp_path)
    await again.open()
    try:
        got = await ready(again, "new")
        # A storage_error promises no ack, not that nothing reached the disk.
        assert got in (["a", "b"], ["b"])
    finally:
        await again.close()


@pytest.mark.timeout(180)
async def test_closing_with_thousands_of_logs_under_fsync_never(tmp_path: Path, slow: bool) -> None:
    count = 20_000 if slow else 1_500
    names = [f"t{i}" for i in range(count)]
    # Fewer open files than logs: the cache also lets go of dirty descriptors.
    store = FileStore(tmp_path, fsync=FsyncPolicy.NEVER, max_open_files=count // 3)
    await store.open()
    for start in range(0, count, 1000):
        chunk = names[start : start + 1000]
        results = await store.append([topic(name, f"{name}-a") for name in chunk])
        assert [r.failure for r in results] == [None] * len(chunk)
    results = await store.append([topic(name, f"{name}-b") for name in names])
    assert [r.failure for r in results] == [None] * count
    await store.close()  # every log synced; bounded by the test's timeout, not timed
    again = FileStore(tmp_path, fsync=FsyncPolicy.NEVER)
    recovery = await again.open()
    try:
        assert len(recovery.topics) == count
        assert all(end == 2 for end in recovery.topics.values())
        for name in random.Random(0).sample(names, 50):
            assert await topic_ids(again, name) == [f"{name}-a", f"{name}-b"]
    finally:
        await again.close()


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE")
def test_default_limit_is_a_quarter_of_the_descriptor_limit() -> None:
    import resource

    from msg.storage.files import MAX_DEFAULT_LIMIT, MIN_DEFAULT_LIMIT, default_limit

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        assert default_limit() == MAX_DEFAULT_LIMIT
    else:
        assert default_limit() == max(MIN_DEFAULT_LIMIT, min(MAX_DEFAULT_LIMIT, soft // 4))


class ClosingFS(FileSystem):
    """The real file system, noting the descriptors closed."""

    def __init__(self) -> None:
        self.closed: list[int] = []

    def close(self, fd: int) -> None:
        self.closed.append(fd)
        super().close(fd)


async def test_a_file_removed_before_the_round_that_syncs_it_by_path(tmp_path: Path) -> None:
    # Under everysec a dirty descriptor is closed at once and its path synced by the
    # next round; if retention deleted the file meanwhile, there is nothing to sync,
    # and that is no disk error.
    fs = ClosingFS()
    failures: list[OSError] = []
    with StorageThread() as executor:
        commit = GroupCommit(
            fs, FsyncPolicy.EVERYSEC, asyncio.get_running_loop(), executor, failures.append
        )
        path = str(tmp_path / "00000000000000000000.log")
        fd = fs.open(path)
        fs.pwrite(fd, b"record\n", 0)
        commit.wrote(fd)
        commit.close_fd(fd, path)
        assert fs.closed == [fd]  # at once, not after a round
        os.remove(path)
        await commit.sync_now()
        assert failures == []
        assert commit.failure is None
        assert not commit.dirty
        commit.close_all()
