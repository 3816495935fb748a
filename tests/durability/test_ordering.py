"""In ``always`` mode no ack leaves the broker before the fsync that covers its record.

Theory of operation
-------------------
An in-process :class:`~msg.broker.server.Server` runs with a
:class:`~msg.storage.filestore.FileStore` whose file system is a
:class:`RecordingFileSystem`: every write, sync, file creation, directory creation
and rename goes into one :class:`Trace`, in the order the calls happened. A sync
gets two entries, when it starts and when it returns: it covers the writes that
completed before it *started*, and what it covers is durable only once it has
*returned*. The server is a :class:`RecordingServer`, which wraps each connection's
transport in a :class:`RecordingTransport`, so every byte the broker hands to a
socket is in the same trace, in order with the storage calls. (The file system and
the transport are the broker's own seams; nothing global is patched.)

Clients on raw sockets publish pipelined streams to a queue and a topic, a consumer
acks every queue message, and a durable subscriber acks every topic message (some
out of order). Their
request ids say what each reply answers (``p…`` a publish, ``a…`` a queue ack,
``c…`` a durable ack). Afterwards, :func:`violations` checks, for every reply the
broker sent, that before it was sent:

- **publish ack** of message M: the write holding M's ``pub`` record was covered by a
  completed sync of its file;
- **queue ack reply** for M: the write holding the ``ack`` record of M's sequence
  number was covered by a completed sync of its file;
- **durable ack reply** for M at position P: a ``cur`` record of that subscription
  that has P done (its floor past P, or P in its acked ranges) was written and
  covered by a completed sync. The durable subscriber holds some messages back and
  acks them after later ones, so many replies rest on the acked ranges;

and in every case, that the record can be *found* after a power loss: each file and
directory on its path that was created during the run has its directory entry
synced (a sync of the parent directory that started after the creation ended before
the send), and the log's ``meta.json``, written to a temporary file and renamed into
place, had its contents and its directory synced after the rename.

The same run with ``--fsync everysec`` must show violations (its acks do not wait for
the sync): that proves the check can fail.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from msg.broker.connection import Connection
from msg.broker.server import Server
from msg.config import Config
from msg.persistence import FsyncPolicy
from msg.storage.filestore import FileStore
from msg.storage.fs import FileSystem
from tests.integration.raw import Raw

log = logging.getLogger(__name__)

PUBLISHERS = 3
PER_PUBLISHER = 1000
QUEUE = "jobs"
TOPIC = "news"
DURABLE = "audit"
WAIT = 15.0
KINDS = {"p": "publish", "a": "queue ack", "c": "durable ack"}
"""What a reply answers, by the first letter of its request id."""


@dataclass(frozen=True, slots=True)
class Event:
    """One recorded call. ``seq`` orders every event; a sync has a start and an end."""

    seq: int
    kind: str
    """write, sync, create, mkdir, rename, write_file, send."""
    path: str = ""
    data: bytes = b""
    end: int = 0
    """For syncs: the sequence number taken when the sync returned."""
    connection: int = 0
    """For sends: the broker's connection id."""


class Trace:
    """The ordered record shared by the file system (two threads) and the transports."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    def next(self) -> int:
        with self._lock:
            return next(self._seq)

    def add(self, kind: str, **fields: Any) -> None:
        """Record a call that just returned."""
        with self._lock:
            self.events.append(Event(next(self._seq), kind, **fields))

    def add_span(self, kind: str, start: int, **fields: Any) -> None:
        """Record a call that began at ``start`` (from :meth:`next`) and just returned."""
        with self._lock:
            self.events.append(Event(start, kind, end=next(self._seq), **fields))


class RecordingFileSystem(FileSystem):
    """The real file system, recording what the broker's durability depends on."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self._paths: dict[int, str] = {}

    def open(self, path: str) -> int:
        existed = os.path.exists(path)
        fd = super().open(path)
        self._paths[fd] = path
        if not existed:
            self.trace.add("create", path=path)
        return fd

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        written = super().pwrite(fd, data, offset)
        self.trace.add("write", path=self._paths[fd], data=bytes(data[:written]))
        return written

    def sync(self, fd: int) -> None:
        start = self.trace.next()
        super().sync(fd)
        self.trace.add_span("sync", start, path=self._paths[fd])

    def sync_path(self, path: str) -> None:
        start = self.trace.next()
        super().sync_path(path)
        self.trace.add_span("sync", start, path=path)

    def write_file(self, path: str, data: bytes) -> None:
        super().write_file(path, data)
        self.trace.add("write_file", path=path, data=data)

    def rename(self, source: str, target: str) -> None:
        super().rename(source, target)
        self.trace.add("rename", path=target, data=source.encode())

    def makedirs(self, path: str) -> None:
        missing = []
        head = path
        while head and not os.path.exists(head):
            missing.append(head)
            head = os.path.dirname(head)
        super().makedirs(path)
        for directory in reversed(missing):
            self.trace.add("mkdir", path=directory)


class RecordingTransport(asyncio.Transport):
    """A transport that records every write into the trace, then passes it on."""

    def __init__(self, inner: asyncio.Transport, trace: Trace, connection: int) -> None:
        super().__init__()
        self.inner = inner
        self.trace = trace
        self.connection = connection

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.trace.add("send", data=bytes(data), connection=self.connection)
        self.inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def is_reading(self) -> bool:
        return self.inner.is_reading()

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def can_write_eof(self) -> bool:
        return self.inner.can_write_eof()

    def write_eof(self) -> None:
        self.inner.write_eof()

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()


class RecordingServer(Server):
    """A server whose connections write through :class:`RecordingTransport`."""

    def __init__(self, config: Config, store: FileStore, trace: Trace) -> None:
        super().__init__(config, store)
        self.trace = trace

    def connection_made(self, connection: Connection) -> None:
        if connection.transport is not None:
            connection.transport = RecordingTransport(
                connection.transport, self.trace, connection.id
            )
        super().connection_made(connection)


# -- the traffic ---------------------------------------------------------------------------


async def publisher(port: int, number: int, rng: random.Random, modes: list[str]) -> None:
    """Publish in bursts of random size, keeping up to a random window of publishes in
    flight, so the broker sees many reads, batches and sync rounds."""
    client = await Raw.connect(port)
    try:
        requests = [
            {
                "action": "publish",
                "id": f"p{number}-{n}",
                "topic": QUEUE if mode == "queue" else TOPIC,
                "mode": mode,
                "message": {"n": n, "pad": "x" * rng.randrange(2000)},
            }
            for n, mode in enumerate(modes)
        ]
        window = rng.randint(1, 200)
        sent = received = 0
        while received < len(requests):
            room = min(window - (sent - received), len(requests) - sent)
            if room > 0:
                burst = rng.randint(1, room)
                await client.send(*requests[sent : sent + burst])
                sent += burst
            reply = await client.recv()
            assert reply == {"type": "ack", "id": f"p{number}-{received}", **reply}, reply
            received += 1
    finally:
        await client.close()


async def consumer(
    port: int,
    count: int,
    subscribe: dict[str, Any],
    prefix: str,
    rng: random.Random | None = None,
) -> None:
    """Ack every delivery (id ``prefix`` + message id) until ``count`` acks are confirmed.

    With ``rng``, hold about one delivery in five back, ack the later ones, and ack the
    held ones (newest first) only once every ack sent after them was answered: each
    such answer waited for a cursor record whose floor is a held message and whose
    acked ranges hold the later one, so out-of-order acks are written as ranges
    whatever the timing."""
    client = await Raw.connect(port)
    try:
        await client.send(subscribe)
        assert (await client.recv())["type"] == "ack"
        acked = delivered = sent = 0
        held: list[str] = []
        sent_when_held = 0

        def ack(message_id: str) -> dict[str, Any]:
            return {"action": "ack", "id": prefix + message_id, "message_id": message_id}

        while acked < count:
            frame = await client.recv()
            if frame["type"] == "message":
                delivered += 1
                message_id = frame["message_id"]
                if rng is not None and rng.random() < 0.2 and len(held) < 8 and delivered < count:
                    if not held:
                        sent_when_held = sent
                    held.append(message_id)
                    continue
                await client.send(ack(message_id))
                sent += 1
            else:
                assert frame["type"] == "ack", frame
                acked += 1
            if held and acked == sent > sent_when_held:
                await client.send(*(ack(message_id) for message_id in reversed(held)))
                sent += len(held)
                held.clear()
    finally:
        await client.close()


async def run_traffic(data_dir: Path, fsync: FsyncPolicy, seed: int) -> Trace:
    """Run the traffic of the module docstring on a recording broker; return its trace."""
    trace = Trace()
    config = Config(host="127.0.0.1", port=0, data_dir=data_dir, fsync=fsync)
    server = RecordingServer(
        config, FileStore(data_dir, fsync=fsync, fs=RecordingFileSystem(trace)), trace
    )
    await server.start()
    port = server.addresses[0][1]
    rng = random.Random(seed)
    try:
        # The durable subscription exists before anything is published to its topic.
        durable = await Raw.connect(port)
        await durable.request({"action": "subscribe", "topic": TOPIC, "durable": DURABLE})
        await durable.close()
        plans = [
            [rng.choice(["queue", "pubsub"]) for _ in range(PER_PUBLISHER)]
            for _ in range(PUBLISHERS)
        ]
        queued = sum(plan.count("queue") for plan in plans)
        async with asyncio.timeout(WAIT), asyncio.TaskGroup() as group:
            for number, plan in enumerate(plans):
                group.create_task(publisher(port, number, random.Random(f"{seed}-{number}"), plan))
            group.create_task(
                consumer(
                    port,
                    queued,
                    {"action": "subscribe", "topic": QUEUE, "mode": "queue", "ack": "manual"},
                    "a",
                )
            )
            group.create_task(
                consumer(
                    port,
                    PUBLISHERS * PER_PUBLISHER - queued,
                    {"action": "subscribe", "topic": TOPIC, "durable": DURABLE, "ack": "manual"},
                    "c",
                    random.Random(f"{seed}-durable"),
                )
            )
    finally:
        await server.stop()
    return trace


# -- the check -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """A record as written: which write event completed it, and its fields."""

    event: Event
    record: dict[str, Any]


class Disk:
    """The records in the trace, indexed, and the durability rules over them."""

    def __init__(self, trace: Trace) -> None:
        self.events = trace.events
        self.pubs: dict[str, Stored] = {}
        """Message id -> its pub record."""
        self.acks: dict[tuple[str, int], Stored] = {}
        """(log directory, seq) -> the ack record."""
        self.cursors: list[Stored] = []
        self.syncs: dict[str, list[Event]] = {}
        self.entries = [e for e in self.events if e.kind in ("create", "mkdir", "rename")]
        """The events that change directories (few: they are checked for every reply)."""
        pending: dict[str, bytes] = {}
        for event in self.events:
            if event.kind == "sync":
                self.syncs.setdefault(event.path, []).append(event)
            if event.kind != "write":
                continue
            buffered = pending.get(event.path, b"") + event.data
            *lines, pending[event.path] = buffered.split(b"\n")
            for line in lines:
                stored = Stored(event, json.loads(line))
                op = stored.record["op"]
                if op == "pub":
                    self.pubs[stored.record["id"]] = stored
                elif op == "ack":
                    self.acks[(os.path.dirname(event.path), stored.record["seq"])] = stored
                elif op == "cur":
                    self.cursors.append(stored)

    def synced(self, path: str, after: int, before: int) -> bool:
        """Whether a sync of ``path`` started after ``after`` and returned before ``before``."""
        return any(e.seq > after and e.end < before for e in self.syncs.get(path, ()))

    def missing(self, stored: Stored, sent: int) -> list[str]:
        """What was not yet durable about ``stored`` when a reply was sent at ``sent``."""
        path = stored.event.path
        problems = []
        if not self.synced(path, stored.event.seq, sent):
            problems.append(f"{os.path.basename(path)} not synced after the write")
        for event in self.entries:
            if event.seq > sent:
                continue
            if event.kind in ("create", "mkdir") and _is_on_path(event.path, path):
                if not self.synced(os.path.dirname(event.path), event.seq, sent):
                    problems.append(f"entry of {event.path} not synced")
            elif event.kind == "rename" and os.path.dirname(event.path) == os.path.dirname(path):
                if not self.synced(event.path, event.seq, sent):
                    problems.append(f"{event.path} contents not synced after the rename")
                if not self.synced(os.path.dirname(event.path), event.seq, sent):
                    problems.append(f"rename to {event.path} not synced")
        return problems

    def not_durable(self, kind: str, message_id: str, sent: int) -> list[str]:
        """Why the record a ``kind`` reply for ``message_id`` vouches for was not
        durable when the reply was sent at ``sent`` (empty: it was)."""
        pub = self.pubs.get(message_id)
        if pub is None or pub.event.seq > sent:
            return ["the pub record was not written yet"]
        if kind == "publish":
            candidates = [pub]
        elif kind == "queue ack":
            found = self.acks.get((os.path.dirname(pub.event.path), pub.record["seq"]))
            candidates = [found] if found is not None and found.event.seq < sent else []
        else:
            # Any cursor record of the subscription that has the message's position
            # done will do: past its floor, or in a range acked above the floor.
            position = pub.record["seq"]
            candidates = [
                c
                for c in self.cursors
                if c.record["name"] == DURABLE
                and c.event.seq < sent
                and (
                    c.record["pos"] > position
                    or any(first <= position <= last for first, last in c.record.get("acked", ()))
                )
            ]
        if not candidates:
            return [f"no {kind} record written yet"]
        reasons = [self.missing(candidate, sent) for candidate in candidates]
        return [] if any(not r for r in reasons) else reasons[-1]


def _is_on_path(created: str, path: str) -> bool:
    return path == created or path.startswith(created + os.sep)


def replies(trace: Trace) -> Iterator[tuple[Event, dict[str, Any]]]:
    """Every frame the broker sent, with the send event it went out in."""
    for event in trace.events:
        if event.kind == "send":
            for line in event.data.splitlines():
                yield event, json.loads(line)


def violations(trace: Trace) -> tuple[Counter[str], list[str]]:
    """Check every ack reply (see the module docstring): counts per kind, and problems."""
    disk = Disk(trace)
    checked: Counter[str] = Counter()
    problems: list[str] = []
    for send, frame in replies(trace):
        rid = frame.get("id")
        if frame.get("type") != "ack" or not isinstance(rid, str):
            continue  # pongs, subscribe acks, deliveries
        kind = KINDS[rid[0]]
        checked[kind] += 1
        problems.extend(
            f"{rid} ({kind}): {p}" for p in disk.not_durable(kind, frame["message_id"], send.seq)
        )
    return checked, problems


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An existing, empty data directory (its own creation is not the broker's to sync)."""
    path = tmp_path / "data"
    path.mkdir()
    return path


async def test_no_ack_leaves_before_the_fsync_covering_its_record(data_dir: Path) -> None:
    trace = await run_traffic(data_dir, FsyncPolicy.ALWAYS, seed=1)
    checked, problems = violations(trace)
    total = PUBLISHERS * PER_PUBLISHER
    assert checked["publish"] == total
    assert checked["queue ack"] + checked["durable ack"] == total
    assert checked["queue ack"] > 0
    assert checked["durable ack"] > 0
    assert not problems, f"{len(problems)} violations, e.g.:\n" + "\n".join(problems[:10])
    # The out-of-order acks were recorded as ranges above the floor, so the check
    # above also held the replies that rest on those ranges to their fsync.
    assert any("acked" in c.record for c in Disk(trace).cursors)
    kinds = Counter(e.kind for e in trace.events)
    log.info("checked %s against %s", dict(checked), dict(kinds))
    # Group commit: many replies share a sync.
    assert kinds["sync"] < total


async def test_the_check_catches_acks_sent_before_their_fsync(data_dir: Path) -> None:
    # everysec acks after the write and syncs once a second: the check must object,
    # for each kind of reply.
    trace = await run_traffic(data_dir, FsyncPolicy.EVERYSEC, seed=2)
    checked, problems = violations(trace)
    log.info("everysec: %d problems in %s", len(problems), dict(checked))
    assert checked.total() == 2 * PUBLISHERS * PER_PUBLISHER
    for kind in KINDS.values():
        assert any(f"({kind}): " in problem for problem in problems), kind


PUB = b'{"op":"pub","seq":0,"id":"m1"}\n'
PUBLISH_ACK = b'{"type":"ack","id":"p1","message_id":"m1"}\n'
DURABLE_ACK = b'{"type":"ack","id":"c1","message_id":"m1"}\n'


def cursor_trace(pub: bytes, cursor_records: bytes) -> list[Event]:
    """A topic record and cursor records written, then both files synced."""
    return [
        Event(1, "write", "/d/t/0.log", pub),
        Event(2, "write", "/d/t/cursors.log", cursor_records),
        Event(3, "sync", "/d/t/0.log", end=4),
        Event(5, "sync", "/d/t/cursors.log", end=6),
    ]


@pytest.mark.parametrize(
    ("events", "reply", "problem"),
    [
        pytest.param(
            [Event(1, "write", "/d/q/0.log", PUB), Event(2, "sync", "/d/q/0.log", end=3)],
            PUBLISH_ACK,
            "",
            id="durable",
        ),
        pytest.param(
            [Event(1, "write", "/d/q/0.log", PUB)],
            PUBLISH_ACK,
            "0.log not synced after the write",
            id="write-not-synced",
        ),
        pytest.param(
            [Event(1, "write", "/d/q/0.log", PUB), Event(2, "sync", "/d/q/0.log", end=200)],
            PUBLISH_ACK,
            "0.log not synced after the write",
            id="sync-still-running",
        ),
        pytest.param(
            [Event(1, "sync", "/d/q/0.log", end=2), Event(3, "write", "/d/q/0.log", PUB)],
            PUBLISH_ACK,
            "0.log not synced after the write",
            id="sync-before-write",
        ),
        pytest.param(
            [
                Event(1, "create", "/d/q/0.log"),
                Event(2, "write", "/d/q/0.log", PUB),
                Event(3, "sync", "/d/q/0.log", end=4),
            ],
            PUBLISH_ACK,
            "entry of /d/q/0.log not synced",
            id="entry-not-synced",
        ),
        pytest.param(
            [
                Event(1, "rename", "/d/q/meta.json", b"/d/q/meta.json.tmp"),
                Event(2, "write", "/d/q/0.log", PUB),
                Event(3, "sync", "/d/q/0.log", end=4),
                Event(5, "sync", "/d/q", end=6),
            ],
            PUBLISH_ACK,
            "/d/q/meta.json contents not synced after the rename",
            id="meta-not-synced",
        ),
        pytest.param(
            [Event(1, "write", "/d/q/0.log", PUB), Event(2, "sync", "/d/q/0.log", end=3)],
            b'{"type":"ack","id":"a1","message_id":"m1"}\n',
            "no queue ack record written yet",
            id="queue-ack-not-written",
        ),
        pytest.param(
            [
                Event(1, "write", "/d/q/0.log", PUB + b'{"op":"ack","seq":0}\n'),
                Event(2, "write", "/d/q/0.log", b'{"op":"ack","seq":0}\n'),
                Event(3, "sync", "/d/q/0.log", end=4),
            ],
            b'{"type":"ack","id":"a1","message_id":"m1"}\n',
            "",
            id="queue-ack-durable",
        ),
        pytest.param(
            cursor_trace(PUB, b'{"op":"cur","name":"audit","pos":0}\n'),
            DURABLE_ACK,
            "no durable ack record written yet",
            id="cursor-not-past-the-message",
        ),
        pytest.param(
            cursor_trace(PUB, b'{"op":"cur","name":"audit","pos":1}\n')[:3],
            DURABLE_ACK,
            "cursors.log not synced after the write",
            id="cursor-not-synced",
        ),
        pytest.param(
            cursor_trace(
                PUB,
                b'{"op":"cur","name":"audit","pos":1}\n'
                b'{"op":"cur","name":"audit","pos":0,"acked":[[2,3]]}\n',
            ),
            DURABLE_ACK,
            "",
            id="cursor-floor-past-the-message",
        ),
        pytest.param(
            cursor_trace(
                PUB.replace(b'"seq":0', b'"seq":2'),
                b'{"op":"cur","name":"audit","pos":0,"acked":[[2,3]]}\n',
            ),
            DURABLE_ACK,
            "",
            id="cursor-acked-above-the-floor",
        ),
        pytest.param(
            cursor_trace(
                PUB.replace(b'"seq":0', b'"seq":4'),
                b'{"op":"cur","name":"audit","pos":0,"acked":[[2,3],[5,6]]}\n',
            ),
            DURABLE_ACK,
            "no durable ack record written yet",
            id="cursor-gap-at-the-message",
        ),
    ],
)
def test_the_rules_on_hand_made_traces(events: list[Event], reply: bytes, problem: str) -> None:
    trace = Trace()
    trace.events.extend(events)
    trace.events.append(Event(100, "send", data=reply))
    checked, problems = violations(trace)
    assert checked.total() == 1
    if problem:
        assert problem in "; ".join(problems), problems
    else:
        assert not problems
