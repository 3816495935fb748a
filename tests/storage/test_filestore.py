"""The file store beyond the contract: restarts, damaged files, names, space, fsync."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from msg.errors import StorageError
from msg.persistence import (
    Append,
    Claim,
    Cursor,
    CursorCommit,
    FsyncPolicy,
    Kind,
    Outcome,
    Retention,
    Settle,
    Settled,
    StoreFailure,
)
from msg.storage import records
from msg.storage.filestore import FileStore
from msg.storage.fs import FileSystem
from tests.storage.faulty import CountingFS, FailingSyncFS, GatedFS, LimitedFS

Q = "jobs"
T = "news"
STORAGE_LOGGER = "msg.storage"


def qapp(*message_ids: str, queue: str = Q, payload: bytes | None = None) -> Append:
    """One append to a queue; each payload is {"id":<id>} unless ``payload`` is given."""
    payloads = [
        payload if payload is not None else b'{"id":"%s"}' % m.encode() for m in message_ids
    ]
    return Append(Kind.QUEUE, queue, message_ids, payloads, 1000.0)


def tapp(*message_ids: str, topic: str = T, ts: float = 1000.0) -> Append:
    """One append to a topic; each payload is the id as a JSON string."""
    payloads = [b'"%s"' % m.encode() for m in message_ids]
    return Append(Kind.TOPIC, topic, message_ids, payloads, ts)


def ids(prefix: str, count: int, start: int = 0) -> list[str]:
    return [f"{prefix}{i}" for i in range(start, start + count)]


def settle(
    consumer: str, *message_ids: str, outcome: Outcome = Outcome.ACK, reason: str | None = None
) -> Settle:
    return Settle(Q, consumer, message_ids, outcome, reason)


@asynccontextmanager
async def opened(path: Path, **options: Any) -> AsyncIterator[FileStore]:
    store = FileStore(path, **options)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def drain(store: FileStore, queue: str = Q) -> list[tuple[str, int]]:
    """Claim everything ready (auto_ack) and return (message id, attempt)."""
    [deliveries] = await store.claim([Claim(queue, ("drain",) * 100_000, auto_ack=True)])
    return [(d.message_id, d.attempt) for d in deliveries]


async def ids_of(store: FileStore, queue: str = Q) -> list[str]:
    """The ids of the ready messages, in order (claimed and released again)."""
    [deliveries] = await store.claim([Claim(queue, ("peek",) * 100_000)])
    await store.release(queue, "peek")
    return [d.message_id for d in deliveries]


def segment_files(root: Path, kind: str = "queues", name: str = Q) -> list[Path]:
    from msg.storage.filenames import encode_name

    return sorted((root / kind / encode_name(name)).glob("*.log"))


def log_lines(root: Path) -> list[bytes]:
    """Every line of every log file under ``root``, files in name order."""
    paths = sorted(root.rglob("*.log"))
    return [line for path in paths for line in path.read_bytes().splitlines()]


def storage_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(STORAGE_LOGGER) and r.levelno == level]


# -- the seed's persistence tests ------------------------------------------------------


async def test_saving_and_loading_queue_messages(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        await store.append([qapp(*ids("m", 6))])
        [ds] = await store.claim([Claim(Q, ("a", "a", "a"))])
        assert [d.message_id for d in ds] == ["m0", "m1", "m2"]
        await store.settle([settle("a", "m1"), settle("a", "m2", outcome=Outcome.REQUEUE)])
        # m0 stays in flight: in-flight state is volatile, so it is ready after a restart.
    async with opened(tmp_path) as store:
        [ds] = await store.claim([Claim(Q, ("b",) * 10)])
        assert [(d.message_id, d.attempt) for d in ds] == [
            ("m0", 1),  # its delivery before the restart was never logged
            ("m2", 2),  # the requeue logged one delivery
            ("m3", 1),
            ("m4", 1),
            ("m5", 1),
        ]
        assert ds[3].payload == b'{"id":"m4"}'
        assert ds[3].published_at == 1000.0
        # Sequence numbers continue after the restart.
        [appended] = await store.append([qapp("m6", "m3")])
        # m3 is a retry of a recent id after the restart.
        assert list(appended.positions) == [6, 3]


async def test_saving_and_loading_pubsub_messages(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        [result] = await store.append([tapp(*ids("t", 5))])
        assert result.positions == range(5)
        assert (await store.open_cursor(T, "audit")).position == 5
        await store.commit_cursors([CursorCommit(T, "audit", 3), CursorCommit(T, "other", 1)])
        assert (await store.open_cursor(T, "gone")).position == 5
        assert await store.delete_cursor(T, "gone")
    async with opened(tmp_path) as store:
        read = await store.read(T, 0, 100)
        assert [(m.position, m.message_id, m.payload) for m in read.messages] == [
            (i, f"t{i}", b'"t%d"' % i) for i in range(5)
        ]
        assert (read.first, read.end) == (0, 5)
        stats = (await store.stats()).topics[T]
        assert dict(stats.cursors) == {"audit": 3, "other": 1}
        assert (await store.open_cursor(T, "audit")).position == 3
        [appended] = await store.append([tapp("t5")])
        assert list(appended.positions) == [5]
        # Idempotent append survives a restart for recent ids.
        [again] = await store.append([tapp("t2", "t6")])
        assert list(again.positions) == [2, 6]


async def test_deleting_messages(tmp_path: Path) -> None:
    async with opened(tmp_path, segment_bytes=1024) as store:
        for i in range(0, 40, 4):
            await store.append([qapp(*ids("m", 4, i))])
        [ds] = await store.claim([Claim(Q, ("c",) * 40)])
        results = await store.settle([settle("c", *[d.message_id for d in ds[:30]])])
        assert results == [Settled()]
        before = len(segment_files(tmp_path))
        await store.maintain(2000.0)
        after = len(segment_files(tmp_path))
        assert after < before
    async with opened(tmp_path, segment_bytes=1024) as store:
        assert await ids_of(store) == [f"m{i}" for i in range(30, 40)]


async def test_recovery_reports_what_it_found(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        await store.append([qapp("a", "b"), tapp("t"), qapp("x", queue="other")])
    store = FileStore(tmp_path)
    recovery = await store.open()
    try:
        assert dict(recovery.queues) == {Q: 2, "other": 1}
        assert dict(recovery.topics) == {T: 1}
        assert (recovery.torn_records, recovery.corrupt_records) == (0, 0)
    finally:
        await store.close()


async def test_dead_letters_survive_restart(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        await store.append([qapp("m0", "m1")])
        await store.claim([Claim(Q, ("c", "c"))])
        [settled] = await store.settle(
            [settle("c", "m0", outcome=Outcome.DEAD, reason='bad "json"')]
        )
        assert settled == Settled()
    async with opened(tmp_path) as store:
        assert await ids_of(store) == ["m1"]
        [[d]] = await store.claim([Claim("$dead." + Q, ("ops",))])
        assert (d.message_id, d.reason, d.attempt) == ("m0", 'bad "json"', 1)


async def test_auto_ack_consumption_is_logged(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        await store.append([qapp("m0", "m1")])
        await store.claim([Claim(Q, ("c",), auto_ack=True)])
    async with opened(tmp_path) as store:
        assert await ids_of(store) == ["m1"]


async def test_records_are_readable_json_lines(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        await store.append([qapp("m0", payload=b'{"a":[1,"x\\ny"]}'), tapp("t0")])
        await store.claim([Claim(Q, ("c",))])
        await store.settle([settle("c", "m0", outcome=Outcome.REQUEUE)])
        await store.open_cursor(T, "c")
    records = [json.loads(line) for line in log_lines(tmp_path)]
    assert [r["op"] for r in records] == ["pub", "req", "pub", "cur"]
    assert all(len(r["crc"]) == 8 for r in records)
    assert records[0]["msg"] == {"a": [1, "x\ny"]}
    assert records[1]["att"] == 1
    meta = json.loads((segment_files(tmp_path)[0].parent / "meta.json").read_bytes())
    assert meta == {"v": 1, "kind": "queue", "name": Q}


async def test_payload_with_raw_newlines_stays_one_record(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        await store.append([qapp("m0", payload=b'{\n  "a": 1\n}')])
    async with opened(tmp_path) as store:
        [[d]] = await store.claim([Claim(Q, ("c",))])
        assert json.loads(d.payload) == {"a": 1}


# -- torn tails and corruption --------------------------------------------------------


async def _write_queue(root: Path, count: int) -> Path:
    async with opened(root) as store:
        for i in range(count):
            await store.append([qapp(f"m{i}")])
    [path] = segment_files(root)
    return path


async def test_torn_tail_at_every_cut_point(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    path = await _write_queue(tmp_path, 5)
    data = path.read_bytes()
    start = data.rindex(b"\n", 0, len(data) - 1) + 1
    for cut in range(start + 1, len(data)):
        path.write_bytes(data[:cut])
        caplog.clear()
        store = FileStore(tmp_path)
        recovery = await store.open()
        try:
            assert await ids_of(store) == ["m0", "m1", "m2", "m3"], cut
        finally:
            await store.close()
        warnings = storage_logs(caplog, logging.WARNING)
        assert len(warnings) == 1, cut
        assert str(path) in warnings[0].getMessage()
        assert f"offset {start}" in warnings[0].getMessage()
        assert storage_logs(caplog, logging.ERROR) == []
        assert recovery.torn_records == 1
        assert path.stat().st_size == start
    # And a clean file opens silently.
    path.write_bytes(data)
    caplog.clear()
    async with opened(tmp_path) as store:
        assert len(await ids_of(store)) == 5
    assert storage_logs(caplog, logging.WARNING) == []


@pytest.mark.parametrize(
    "garbage",
    [b"\x00" * 4096, b"garbage", b"{not json}\n{more}\n", b'{"op":"pub","seq":9', b"\n\n\n"],
    ids=["zeros", "text", "lines", "half-record", "newlines"],
)
async def test_garbage_after_last_record_is_cut_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: bytes
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    path = await _write_queue(tmp_path, 3)
    size = path.stat().st_size
    with path.open("ab") as file:
        file.write(garbage)
    async with opened(tmp_path) as store:
        assert await ids_of(store) == ["m0", "m1", "m2"]
        await store.append([qapp("m3")])
    warnings = storage_logs(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert f"offset {size}" in warnings[0].getMessage()
    async with opened(tmp_path) as store:
        assert await ids_of(store) == ["m0", "m1", "m2", "m3"]


@pytest.mark.parametrize("seed", range(8))
async def test_corrupt_middle_record_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    path = await _write_queue(tmp_path, 20)
    data = bytearray(path.read_bytes())
    starts = [0, *[i + 1 for i, byte in enumerate(data) if byte == ord("\n")][:-1]]
    victim = starts[10]
    end = starts[11] - 1  # the victim's newline
    rng = random.Random(seed)
    for _ in range(rng.randint(1, 5)):
        at = rng.randrange(victim, end)
        data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    store = FileStore(tmp_path)
    recovery = await store.open()
    try:
        assert await ids_of(store) == [f"m{i}" for i in range(20) if i != 10]
    finally:
        await store.close()
    errors = storage_logs(caplog, logging.ERROR)
    assert len(errors) == 1
    assert str(path) in errors[0].getMessage()
    assert f"offset {victim}" in errors[0].getMessage()
    assert storage_logs(caplog, logging.WARNING) == []
    assert recovery.corrupt_records == 1


async def test_damaged_newline_loses_no_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    path = await _write_queue(tmp_path, 5)
    data = bytearray(path.read_bytes())
    second_newline = data.index(b"\n", data.index(b"\n") + 1)
    data[second_newline] ^= 0x40
    path.write_bytes(bytes(data))
    async with opened(tmp_path) as store:
        assert await ids_of(store) == ["m0", "m1", "m2", "m3", "m4"]
    errors = storage_logs(caplog, logging.ERROR)
    assert len(errors) == 1
    assert f"offset {second_newline}" in errors[0].getMessage()


async def test_corrupt_topic_record_is_never_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    async with opened(tmp_path) as store:
        await store.append([tapp(*ids("t", 10))])
    [path] = segment_files(tmp_path, "topics", T)
    data = path.read_bytes()
    at = data.index(b'"t4"', data.index(b'"id":"t4"') + 10)
    path.write_bytes(data[:at] + b'"X4"' + data[at + 4 :])
    async with opened(tmp_path) as store:
        read = await store.read(T, 0, 100)
        assert [m.message_id for m in read.messages] == [f"t{i}" for i in range(10) if i != 4]
        assert read.end == 10
        part = await store.read(T, 3, 2)
        assert [m.message_id for m in part.messages] == ["t3", "t5"]
    assert len(storage_logs(caplog, logging.ERROR)) == 1


async def test_torn_cursor_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    async with opened(tmp_path) as store:
        await store.append([tapp("t0")])
        await store.commit_cursors([CursorCommit(T, "a", 0)])
        await store.commit_cursors([CursorCommit(T, "a", 1)])
    path = segment_files(tmp_path, "topics", T)[0].parent / "cursors.log"
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    async with opened(tmp_path) as store:
        assert (await store.open_cursor(T, "a")).position == 0
    assert len(storage_logs(caplog, logging.WARNING)) == 1


async def test_unreadable_meta_moves_directory_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    async with opened(tmp_path) as store:
        await store.append([qapp("m0"), qapp("k0", queue="keep")])
    [path] = segment_files(tmp_path)
    # Readable, but not for this broker: left alone (a torn one is rebuilt: below).
    (path.parent / "meta.json").write_bytes(b'{"v":99,"kind":"queue","name":"jobs"}')
    empty = tmp_path / "topics" / "half-created"
    empty.mkdir()
    (empty / "00000000000000000000.log").write_bytes(b"")
    async with opened(tmp_path) as store:
        stats = await store.stats()
        assert set(stats.queues) == {"keep"}
        assert set(stats.topics) == set()
    assert not empty.exists()
    assert (tmp_path / "lost+found" / f"queue-{path.parent.name}" / path.name).exists()
    assert len(storage_logs(caplog, logging.ERROR)) == 1


async def test_torn_meta_is_rebuilt_from_the_directory_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    async with opened(tmp_path) as store:
        await store.append([qapp("m0", "m1"), qapp("x0", queue="caf\u00e9 au lait")])
    for name in (Q, "caf\u00e9 au lait"):
        [path] = segment_files(tmp_path, name=name)
        (path.parent / "meta.json").write_bytes(b'{"v":1,"ki')  # torn by a crash
    async with opened(tmp_path) as store:
        assert await ids_of(store) == ["m0", "m1"]
        assert await ids_of(store, "caf\u00e9 au lait") == ["x0"]
    warnings = [r.getMessage() for r in storage_logs(caplog, logging.WARNING)]
    assert len(warnings) == 2
    assert all("rebuilt the unreadable meta.json" in w for w in warnings)
    assert storage_logs(caplog, logging.ERROR) == []
    kept = tmp_path / "lost+found" / "queues" / Q / "meta.json"
    assert kept.read_bytes() == b'{"v":1,"ki'
    caplog.clear()
    async with opened(tmp_path) as store:
        assert await ids_of(store) == ["m0", "m1"]
    assert storage_logs(caplog, logging.WARNING) == []


def test_decode_name_inverts_encode_name() -> None:
    from msg.storage.filenames import decode_name, encode_name

    for name in [*HOSTILE_NAMES, "plain", "a.b", "%41"]:
        encoded = encode_name(name)
        decoded = decode_name(encoded)
        if "~" in encoded:
            assert decoded is None  # hashed: the name is only in meta.json
        else:
            assert decoded == name, name
    assert decode_name("%4") is None
    assert decode_name("%zz") is None
    assert decode_name("News") is None  # msg never makes an upper-case directory name


# -- names ----------------------------------------------------------------------------

HOSTILE_NAMES = [
    "../../x",
    "/abs",
    "..",
    ".",
    ".hidden",
    "trailing.",
    "CON",
    "con",
    "nul.txt",
    "NUL",
    "com1",
    "lpt9.log",
    "a\\b",
    "a/b/c",
    "News",
    "news",
    "NEWS",
    "%4Eews",
    "ünïcödé",
    "ünïcödé",  # the same name decomposed (NFD)
    "日本語",
    "😀",
    "x" * 255,
    "x" * 254 + "y",
    "é" * 255,
    "$dead.jobs",
    "a b",
    "~tilde",
    "",
]


async def test_hostile_names_stay_inside_and_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "data"
    names = list(dict.fromkeys(HOSTILE_NAMES))
    async with opened(root) as store:
        for i, name in enumerate(names):
            results = await store.append([qapp(f"q{i}", queue=name), tapp(f"t{i}", topic=name)])
            assert [r.failure for r in results] == [None, None]
    entries = list(root.rglob("*"))
    resolved_root = root.resolve()
    for path in entries:
        assert path.resolve().is_relative_to(resolved_root), path
    for kind in ("queues", "topics"):
        directories = [p.name for p in (root / kind).iterdir()]
        assert len(directories) == len(names)
        # Distinct even where the file system ignores case.
        assert len({d.casefold() for d in directories}) == len(names)
        assert all(len(d.encode()) <= 255 for d in directories)
    assert set(os.listdir(tmp_path)) == {"data"}
    async with opened(root) as store:
        stats = await store.stats()
        assert set(stats.queues) == set(names)
        assert set(stats.topics) == set(names)
        for i, name in enumerate(names):
            assert await ids_of(store, name) == [f"q{i}"]
            read = await store.read(name, 0, 10)
            assert [m.message_id for m in read.messages] == [f"t{i}"]


# -- space: segments, deletion, compaction, retention ------------------------------


def disk_usage(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


async def test_disk_usage_stays_bounded_under_publish_ack_loop(tmp_path: Path) -> None:
    segment_bytes = 4096
    async with opened(tmp_path, segment_bytes=segment_bytes, fsync=FsyncPolicy.NEVER) as store:
        peak = 0
        for round_ in range(300):
            await store.append([qapp(*ids(f"r{round_}-", 10))])
            [ds] = await store.claim([Claim(Q, ("c",) * 10)])
            await store.settle([settle("c", *[d.message_id for d in ds])])
            await store.maintain(1000.0 + round_)
            peak = max(peak, disk_usage(tmp_path))
        # 300 rounds wrote ~900 KiB of records; only about two segments are ever kept.
        assert peak < 4 * segment_bytes
        assert len(segment_files(tmp_path)) <= 2


async def test_compaction_moves_live_messages_and_keeps_order(tmp_path: Path) -> None:
    async with opened(tmp_path, segment_bytes=2048) as store:
        await store.append([qapp(*[f"m{i:03}" for i in range(200)])])
        [ds] = await store.claim([Claim(Q, ("c",) * 200)])
        keep = {"m005", "m050", "m120"}
        await store.settle([settle("c", *[d.message_id for d in ds if d.message_id not in keep])])
        await store.settle([settle("c", "m050", outcome=Outcome.REQUEUE)])
        before = len(segment_files(tmp_path))
        for i in range(before):
            await store.maintain(1000.0 + i)
        after = segment_files(tmp_path)
        assert len(after) <= 2 < before
        # m005 and m120 are still in flight: compaction does not disturb deliveries.
        assert (await store.stats()).queues[Q].in_flight == 2
    async with opened(tmp_path, segment_bytes=2048) as store:
        assert await drain(store) == [("m005", 2), ("m050", 2), ("m120", 2)]


async def test_retention_deletes_segments_and_survives_restart(tmp_path: Path) -> None:
    retention = Retention(max_messages=20, max_bytes=None, max_age=None)
    async with opened(tmp_path, segment_bytes=1024, retention=retention) as store:
        for i in range(200):
            await store.append([tapp(f"t{i}")])
        before = len(segment_files(tmp_path, "topics", T))
        await store.maintain(2000.0)
        stats = (await store.stats()).topics[T]
        assert 20 <= stats.retained < 40
        assert len(segment_files(tmp_path, "topics", T)) < before
    async with opened(tmp_path, segment_bytes=1024, retention=retention) as store:
        again = (await store.stats()).topics[T]
        assert (again.first, again.end) == (stats.first, stats.end)
        read = await store.read(T, 0, 1000)
        assert read.first == stats.first
        assert [m.position for m in read.messages] == list(range(stats.first, 200))


async def test_cursor_log_is_compacted(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        await store.append([tapp("t0")])
        commits = [CursorCommit(T, f"c{i % 5}", i) for i in range(6000)]
        assert await store.commit_cursors(commits) == [None] * 6000
        path = segment_files(tmp_path, "topics", T)[0].parent / "cursors.log"
        before = path.stat().st_size
        await store.maintain(1000.0)
        assert path.stat().st_size < before // 100
        await store.commit_cursors([CursorCommit(T, "c0", 7)])
    async with opened(tmp_path) as store:
        cursors = dict((await store.stats()).topics[T].cursors)
        assert cursors == {"c0": 7, "c1": 5996, "c2": 5997, "c3": 5998, "c4": 5999}


async def test_cursor_log_of_few_large_records_is_compacted(tmp_path: Path) -> None:
    # Under the record-count trigger, but large: a subscriber holding every other
    # message writes one range per acked message into each record.
    acked = tuple((p, p) for p in range(2, 40_000, 2))
    async with opened(tmp_path) as store:
        await store.append([tapp("t0")])
        commit = CursorCommit(T, "held", 0, acked)
        for _ in range(20):
            assert await store.commit_cursors([commit]) == [None]
        path = segment_files(tmp_path, "topics", T)[0].parent / "cursors.log"
        before = path.stat().st_size
        assert before > 4 * 1024 * 1024  # 20 records, each ~250 KB
        await store.maintain(1000.0)
        after = path.stat().st_size
        assert after < before // 10
        await store.maintain(2000.0)
        assert path.stat().st_size == after  # nothing new: no second rewrite
    async with opened(tmp_path) as store:
        cursor = await store.open_cursor(T, "held")
        assert (cursor.position, cursor.acked) == (0, acked)


async def test_acked_ranges_survive_a_restart_and_the_cursor_log_rewrite(
    tmp_path: Path,
) -> None:
    acked = ((2, 999), (1001, 1001))
    async with opened(tmp_path) as store:
        await store.append([tapp(*ids("t", 1005))])
        await store.commit_cursors([CursorCommit(T, "held", 0, acked)])
        await store.commit_cursors([CursorCommit(T, "plain", 3)])
    path = segment_files(tmp_path, "topics", T)[0].parent / "cursors.log"
    # Readable as it is: the ranges are [first, last] pairs, both ends included.
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["name"], r["pos"], r.get("acked")) for r in lines] == [
        ("held", 0, [[2, 999], [1001, 1001]]),
        ("plain", 3, None),
    ]
    async with opened(tmp_path) as store:
        assert await store.open_cursor(T, "held") == Cursor(0, acked)
        assert await store.open_cursor(T, "plain") == Cursor(3)
        # Enough commits of another cursor for maintenance to rewrite the file.
        commits = [CursorCommit(T, "busy", i) for i in range(5000)]
        assert await store.commit_cursors(commits) == [None] * 5000
        before = path.stat().st_size
        await store.maintain(1000.0)
        assert path.stat().st_size < before // 100
    async with opened(tmp_path) as store:
        assert await store.open_cursor(T, "held") == Cursor(0, acked)
        assert dict((await store.stats()).topics[T].cursors_acked) == {"held": 999}


async def test_cursor_records_without_acked_ranges_still_load(tmp_path: Path) -> None:
    # cursors.log as brokers wrote it before acked ranges existed.
    async with opened(tmp_path) as store:
        await store.append([tapp(*ids("t", 5))])
        await store.open_cursor(T, "old")
    path = segment_files(tmp_path, "topics", T)[0].parent / "cursors.log"
    path.write_bytes(
        records.cursor_record("old", 2)
        + records.cursor_record("other", 4)
        # What such a broker wrote, byte for byte:
        + b'{"op":"cur","name":"third","pos":1,"crc":"%08x"}\n'
        % zlib.crc32(b'{"op":"cur","name":"third","pos":1')
    )
    async with opened(tmp_path) as store:
        assert await store.open_cursor(T, "old") == Cursor(2)
        assert await store.open_cursor(T, "other") == Cursor(4)
        assert await store.open_cursor(T, "third") == Cursor(1)


@pytest.mark.parametrize(
    "acked",
    [b'"2-3"', b"[[2]]", b"[[3,2]]", b"[[1,2]]", b'[[2,"3"]]', b"[[5,6],[2,3]]", b"[[2,3],[4,5]]"],
)
async def test_a_cursor_record_with_unusable_ranges_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, acked: bytes
) -> None:
    caplog.set_level(logging.ERROR, logger=STORAGE_LOGGER)
    async with opened(tmp_path) as store:
        await store.append([tapp(*ids("t", 10))])
        await store.commit_cursors([CursorCommit(T, "c", 0, ((3, 4),))])
    path = segment_files(tmp_path, "topics", T)[0].parent / "cursors.log"
    body = b'{"op":"cur","name":"c","pos":1,"acked":%b' % acked
    with path.open("ab") as file:
        file.write(b'%b,"crc":"%08x"}\n' % (body, zlib.crc32(body)))
    async with opened(tmp_path) as store:
        # The checksum matched, but a replay cannot use it: skipped, the earlier
        # state stands, and one error names the file.
        assert await store.open_cursor(T, "c") == Cursor(0, ((3, 4),))
    [error] = storage_logs(caplog, logging.ERROR)
    assert "cursors.log" in error.getMessage()


async def test_large_payloads_read_back(tmp_path: Path) -> None:
    big = b'"' + b"z" * 300_000 + b'"'
    async with opened(tmp_path, segment_bytes=100_000) as store:
        await store.append([Append(Kind.TOPIC, T, ids("b", 3), [big] * 3, 1.0)])
    async with opened(tmp_path, segment_bytes=100_000) as store:
        read = await store.read(T, 1, 5)
        assert [m.message_id for m in read.messages] == ["b1", "b2"]
        assert read.messages[0].payload == big


# -- locking ----------------------------------------------------------------------------


async def test_lock_prevents_second_open(tmp_path: Path) -> None:
    async with opened(tmp_path):
        second = FileStore(tmp_path)
        with pytest.raises(StorageError, match="in use"):
            await second.open()
    async with opened(tmp_path) as store:
        assert store.writable() is None


# -- durability and group commit ----------------------------------------------------


async def test_always_syncs_before_append_returns(tmp_path: Path) -> None:
    fs = CountingFS()
    async with opened(tmp_path, fs=fs) as store:
        before = fs.syncs
        await store.append([qapp("m0")])
        assert fs.syncs > before
        synced = fs.syncs
        await store.claim([Claim(Q, ("c",))])
        assert fs.syncs == synced  # claims without auto_ack write nothing
        await store.settle([settle("c", "m0")])
        assert fs.syncs > synced
        assert threading.get_ident() not in fs.sync_threads


async def test_concurrent_appends_share_fsyncs(tmp_path: Path) -> None:
    fs = GatedFS()
    loop = asyncio.get_running_loop()
    async with opened(tmp_path, fs=fs) as store:
        fs.gate.set()
        await store.append([qapp("warm-up")])
        fs.gate.clear()
        fs.entered.clear()
        syncs = fs.syncs
        first = asyncio.create_task(store.append([qapp("m0")]))
        assert await loop.run_in_executor(None, fs.entered.wait, 10)
        writes = fs.writes
        rest = [asyncio.create_task(store.append([qapp(f"m{i}")])) for i in range(1, 11)]
        await asyncio.sleep(0)  # let every task write
        assert fs.writes == writes + 10  # written at once, not waiting for the fsync
        assert not first.done()
        fs.gate.set()
        results = await asyncio.gather(first, *rest)
        assert all(r[0].failure is None for r in results)
        assert fs.syncs - syncs == 2  # one running round, then one for all ten
        assert await ids_of(store) == ["warm-up"] + [f"m{i}" for i in range(11)]


async def test_message_not_claimable_until_append_completes(tmp_path: Path) -> None:
    fs = GatedFS()
    loop = asyncio.get_running_loop()
    async with opened(tmp_path, fs=fs) as store:
        pending = asyncio.create_task(store.append([qapp("m0"), tapp("t0")]))
        assert await loop.run_in_executor(None, fs.entered.wait, 10)
        assert await store.claim([Claim(Q, ("c",))]) == [[]]
        assert (await store.read(T, 0, 10)).messages == ()
        assert (await store.stats()).queues[Q].ready == 0
        fs.gate.set()
        await pending
        assert await ids_of(store) == ["m0"]
        assert [m.message_id for m in (await store.read(T, 0, 10)).messages] == ["t0"]


async def test_settle_racing_release_while_fsync_runs(tmp_path: Path) -> None:
    fs = GatedFS()
    fs.gate.set()
    loop = asyncio.get_running_loop()
    async with opened(tmp_path, fs=fs) as store:
        await store.append([qapp("m0", "m1")])
        await store.claim([Claim(Q, ("a", "a"))])
        fs.gate.clear()
        fs.entered.clear()
        settling = asyncio.create_task(store.settle([settle("a", "m0")]))
        assert await loop.run_in_executor(None, fs.entered.wait, 10)
        assert await store.release(Q, "a") == 1  # m1 only
        assert await store.reclaim(float("inf")) == []
        fs.gate.set()
        [settled] = await settling
        assert settled == Settled()
        assert await ids_of(store) == ["m1"]


async def test_cancelled_append_still_takes_effect(tmp_path: Path) -> None:
    fs = GatedFS()
    loop = asyncio.get_running_loop()
    async with opened(tmp_path, fs=fs) as store:
        pending = asyncio.create_task(store.append([qapp("m0")]))
        assert await loop.run_in_executor(None, fs.entered.wait, 10)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        fs.gate.set()
        await store.append([qapp("m1")])
        assert await ids_of(store) == ["m0", "m1"]


async def test_everysec_syncs_in_maintain(tmp_path: Path) -> None:
    fs = CountingFS()
    async with opened(tmp_path, fs=fs, fsync=FsyncPolicy.EVERYSEC) as store:
        at_open = fs.syncs  # opening makes the directories it created durable
        await store.append([qapp("m0")])
        assert fs.syncs == at_open
        await store.maintain(100.0)
        synced = fs.syncs
        assert synced > at_open
        await store.append([qapp("m1")])
        await store.maintain(100.5)
        assert fs.syncs == synced
        await store.maintain(101.0)
        assert fs.syncs > synced
        assert threading.get_ident() not in fs.sync_threads


async def test_never_syncs_only_on_close(tmp_path: Path) -> None:
    fs = CountingFS()
    store = FileStore(tmp_path, fs=fs, fsync=FsyncPolicy.NEVER)
    await store.open()
    at_open = fs.syncs  # opening makes the directories it created durable
    await store.append([qapp(*ids("m", 10))])
    await store.maintain(100.0)
    await store.maintain(200.0)
    assert fs.syncs == at_open
    await store.close()
    assert fs.syncs > at_open


# -- faults -----------------------------------------------------------------------------


async def test_disk_full_fails_items_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    fs = LimitedFS()
    async with opened(tmp_path, fs=fs) as store:
        await store.append([qapp("m0"), tapp("t0")])
        [path] = segment_files(tmp_path)
        size = path.stat().st_size
        fs.space = 100  # part of the batch fits: a partial write, then ENOSPC
        results = await store.append([qapp(*ids("m", 10, 1)), tapp("t1")])
        assert [(len(r.positions), r.failure) for r in results] == [
            (0, StoreFailure.STORAGE_FULL)
        ] * 2
        assert results[0].detail
        assert path.stat().st_size == size  # the partial record was cut off
        assert store.writable() is None
        assert (await store.stats()).queues[Q].ready == 1
        assert len(storage_logs(caplog, logging.ERROR)) == 1  # once, not per batch
        # A settle that cannot be logged leaves the message in flight.
        await store.claim([Claim(Q, ("c",))])
        fs.space = 0
        [settled] = await store.settle([settle("c", "m0")])
        assert settled == Settled(failure=StoreFailure.STORAGE_FULL)
        assert (await store.stats()).queues[Q].in_flight == 1
        # A new queue cannot even be created.
        [created] = await store.append([qapp("n0", queue="new")])
        assert created.failure is StoreFailure.STORAGE_FULL
        fs.space = None  # space was freed
        [settled] = await store.settle([settle("c", "m0")])
        assert settled == Settled()
        results = await store.append([qapp("m1"), tapp("t1"), qapp("n0", queue="new")])
        assert [r.failure for r in results] == [None, None, None]
        assert list(results[1].positions) == [1]  # no position was lost to the failed batch
    async with opened(tmp_path) as store:
        assert await ids_of(store) == ["m1"]
        assert await ids_of(store, "new") == ["n0"]
        assert [m.message_id for m in (await store.read(T, 0, 10)).messages] == ["t0", "t1"]


async def test_fsync_failure_turns_store_read_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    fs = FailingSyncFS()
    async with opened(tmp_path, fs=fs) as store:
        await store.append([qapp("m0", "m1")])
        await store.claim([Claim(Q, ("c",))])
        fs.broken = True
        results = await store.append([qapp("m2"), tapp("t0")])
        assert {r.failure for r in results} == {StoreFailure.STORAGE_ERROR}
        assert store.writable() is StoreFailure.STORAGE_ERROR
        assert (await store.stats()).read_only is StoreFailure.STORAGE_ERROR
        errors = storage_logs(caplog, logging.ERROR)
        assert len(errors) == 1
        assert "read-only" in errors[0].getMessage()
        fs.broken = False  # even if the disk seems fine again: no retry-then-ack
        [later] = await store.append([qapp("m3")])
        assert later.failure is StoreFailure.STORAGE_ERROR
        [settled] = await store.settle([settle("c", "m0")])
        assert settled == Settled(failure=StoreFailure.STORAGE_ERROR)
        assert await store.commit_cursors([CursorCommit(T, "x", 0)]) == [StoreFailure.STORAGE_ERROR]
        # The failed message never became claimable; what was there still is.
        assert await ids_of(store) == ["m1"]


async def test_closed_store_refuses_operations(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store.open()
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StorageError):
        await store.append([qapp("m0")])


async def test_failed_write_keeps_only_messages_stored_before(tmp_path: Path) -> None:
    fs = LimitedFS()
    async with opened(tmp_path, fs=fs) as store:
        await store.append([qapp("m0", "m1"), tapp("t0")])
        fs.space = 0
        results = await store.append([qapp("m1", "m2", "m0"), tapp("t0", "t1")])
        # m1 and t0 were stored before; m2 and t1 were in the failed write.
        assert [(list(r.positions), r.failure) for r in results] == [
            ([1], StoreFailure.STORAGE_FULL),
            ([0], StoreFailure.STORAGE_FULL),
        ]
        fs.space = None
        results = await store.append([qapp("m2"), tapp("t1")])
        assert [r.positions for r in results] == [range(2, 3), range(1, 2)]


async def test_bad_id_fails_the_call_and_stages_nothing(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        bad = Append(Kind.QUEUE, Q, ["m1", "\ud800"], [b"1", b"2"], 1.0)
        with pytest.raises((TypeError, ValueError)):
            await store.append([qapp("m0"), tapp("t0"), bad])
        assert (await store.stats()).queues[Q].ready == 0
        results = await store.append([qapp("m0", "m1"), tapp("t0")])
        assert [r.positions for r in results] == [range(2), range(1)]
        assert await ids_of(store) == ["m0", "m1"]
    async with opened(tmp_path) as store:
        assert await ids_of(store) == ["m0", "m1"]


async def test_queue_full_prefix_survives_restart(tmp_path: Path) -> None:
    async with opened(tmp_path, max_queue_messages=3) as store:
        [result] = await store.append([qapp("m0", "m1", "m0", "m2", "m3", "m4")])
        assert list(result.positions) == [0, 1, 0, 2]
        assert result.failure is StoreFailure.QUEUE_FULL
    async with opened(tmp_path, max_queue_messages=3) as store:
        assert await ids_of(store) == ["m0", "m1", "m2"]
        [again] = await store.append([qapp("m3")])
        assert again.failure is StoreFailure.QUEUE_FULL


async def test_sparse_index_of_batches_matches_the_one_rebuilt_at_start_up(
    tmp_path: Path,
) -> None:
    async def marks(store: FileStore) -> list[tuple[int, list[int], list[int], int]]:
        log = store._topics[T]  # white box: the index a read bisects
        return [(s.number, s.marks, s.mark_offsets, s.unmarked) for s in log.segments]

    rng = random.Random(7)
    async with opened(tmp_path, segment_bytes=64 * 1024) as store:
        for batch in range(60):
            count = rng.randint(1, 80)
            message_ids = [f"b{batch}-{i}" for i in range(count)]
            payloads = [b'"%s"' % (b"x" * rng.randint(0, 600)) for _ in range(count)]
            await store.append([Append(Kind.TOPIC, T, message_ids, payloads, 1.0)])
        written = await marks(store)
        assert sum(len(m) for _, m, _, _ in written) > 20
    async with opened(tmp_path, segment_bytes=64 * 1024) as store:
        assert await marks(store) == written
        read = await store.read(T, 1234, 3)
        assert [m.position for m in read.messages] == [1234, 1235, 1236]


async def test_read_ends_at_a_damaged_tail_of_an_older_segment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: bytes without a newline at the end of a segment that is not the
    # newest (a torn write a later segment survived, or a bad sector) made read()
    # loop forever on the event loop, doubling its chunk size to read the same bytes.
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    async with opened(tmp_path, segment_bytes=1024) as store:
        for i in range(40):
            await store.append([tapp(f"t{i}")])
    first, *rest = segment_files(tmp_path, "topics", T)
    assert rest
    with first.open("ab") as file:
        file.write(b'{"op":"pub","seq":999,"id":"torn","ts":1')
    async with opened(tmp_path, segment_bytes=1024) as store:
        async with asyncio.timeout(10):
            read = await store.read(T, 0, 1000)
            again = await store.read(T, 0, 1000)
        assert [m.message_id for m in read.messages] == [f"t{i}" for i in range(40)]
        assert again.messages == read.messages
    errors = storage_logs(caplog, logging.ERROR)
    assert len(errors) == 1  # reported once, at start-up; reads do not repeat it
    assert str(first) in errors[0].getMessage()


class FreeSpaceFS(FileSystem):
    """Reports ``free`` bytes and counts the statvfs calls."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.checks = 0

    def free_bytes(self, path: str) -> int:
        self.checks += 1
        return self.free


async def test_free_space_is_read_at_most_once_an_interval(tmp_path: Path) -> None:
    fs = FreeSpaceFS(10**9)
    async with opened(tmp_path, fs=fs, min_free_bytes=10**6, free_check_interval=3600) as store:
        for batch in range(100):
            [result] = await store.append([qapp(*ids(f"b{batch}-", 10))])
            assert result.failure is None
            assert store.writable() is None
        assert fs.checks == 1  # at open; 1,000 messages and 200 checks later, no more
        # The store counts its own writes: crossing the mark needs no statvfs.
        fs.free = 0  # (not seen before the interval ends)
        store._free = 10**6 + 10  # white box: as if the disk had just that much left
        [result] = await store.append([qapp("big", payload=b'"' + b"x" * 1000 + b'"')])
        assert result.failure is None  # written: it was above the mark when it started
        assert store.writable() is StoreFailure.STORAGE_FULL
        [refused] = await store.append([qapp("next")])
        assert refused.failure is StoreFailure.STORAGE_FULL
        assert fs.checks == 1


async def test_free_space_watermark_off_by_default(tmp_path: Path) -> None:
    fs = FreeSpaceFS(0)
    async with opened(tmp_path, fs=fs) as store:
        [result] = await store.append([qapp("m0")])
        assert result.failure is None
        assert store.writable() is None
    assert fs.checks == 0


async def test_topic_read_salvages_a_record_glued_on_by_a_damaged_newline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression (found by tests/durability/test_corrupt.py): recovery salvaged the
    # record after a damaged newline, but a topic read split on newlines and dropped
    # both records of the glued line.
    caplog.set_level(logging.WARNING, logger=STORAGE_LOGGER)
    async with opened(tmp_path) as store:
        await store.append([tapp(*ids("t", 5))])
    [path] = segment_files(tmp_path, "topics", T)
    data = bytearray(path.read_bytes())
    second = data.index(b"\n") + 1
    data[second + 30] ^= 0x20  # the second record is corrupt...
    data[data.index(b"\n", second)] = 0x1A  # ...and its newline damaged
    path.write_bytes(bytes(data))
    async with opened(tmp_path) as store:
        read = await store.read(T, 0, 10)
        assert [m.message_id for m in read.messages] == ["t0", "t2", "t3", "t4"]
        assert [m.message_id for m in (await store.read(T, 2, 1)).messages] == ["t2"]
    assert len(storage_logs(caplog, logging.ERROR)) == 1
