"""New files and renames survive a crash: the store fsyncs the directories it changes.

On the crash model of :class:`~tests.durability.crashfs.CrashFS` a new file, a new
directory or a rename is lost unless its directory was fsynced, even if the file's
data was. Each test makes the store create or rename something, waits for the
acknowledgement of an operation that depends on it, pulls the plug (dropping all
that was not synced), and checks that the acknowledged state is all there:

- a fresh data directory: ``queues/``, ``topics/``, a queue's and a topic's directory,
  ``meta.json`` and first segment (before this was fixed, the data directory's own
  entries were never fsynced, and such a crash lost every message);
- a new segment when a log rolls;
- the dead-letter queue created by the first rejection;
- ``cursors.log`` created by a durable subscription, and rewritten by compaction
  (temporary file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import pytest

from msg.persistence import Append, Claim, CursorCommit, Kind, Outcome, Settle
from msg.storage.filestore import FileStore
from tests.durability.crashfs import CrashFS, Loss

ROOT = "/srv/msg/data"  # none of it exists yet: the store creates every level
Q = "jobs"
T = "news"


async def reopened(fs: CrashFS, keep_metadata: bool) -> FileStore:
    store = FileStore(
        ROOT, segment_bytes=1024, fs=fs.reboot(Loss.DROP, keep_metadata=keep_metadata)
    )
    await store.open()
    return store


async def ready(store: FileStore, queue: str = Q) -> list[str]:
    [deliveries] = await store.claim([Claim(queue, ("check",) * 1000)])
    return [d.message_id for d in deliveries]


@pytest.mark.parametrize("keep_metadata", [False, True])
async def test_fresh_data_directory(keep_metadata: bool) -> None:
    fs = CrashFS()
    store = FileStore(ROOT, fs=fs)
    await store.open()
    [queued, published] = await store.append(
        [Append(Kind.QUEUE, Q, ["m0"], [b"0"], 1.0), Append(Kind.TOPIC, T, ["t0"], [b"0"], 1.0)]
    )
    assert (queued.failure, published.failure) == (None, None)
    again = await reopened(fs, keep_metadata)  # crashed right after the acks
    try:
        assert await ready(again) == ["m0"]
        assert [m.message_id for m in (await again.read(T, 0, 10)).messages] == ["t0"]
    finally:
        await again.close()
        await store.close()


@pytest.mark.parametrize("keep_metadata", [False, True])
async def test_new_segments(keep_metadata: bool) -> None:
    fs = CrashFS()
    store = FileStore(ROOT, segment_bytes=1024, fs=fs)
    await store.open()
    for i in range(60):
        [result] = await store.append([Append(Kind.QUEUE, Q, [f"m{i}"], [b"%d" % i], 1.0)])
        assert result.failure is None
    assert len(fs.listdir(f"{ROOT}/queues/{Q}")) > 4
    again = await reopened(fs, keep_metadata)
    try:
        assert await ready(again) == [f"m{i}" for i in range(60)]
    finally:
        await again.close()
        await store.close()


@pytest.mark.parametrize("keep_metadata", [False, True])
async def test_dead_letter_queue(keep_metadata: bool) -> None:
    fs = CrashFS()
    store = FileStore(ROOT, fs=fs)
    await store.open()
    await store.append([Append(Kind.QUEUE, Q, ["m0", "m1"], [b"0", b"1"], 1.0)])
    await store.claim([Claim(Q, ("c", "c"))])
    [settled] = await store.settle([Settle(Q, "c", ["m0"], Outcome.DEAD, "bad")])
    assert settled.failure is None
    again = await reopened(fs, keep_metadata)
    try:
        assert await ready(again) == ["m1"]
        assert await ready(again, "$dead." + Q) == ["m0"]
    finally:
        await again.close()
        await store.close()


@pytest.mark.parametrize("keep_metadata", [False, True])
async def test_cursor_log_created_and_rewritten(keep_metadata: bool) -> None:
    fs = CrashFS()
    store = FileStore(ROOT, fs=fs)
    await store.open()
    await store.append([Append(Kind.TOPIC, T, ["t0"], [b"0"], 1.0)])
    assert (await store.open_cursor(T, "fresh")).position == 1
    first = await reopened(fs, keep_metadata)
    try:
        assert dict((await first.stats()).topics[T].cursors) == {"fresh": 1}
    finally:
        await first.close()
    # Now enough commits for maintenance to rewrite the file, then one more commit:
    # its ack means the rename before it is durable too.
    fs = CrashFS()
    store = FileStore(ROOT, fs=fs)
    await store.open()
    await store.append([Append(Kind.TOPIC, T, ["t0"], [b"0"], 1.0)])
    await store.commit_cursors([CursorCommit(T, f"c{i % 2}", i) for i in range(5000)])
    path = f"{ROOT}/topics/{T}/cursors.log"
    before = len(fs.read_file(path))
    await store.maintain(1000.0)
    assert len(fs.read_file(path)) < before // 100
    assert await store.commit_cursors([CursorCommit(T, "c0", 7)]) == [None]
    image = fs.reboot(Loss.DROP, keep_metadata=keep_metadata)
    assert len(image.read_file(path)) < before // 100  # the rewritten one
    again = FileStore(ROOT, fs=image)
    await again.open()
    try:
        assert dict((await again.stats()).topics[T].cursors) == {"c0": 7, "c1": 4999}
    finally:
        await again.close()
        await store.close()
