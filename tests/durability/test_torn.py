"""Torn tails: a log cut anywhere inside its last records, or followed by garbage.

For every cut point inside the last three records of a queue segment, a topic
segment and a ``cursors.log`` (every byte offset that is not a record boundary), and
for each kind of garbage a crash or a bad disk leaves after the last record, the
store must: start; keep every complete record (a record is complete with its
newline: a crash that lost the newline lost an unacknowledged write); log exactly
one WARNING, naming the file and the offset where the bad bytes begin, and no ERROR;
and keep working: a new write lands after the good records and a restart finds a
clean log. A broker-level test starts a whole Server on a torn log and serves it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from msg.broker.server import Server
from msg.config import Config
from msg.persistence import Append, Claim, CursorCommit, Kind, Outcome, Settle
from msg.storage.filenames import encode_name
from msg.storage.filestore import FileStore
from tests.integration.raw import Raw

Q = "jobs"
T = "news"
CURSOR = "reader"
STORAGE = "msg.storage"


def storage_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(STORAGE) and r.levelno == level]


def only_file(directory: Path, pattern: str = "*.log") -> Path:
    [path] = [p for p in directory.glob(pattern) if p.name != "cursors.log"]
    return path


async def queue_ids(store: FileStore) -> list[str]:
    [deliveries] = await store.claim([Claim(Q, ("peek",) * 1000)])
    await store.release(Q, "peek")
    return [d.message_id for d in deliveries]


async def topic_ids(store: FileStore) -> list[str]:
    return [m.message_id for m in (await store.read(T, 0, 1000)).messages]


async def cursor_of(store: FileStore) -> int | None:
    stats = (await store.stats()).topics.get(T)
    return None if stats is None else stats.cursors.get(CURSOR)


# Each kind of log: how to fill it, which file it is, what a replay of some prefix of
# its records means, how to read that back, and how to add one more record.
async def fill_queue(store: FileStore) -> None:
    for i in range(5):
        await store.append([Append(Kind.QUEUE, Q, [f"m{i}"], [b'{"n":%d}' % i], 1.0)])
    await store.claim([Claim(Q, ("c", "c"))])
    await store.settle([Settle(Q, "c", ["m1"], Outcome.ACK)])


def replay_queue(lines: list[bytes]) -> list[str]:
    ids = [f"m{i}" for i in range(5) if any(b'"id":"m%d"' % i in line for line in lines)]
    if any(b'"op":"ack"' in line for line in lines):
        ids.remove("m1")
    return ids


async def fill_topic(store: FileStore) -> None:
    for i in range(5):
        await store.append([Append(Kind.TOPIC, T, [f"t{i}"], [b'"%d"' % i], 1.0)])


def replay_topic(lines: list[bytes]) -> list[str]:
    return [f"t{i}" for i in range(len(lines))]


async def fill_cursors(store: FileStore) -> None:
    await store.append([Append(Kind.TOPIC, T, ["t0"], [b"0"], 1.0)])
    for position in range(5):
        await store.commit_cursors([CursorCommit(T, CURSOR, position)])


def replay_cursors(lines: list[bytes]) -> int | None:
    return len(lines) - 1 if lines else None


async def add_queue(store: FileStore) -> None:
    await store.append([Append(Kind.QUEUE, Q, ["new"], [b"{}"], 2.0)])


async def add_topic(store: FileStore) -> None:
    await store.append([Append(Kind.TOPIC, T, ["new"], [b"{}"], 2.0)])


async def add_cursor(store: FileStore) -> None:
    await store.commit_cursors([CursorCommit(T, CURSOR, 1)])


@dataclass(frozen=True)
class LogKind:
    fill: Callable[[FileStore], Awaitable[None]]
    path: Callable[[Path], Path]
    replay: Callable[[list[bytes]], object]
    """What the store should report after replaying these complete lines."""
    read: Callable[[FileStore], Awaitable[object]]
    add: Callable[[FileStore], Awaitable[None]]
    """One more write, and what replay reports after it (from the kept lines)."""
    after_add: Callable[[Any], object]


KINDS = {
    "queue": LogKind(
        fill_queue,
        lambda root: only_file(root / "queues" / encode_name(Q)),
        replay_queue,
        queue_ids,
        add_queue,
        lambda kept: [*kept, "new"],
    ),
    "topic": LogKind(
        fill_topic,
        lambda root: only_file(root / "topics" / encode_name(T)),
        replay_topic,
        topic_ids,
        add_topic,
        lambda kept: [*kept, "new"],
    ),
    "cursors": LogKind(
        fill_cursors,
        lambda root: root / "topics" / encode_name(T) / "cursors.log",
        replay_cursors,
        cursor_of,
        add_cursor,
        lambda kept: 1,
    ),
}


async def open_and_check(
    root: Path,
    kind: LogKind,
    expected: object,
    path: Path,
    bad_at: int,
    caplog: pytest.LogCaptureFixture,
    why: str,
) -> None:
    """Open on a damaged log: it starts, keeps the good records, warns exactly once,
    and keeps working."""
    caplog.clear()
    store = FileStore(root)
    recovery = await store.open()
    try:
        assert await kind.read(store) == expected, why
        await kind.add(store)
    finally:
        await store.close()
    warnings = storage_records(caplog, logging.WARNING)
    assert len(warnings) == 1, (why, [w.getMessage() for w in warnings])
    message = warnings[0].getMessage()
    assert str(path) in message, why
    assert f"offset {bad_at} " in message, (why, message)
    assert storage_records(caplog, logging.ERROR) == [], why
    assert recovery.torn_records == 1, why
    caplog.clear()
    store = FileStore(root)
    recovery = await store.open()
    try:
        assert await kind.read(store) == kind.after_add(expected), why
    finally:
        await store.close()
    assert (recovery.torn_records, recovery.corrupt_records) == (0, 0), why
    assert storage_records(caplog, logging.WARNING) == [], why


@pytest.mark.parametrize("name", list(KINDS))
async def test_every_cut_inside_the_last_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE)
    kind = KINDS[name]
    root = tmp_path / "data"
    store = FileStore(root)
    await store.open()
    try:
        await kind.fill(store)
    finally:
        await store.close()
    path = kind.path(root)
    data = path.read_bytes()
    starts = [0, *[i + 1 for i, byte in enumerate(data) if byte == ord("\n")]]
    assert starts[-1] == len(data)
    cuts = 0
    for record in range(len(starts) - 4, len(starts) - 1):
        for cut in range(starts[record] + 1, starts[record + 1]):
            path.write_bytes(data[:cut])
            lines = data[: starts[record]].splitlines()
            await open_and_check(
                root, kind, kind.replay(lines), path, starts[record], caplog, f"cut at {cut}"
            )
            cuts += 1
    assert cuts > 100


GARBAGE = {
    "zeros": bytes(4096),
    "zeros-and-newlines": b"\0" * 100 + b"\n" + b"\0" * 50 + b"\n",
    "random": random.Random(1).randbytes(3000),
    "random-lines": b"\n".join(random.Random(2).randbytes(40) for _ in range(20)),
    "half-record": b'{"op":"pub","seq":99,"id":"x","ts":1.0,"msg":{"n":',
    "bad-checksum": b'{"op":"pub","seq":99,"id":"x","ts":1.0,"msg":1,"crc":"00000000"}\n',
    "text": b"this is not a record\nnor this\n",
    "newlines": b"\n\n\n",
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
@pytest.mark.parametrize("name", list(KINDS))
async def test_garbage_after_the_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, garbage: str
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE)
    kind = KINDS[name]
    root = tmp_path / "data"
    store = FileStore(root)
    await store.open()
    try:
        await kind.fill(store)
    finally:
        await store.close()
    path = kind.path(root)
    data = path.read_bytes()
    path.write_bytes(data + GARBAGE[garbage])
    await open_and_check(
        root, kind, kind.replay(data.splitlines()), path, len(data), caplog, garbage
    )


async def test_broker_starts_on_a_torn_log_and_serves_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE)
    root = tmp_path / "data"
    store = FileStore(root)
    await store.open()
    try:
        await store.append(
            [Append(Kind.QUEUE, Q, [f"m{i}"], [b'{"n":%d}' % i], 1.0) for i in range(3)]
        )
    finally:
        await store.close()
    path = KINDS["queue"].path(root)
    data = path.read_bytes()
    cut = data.rindex(b"\n", 0, len(data) - 1) + 1
    path.write_bytes(data[: cut + 20])  # the last record, torn 20 bytes in
    caplog.clear()
    server = Server(Config(host="127.0.0.1", port=0, data_dir=root, min_free_bytes=0))
    await server.start()
    try:
        client = await Raw.connect(server.addresses[0][1])
        try:
            reply = await client.request(
                {"action": "subscribe", "topic": Q, "mode": "queue", "ack": "manual"}
            )
            assert reply["type"] == "ack"
            got = [await client.recv(), await client.recv()]
            assert [m["message"] for m in got] == [{"n": 0}, {"n": 1}]
            published = await client.request(
                {"action": "publish", "topic": Q, "mode": "queue", "message": {"n": 3}}
            )
            assert published["type"] == "ack"
            assert (await client.recv())["message"] == {"n": 3}
        finally:
            await client.close()
    finally:
        await server.stop()
    warnings = storage_records(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    assert f"offset {cut} " in warnings[0].getMessage()
    assert storage_records(caplog, logging.ERROR) == []
