"""Corrupt records in the middle of a log: random bit flips, 100 trials (``--slow``: 2,000).

Each trial writes a queue or a topic log of several segments, flips 1 to 5 random
bits inside one record (its newline included) that good records follow, and
restarts. The record must be detected by its checksum, never delivered, and skipped
with exactly one ERROR line naming the file and the offset where it starts (and no
WARNING); no other record may be lost. Then the trial makes the store rewrite or
delete that segment (the queue is drained and compacted; the topic's retention drops
it): the file must be in ``lost+found`` first, with every byte it had.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from msg.persistence import (
    Append,
    Claim,
    CursorCommit,
    FsyncPolicy,
    Kind,
    Outcome,
    Retention,
    Settle,
)
from msg.storage.filenames import encode_name
from msg.storage.filestore import FileStore

STORAGE = "msg.storage"
Q = "jobs"
T = "news"
COUNT = 40
SEGMENT_BYTES = 1024
# Corruption is found the same under every policy; not syncing keeps 100 trials quick.
NO_SYNC = FsyncPolicy.NEVER


def storage_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(STORAGE) and r.levelno == level]


def payload(i: int) -> bytes:
    return b'{"n":%d,"text":"message number %d"}' % (i, i)


async def write_log(root: Path, kind: Kind, retention: Retention) -> Path:
    store = FileStore(root, segment_bytes=SEGMENT_BYTES, retention=retention, fsync=NO_SYNC)
    await store.open()
    try:
        name = Q if kind is Kind.QUEUE else T
        for i in range(0, COUNT, 4):
            ids = [f"m{k}" for k in range(i, i + 4)]
            await store.append(
                [Append(kind, name, ids, [payload(k) for k in range(i, i + 4)], 1.0)]
            )
    finally:
        await store.close()
    return (
        root
        / ("queues" if kind is Kind.QUEUE else "topics")
        / encode_name(Q if kind is Kind.QUEUE else T)
    )


async def read_back(store: FileStore, kind: Kind) -> list[tuple[str, bytes]]:
    if kind is Kind.QUEUE:
        [deliveries] = await store.claim([Claim(Q, ("reader",) * 1000)])
        return [(d.message_id, d.payload) for d in deliveries]
    return [(m.message_id, m.payload) for m in (await store.read(T, 0, 1000)).messages]


async def rewrite_everything(store: FileStore, kind: Kind, path: Path) -> None:
    """Make the store delete or rewrite every segment but the newest."""
    name = Q if kind is Kind.QUEUE else T
    # Enough new records to roll to a fresh segment, so the damaged one is not active.
    for i in range(0, 100, 4):  # in batches: a log rolls between writes, not within one
        more = [f"x{k}" for k in range(i, i + 4)]
        await store.append([Append(kind, name, more, [b"0"] * len(more), 2.0)])
    if kind is Kind.QUEUE:
        [deliveries] = await store.claim([Claim(Q, ("reader",) * 1000)])
        await store.settle([Settle(Q, "reader", [d.message_id for d in deliveries], Outcome.ACK)])
    log = store._queues[name] if kind is Kind.QUEUE else store._topics[name]  # white box
    number = int(path.stem)
    for tick in range(COUNT):
        if number not in log.by_number:
            return
        await store.maintain(1000.0 + tick)


async def one_trial(root: Path, rng: random.Random, caplog: pytest.LogCaptureFixture) -> None:
    kind = rng.choice((Kind.QUEUE, Kind.TOPIC))
    retention = Retention(max_messages=40, max_bytes=None, max_age=None)
    directory = await write_log(root, kind, retention)
    files = sorted(directory.glob("0*.log"))
    assert len(files) >= 3
    # Any record but the very last of the newest file (bad bytes at the end are a torn
    # write, not corruption).
    choices = []
    for path in files:
        content = path.read_bytes()
        starts = [0, *[i + 1 for i, byte in enumerate(content) if byte == ord("\n")]]
        for k in range(len(starts) - 1):
            if not (path == files[-1] and k == len(starts) - 2):
                choices.append((path, starts[k], starts[k + 1]))
    path, start, end = rng.choice(choices)
    data = bytearray(path.read_bytes())
    victim = data[start : end - 1]
    victim_id = victim[victim.index(b'"id":"') + 6 :].split(b'"')[0].decode()
    # Distinct bits (two flips of one bit would cancel out), in the record and its newline.
    bits = rng.sample(range(start * 8, end * 8), rng.randint(1, 5))
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    if all(bit // 8 == end - 1 for bit in bits):
        # Only the newline was hit: the record is intact and kept; the damage reported
        # is the byte where the newline should be.
        victim_id, start = "", end - 1
    path.write_bytes(bytes(data))
    damaged = bytes(data)

    caplog.clear()
    store = FileStore(root, segment_bytes=SEGMENT_BYTES, retention=retention, fsync=NO_SYNC)
    recovery = await store.open()
    try:
        got = await read_back(store, kind)
        expected = [(f"m{i}", payload(i)) for i in range(COUNT) if f"m{i}" != victim_id]
        assert got == expected, f"{path.name} offset {start}"
        errors = storage_records(caplog, logging.ERROR)
        assert len(errors) == 1, [e.getMessage() for e in errors]
        assert str(path) in errors[0].getMessage()
        assert f"offset {start} " in errors[0].getMessage()
        assert storage_records(caplog, logging.WARNING) == []
        assert recovery.corrupt_records == 1
        if kind is Kind.QUEUE:
            await store.release(Q, "reader")
        await rewrite_everything(store, kind, path)
        assert not path.exists(), "the damaged segment should have been compacted away"
    finally:
        await store.close()
    kept = root / "lost+found" / path.relative_to(root)
    # As it was, plus what was appended to it if it was the active segment (appending
    # is not rewriting).
    assert kept.read_bytes().startswith(damaged)
    notes = [w.getMessage() for w in storage_records(caplog, logging.WARNING)]
    assert any(str(kept) in note for note in notes), notes


@pytest.mark.slow_timeout(1800)
async def test_corrupt_middle_records_are_detected_skipped_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, slow: bool
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE)
    rng = random.Random(20261127)
    trials = 2000 if slow else 100
    for trial in range(trials):
        try:
            await one_trial(tmp_path / f"data{trial}", rng, caplog)
        except AssertionError as exc:
            raise AssertionError(f"trial {trial}: {exc}") from exc


async def test_torn_tail_cut_keeps_a_file_with_corrupt_records_aside_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE)
    root = tmp_path / "data"
    store = FileStore(root)
    await store.open()
    try:
        await store.append([Append(Kind.QUEUE, Q, [f"m{i}"], [payload(i)], 1.0) for i in range(5)])
    finally:
        await store.close()
    [path] = (root / "queues" / Q).glob("0*.log")
    data = bytearray(path.read_bytes())
    data[10] ^= 4  # the first record: corrupt, good records follow
    damaged = bytes(data) + b'{"op":"pub","seq":5,'  # and a torn tail
    path.write_bytes(damaged)
    store = FileStore(root)
    await store.open()
    try:
        [deliveries] = await store.claim([Claim(Q, ("c",) * 10)])
        assert [d.message_id for d in deliveries] == ["m1", "m2", "m3", "m4"]
    finally:
        await store.close()
    assert (root / "lost+found" / path.relative_to(root)).read_bytes() == damaged
    assert len(storage_records(caplog, logging.ERROR)) == 1


async def test_cursor_log_with_a_corrupt_record_is_kept_before_its_rewrite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE)
    root = tmp_path / "data"
    store = FileStore(root)
    await store.open()
    try:
        await store.append([Append(Kind.TOPIC, T, ["t0"], [b"0"], 1.0)])
        await store.commit_cursors([CursorCommit(T, f"c{i}", 0) for i in range(3)])
    finally:
        await store.close()
    path = root / "topics" / T / "cursors.log"
    data = bytearray(path.read_bytes())
    data[data.index(b'"c1"') + 1] ^= 1
    path.write_bytes(bytes(data))
    store = FileStore(root)
    await store.open()
    try:
        assert set((await store.stats()).topics[T].cursors) == {"c0", "c2"}
        assert len(storage_records(caplog, logging.ERROR)) == 1
        damaged = path.read_bytes()
        # Enough commits that maintenance rewrites cursors.log.
        await store.commit_cursors([CursorCommit(T, "c0", 1)] * 5000)
        grown = path.read_bytes()
        assert grown.startswith(damaged)
        await store.maintain(1000.0)
        assert len(path.read_bytes()) < len(grown) // 100
        assert dict((await store.stats()).topics[T].cursors) == {"c0": 1, "c2": 0}
    finally:
        await store.close()
    assert (root / "lost+found" / path.relative_to(root)).read_bytes() == grown
