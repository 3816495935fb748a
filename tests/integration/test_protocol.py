"""The protocol over raw TCP against a real broker process."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from msg.testing import BrokerProcess
from tests.integration.raw import Raw


def publish(topic: str, message: Any, mode: str = "pubsub", **extra: Any) -> dict[str, Any]:
    return {"action": "publish", "topic": topic, "message": message, "mode": mode, **extra}


def subscribe(topic: str, mode: str = "pubsub", **extra: Any) -> dict[str, Any]:
    return {"action": "subscribe", "topic": topic, "mode": mode, **extra}


async def test_nothing_is_sent_before_the_first_request(broker: BrokerProcess) -> None:
    client = await Raw.connect(broker.port)
    await client.send({"action": "ping", "id": "first"})
    assert await client.recv() == {"type": "pong", "id": "first"}
    await client.close()


async def test_a_complete_object_without_newline_is_answered(broker: BrokerProcess) -> None:
    client = await Raw.connect(broker.port)
    await client.send(b'{"action": "ping", "id": 1}')
    assert await client.recv() == {"type": "pong", "id": 1}
    await client.close()


async def test_pubsub_fan_out_in_order(broker: BrokerProcess) -> None:
    subscribers = [await Raw.connect(broker.port) for _ in range(3)]
    for s in subscribers:
        assert (await s.request(subscribe("news")))["type"] == "ack"
    publisher = await Raw.connect(broker.port)
    await publisher.send(*(publish("news", {"n": n}) for n in range(100)))
    acks = await publisher.recv_n(100)
    assert all(a["type"] == "ack" for a in acks)
    ids = [a["message_id"] for a in acks]
    assert len(set(ids)) == 100
    for s in subscribers:
        got = await s.recv_n(100)
        assert [m["message"]["n"] for m in got] == list(range(100))
        assert [m["message_id"] for m in got] == ids
        await s.close()
    await publisher.close()


@pytest.mark.parametrize("lone", [False, True], ids=["pipelined", "one-at-a-time"])
async def test_publishes_that_ask_for_no_reply_are_delivered_unanswered(
    broker: BrokerProcess, lone: bool
) -> None:
    subscriber = await Raw.connect(broker.port)
    assert (await subscriber.request(subscribe("news")))["type"] == "ack"
    publisher = await Raw.connect(broker.port)
    for n in range(20):
        await publisher.send(publish("news", n, reply=False))
        if lone:  # each its own read: the broker's one-line path
            assert (await subscriber.recv())["message"] == n
    # Nothing came back for them: the first frame the publisher gets is the pong.
    assert await publisher.request({"action": "ping"}) == {"type": "pong"}
    if not lone:
        assert [m["message"] for m in await subscriber.recv_n(20)] == list(range(20))
    await subscriber.close()
    await publisher.close()


async def test_an_auto_ack_consumer_gets_more_than_its_prefetch(broker: BrokerProcess) -> None:
    # With ack "auto" a delivery counts as taken once the socket took it: each write
    # that went through must let the broker hand out more, or the consumer stalls at
    # its prefetch.
    consumer = await Raw.connect(broker.port)
    assert (await consumer.request(subscribe("work", "queue", prefetch=2)))["type"] == "ack"
    publisher = await Raw.connect(broker.port)
    await publisher.send(*(publish("work", n, "queue") for n in range(50)))
    await publisher.recv_n(50)
    got = await consumer.recv_n(50)
    assert [m["message"] for m in got] == list(range(50))
    await consumer.close()
    await publisher.close()


async def test_queue_distributes_each_message_to_one_consumer(broker: BrokerProcess) -> None:
    consumers = [await Raw.connect(broker.port) for _ in range(4)]
    for c in consumers:
        assert (await c.request(subscribe("jobs", "queue", prefetch=10, ack="manual")))[
            "type"
        ] == "ack"
    publisher = await Raw.connect(broker.port)
    await publisher.send(*(publish("jobs", n, "queue") for n in range(200)))
    await publisher.recv_n(200)
    seen: list[int] = []

    async def consume(c: Raw) -> None:
        while len(seen) < 200:
            try:
                frame = await c.recv(within=1.0)
            except TimeoutError:
                continue
            assert frame["type"] in ("message", "ack")
            if frame["type"] == "message":
                seen.append(frame["message"])
                await c.send({"action": "ack", "message_id": frame["message_id"]})

    async with asyncio.timeout(30):
        await asyncio.gather(*(consume(c) for c in consumers))
    assert sorted(seen) == list(range(200))
    for c in consumers:
        await c.close()
    await publisher.close()


async def test_unacked_messages_are_redelivered_after_disconnect(broker: BrokerProcess) -> None:
    publisher = await Raw.connect(broker.port)
    await publisher.send(*(publish("work", n, "queue") for n in range(3)))
    await publisher.recv_n(3)
    first = await Raw.connect(broker.port)
    await first.send(subscribe("work", "queue", ack="manual"))
    assert (await first.recv())["type"] == "ack"
    got = await first.recv_n(3)
    assert [m["message"] for m in got] == [0, 1, 2]
    assert (await first.request({"action": "ack", "message_id": got[0]["message_id"]}))[
        "type"
    ] == "ack"
    await first.close()
    second = await Raw.connect(broker.port)
    await second.send(subscribe("work", "queue", ack="manual"))
    await second.recv()
    again = await second.recv_n(2)
    assert [m["message"] for m in again] == [1, 2]
    assert all(m["redelivered"] is True and m["attempt"] == 2 for m in again)
    await second.close()
    await publisher.close()


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"this is not json\n", "bad_json"),
        (b'{"action": "publish", "topic": "t"\n', "bad_json"),
        (b"\xff\xfe{}\n", "bad_json"),
        (b"[" * 100_000 + b"\n", "bad_json"),
        (b"[1, 2]\n", "bad_request"),
        (b'"publish"\n', "bad_request"),
        (b'{"topic": "t"}\n', "bad_request"),
        (b'{"action": "publish", "topic": "t", "message": 1, "mode": "fanout"}\n', "bad_request"),
        (b'{"action": "subscribe", "topic": "t", "prefetch": "ten"}\n', "bad_request"),
        (b'{"action": "teleport"}\n', "unknown_action"),
        (b'{"action": "publish", "topic": "a b", "message": 1}\n', "invalid_topic"),
        (b'{"action": "publish", "topic": 7, "message": 1}\n', "bad_request"),
        (b'{"action": "ack", "message_id": "never-sent"}\n', "unknown_message"),
    ],
)
async def test_bad_input_gets_its_error_and_the_connection_keeps_working(
    broker: BrokerProcess, line: bytes, code: str
) -> None:
    client = await Raw.connect(broker.port)
    await client.send(line)
    reply = await client.recv()
    assert reply["type"] == "error"
    assert reply["code"] == code
    assert isinstance(reply["error"], str)
    assert reply["error"]
    assert await client.request({"action": "ping"}) == {"type": "pong"}
    await client.close()


async def test_an_oversized_line_gets_too_large_and_nothing_else_breaks(
    broker: BrokerProcess,
) -> None:
    bystander = await Raw.connect(broker.port)
    await bystander.request(subscribe("t"))
    client = await Raw.connect(broker.port)
    huge = json.dumps(publish("t", "x" * (2 * 1024 * 1024))).encode() + b"\n"
    await client.send(huge)
    reply = await client.recv()
    assert reply["code"] == "too_large"
    # The broker may keep or close the connection after too_large; others are unaffected.
    publisher = await Raw.connect(broker.port)
    assert (await publisher.request(publish("t", "small")))["type"] == "ack"
    assert (await bystander.recv())["message"] == "small"
    for c in (client, publisher, bystander):
        await c.close()


async def test_a_subscriber_that_stops_reading_does_not_stall_others(tmp_path: Any) -> None:
    with BrokerProcess(tmp_path / "data", args=["--max-pending-bytes", "1MiB"]) as broker:
        # A small read-ahead limit: this client's socket really fills up.
        stuck = await Raw.connect(broker.port, limit=65536)
        await stuck.request(subscribe("firehose"))
        healthy = await Raw.connect(broker.port)
        await healthy.request(subscribe("firehose"))
        publisher = await Raw.connect(broker.port)
        payload = "x" * 16384
        count = 600  # ~10 MB: far past the stuck subscriber's socket buffers and limit
        received = 0

        async def drain_healthy() -> None:
            nonlocal received
            while received < count:
                frame = await healthy.recv()
                if frame["type"] == "message":
                    received += 1

        reader = asyncio.create_task(drain_healthy())
        for _start in range(0, count, 50):
            await publisher.send(*(publish("firehose", payload) for _ in range(50)))
            for _ in range(50):
                assert (await publisher.recv())["type"] == "ack"
        async with asyncio.timeout(30):
            await reader
        assert received == count
        broker.wait_for_log("slow consumer")
        assert await stuck.closed_by_peer()
        for c in (stuck, healthy, publisher):
            await c.close()


async def test_status_reports_queues_topics_and_connections(broker: BrokerProcess) -> None:
    client = await Raw.connect(broker.port)
    await client.send(*(publish("jobs", n, "queue") for n in range(5)))
    await client.recv_n(5)
    await client.request(subscribe("news"))
    status = await client.request({"action": "status", "id": 9})
    assert status["type"] == "status"
    assert status["id"] == 9
    assert status["queues"]["jobs"]["depth"] == 5
    assert status["queues"]["jobs"]["consumers"] == 0
    assert status["topics"]["news"]["subscribers"] == 1
    assert status["connections"] >= 1
    assert status["uptime"] >= 0
    assert "published_per_s" in status["rates"]
    await client.close()
