"""Power loss under a whole broker: real sockets, the real core, a crashing file system.

Each round starts an in-process :class:`~msg.broker.server.Server` whose FileStore
sits on a :class:`~tests.durability.crashfs.CrashFS`, pipelines publishes into a
queue while a consumer with manual acks takes and acks most of them, and pulls the
plug at a random file-system operation. It then starts a second Server on what a
reboot would find and drains the queue. The whole history -- every publish ack, every
delivery, every ack reply -- goes to the Jepsen-style checker
(:mod:`tests.durability.history`), which must find nothing lost and no queue
message returned after its ack's reply was sent (``fsync always``).

An error reply after the crash is *not* a promise that nothing happened: a write
that reached the page cache may survive even though its fsync failed, so publishes
and acks answered with ``storage_error`` are recorded as of unknown outcome.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from msg.broker.server import Server
from msg.config import Config
from msg.persistence import FsyncPolicy
from msg.protocol.frames import Mode
from msg.storage.filestore import FileStore
from tests.durability.crashfs import POWER_LOSSES, CrashFS
from tests.durability.history import History, Reader
from tests.durability.test_power_loss import base_seed
from tests.integration.raw import Raw

log = logging.getLogger(__name__)

ROOT = "/data"
QUEUE = "jobs"
PUBLISHES = 300
SEGMENT_BYTES = 4096
WAIT = 10.0


def config() -> Config:
    # min_free_bytes=0: the CrashFS has no capacity limit to compare with anyway.
    return Config(host="127.0.0.1", port=0, data_dir=Path(ROOT), min_free_bytes=0)


def store_on(fs: CrashFS) -> FileStore:
    return FileStore(ROOT, fsync=FsyncPolicy.ALWAYS, segment_bytes=SEGMENT_BYTES, fs=fs)


@dataclass
class Consumer:
    """A queue consumer with manual acks that acks most of what it gets."""

    history: History
    reader: Reader
    rng: random.Random
    acks: dict[str, str] = field(default_factory=dict)
    """Request id of each ack whose reply has not come -> the message's key."""
    numbers: Iterator[int] = field(default_factory=itertools.count)
    """Request ids: never reused, so a late reply cannot be credited to another ack."""

    async def run(self, client: Raw, done: asyncio.Event) -> None:
        await client.send(
            {
                "action": "subscribe",
                "topic": QUEUE,
                "mode": "queue",
                "ack": "manual",
                "prefetch": 50,
            }
        )

        async def end_when_done() -> None:
            # Replies come in request order: once this one is back, every ack sent
            # before it has its reply too.
            await done.wait()
            await client.send({"action": "ping", "id": "end"})

        ending = asyncio.create_task(end_when_done())
        try:
            while True:
                frame = await client.recv(WAIT)
                if self.handle(frame):
                    return
                if frame.get("type") != "message":
                    continue
                key = self.history.delivered(self.reader, frame["message"], frame["message_id"])
                if key is not None and self.rng.random() < 0.8:
                    self.history.ack_sent(self.reader, key)
                    rid = f"a{next(self.numbers)}"
                    self.acks[rid] = key
                    await client.send(
                        {"action": "ack", "message_id": frame["message_id"], "id": rid}
                    )
        finally:
            ending.cancel()
            await asyncio.gather(ending, return_exceptions=True)

    def handle(self, frame: dict[str, Any]) -> bool:
        """Record an ack reply; True at the end marker."""
        if frame.get("id") == "end":
            return True
        rid = frame.get("id")
        if isinstance(rid, str) and rid in self.acks and frame.get("type") == "ack":
            self.history.consumed(self.reader, self.acks.pop(rid))
        # An error reply to an ack is of unknown outcome after a crash: left as sent.
        return False


async def publish_all(client: Raw, history: History, rng: random.Random, tag: str) -> None:
    """Pipeline PUBLISHES publishes, in bursts, and record every reply."""
    keys: dict[int, str] = {}
    sent = 0
    while sent < PUBLISHES:
        burst = min(rng.randint(1, 40), PUBLISHES - sent)
        frames = []
        for i in range(sent, sent + burst):
            payload = {"k": f"{tag}-{i}", "pad": "x" * rng.randint(0, 300)}
            keys[i] = history.invoke(Mode.QUEUE, QUEUE, payload)
            frames.append(
                {"action": "publish", "topic": QUEUE, "mode": "queue", "message": payload, "id": i}
            )
        await client.send(*frames)
        for _ in range(burst):
            reply = await client.recv(WAIT)
            key = keys[reply["id"]]
            if reply["type"] == "ack":
                history.acked(key, reply["message_id"])
            elif reply["code"] != "storage_error":
                history.refused(key, reply["code"])
        sent += burst


async def drain(port: int, history: History, reader: Reader, count: int) -> None:
    """Take and ack ``count`` messages (what the restarted store holds), then stop."""
    client = await Raw.connect(port)
    try:
        await client.send(
            {
                "action": "subscribe",
                "topic": QUEUE,
                "mode": "queue",
                "ack": "manual",
                "prefetch": 500,
            }
        )
        assert (await client.recv(WAIT))["type"] == "ack"  # comes before any message
        taken = acked = 0
        while taken < count or acked < count:
            frame = await client.recv(WAIT)
            if frame["type"] == "message":
                taken += 1
                key = history.delivered(reader, frame["message"], frame["message_id"])
                assert key is not None
                history.ack_sent(reader, key)
                await client.send({"action": "ack", "message_id": frame["message_id"], "id": key})
            elif frame["type"] == "ack" and "message_id" in frame:
                acked += 1
                history.consumed(reader, frame["id"])
        reply = await client.request({"action": "ping", "id": "end"})
        assert reply == {"type": "pong", "id": "end"}, "more was delivered than the store held"
    finally:
        await client.close()


async def crash_round(seed: str, crash_after: int | None) -> tuple[History, int]:
    """One round; returns its history and how many operations in the crash came."""
    rng = random.Random(seed)
    history = History()
    reader = history.queue(QUEUE)
    fs = CrashFS()
    server = Server(config(), store=store_on(fs))
    await server.start()
    opened = fs.ops
    if crash_after is not None:
        fs.crash_at = opened + rng.randint(1, crash_after)
    try:
        port = server.addresses[0][1]
        publisher = await Raw.connect(port)
        consumer_client = await Raw.connect(port)
        done = asyncio.Event()
        consumer = Consumer(history, reader, rng)
        consuming = asyncio.create_task(consumer.run(consumer_client, done))
        try:
            await publish_all(publisher, history, rng, seed)
        finally:
            done.set()
            async with asyncio.timeout(WAIT):
                await consuming
            await publisher.close()
            await consumer_client.close()
    finally:
        ops = fs.ops - opened
        fs.crash()
        await server.stop()
    image = fs.reboot(POWER_LOSSES[rng.randrange(len(POWER_LOSSES))], rng, keep_metadata=True)
    store = store_on(image)
    again = Server(config(), store=store)
    await again.start()
    try:
        stats = await store.stats()
        queue = stats.queues.get(QUEUE)
        ready = 0 if queue is None else queue.ready
        await drain(again.addresses[0][1], history, reader, ready)
    finally:
        await again.stop()
    return history, ops


@pytest.mark.slow_timeout(1800)
async def test_broker_loses_no_acked_message_to_power_loss(slow: bool) -> None:
    seed = base_seed()
    _, ops = await crash_round(f"{seed}:dry", None)
    rounds = 200 if slow else 20
    log.info("MSG_CRASH_SEED=%d broker rounds=%d, %d operations a round", seed, rounds, ops)
    acked = lost = 0
    for number in range(rounds):
        history, _ = await crash_round(f"{seed}:{number}", ops)
        report = history.check()
        assert report.ok, f"MSG_CRASH_SEED={seed}, round {number}:\n{report.describe()}"
        acked += history.acked_count
        lost += report.lost
    log.info("broker power loss: %d rounds, %d publishes acked, %d lost", rounds, acked, lost)
    assert acked > 0
