"""Restarts, graceful and not: what was acked survives, what was consumed stays gone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from msg.testing import BrokerProcess
from tests.integration.raw import Raw


def publish(topic: str, message: Any, mode: str = "pubsub") -> dict[str, Any]:
    return {"action": "publish", "topic": topic, "message": message, "mode": mode}


async def drain_queue(port: int, queue: str, count: int) -> list[dict[str, Any]]:
    """Consume and ack ``count`` messages; anything delivered beyond them stays unacked."""
    client = await Raw.connect(port)
    await client.send(
        {"action": "subscribe", "topic": queue, "mode": "queue", "ack": "manual", "prefetch": count}
    )
    assert (await client.recv())["type"] == "ack"
    messages: list[dict[str, Any]] = []
    acked = 0
    while len(messages) < count or acked < count:
        frame = await client.recv()
        if frame["type"] == "message":
            if len(messages) == count:
                continue
            messages.append(frame)
            await client.send({"action": "ack", "message_id": frame["message_id"]})
        else:
            assert frame == {"type": "ack", "message_id": frame["message_id"]}
            acked += 1
    await client.close()
    return messages


@pytest.mark.parametrize("fsync", ["always", "everysec", "never"])
async def test_sigkill_right_after_the_acks_loses_nothing(data_dir: Path, fsync: str) -> None:
    broker = BrokerProcess(data_dir, args=["--fsync", fsync])
    broker.start()
    try:
        durable = await Raw.connect(broker.port)
        await durable.request({"action": "subscribe", "topic": "news", "durable": "d"})
        await durable.close()
        publisher = await Raw.connect(broker.port)
        count = 2000
        await publisher.send(
            *(publish("jobs", n, "queue") for n in range(count)),
            *(publish("news", n) for n in range(count)),
        )
        acks = await publisher.recv_n(2 * count)
        assert all(a["type"] == "ack" for a in acks)
        broker.kill()
        await publisher.close()

        broker.start()
        messages = await drain_queue(broker.port, "jobs", count)
        assert [m["message"] for m in messages] == list(range(count))
        assert [m["message_id"] for m in messages] == [a["message_id"] for a in acks[:count]]

        returning = await Raw.connect(broker.port)
        await returning.send({"action": "subscribe", "topic": "news", "durable": "d"})
        assert (await returning.recv())["type"] == "ack"
        backlog = await returning.recv_n(count)
        assert [m["message"] for m in backlog] == list(range(count))
        await returning.close()
    finally:
        broker.kill()


async def test_acked_messages_are_not_delivered_again_after_sigkill(data_dir: Path) -> None:
    broker = BrokerProcess(data_dir)
    broker.start()
    try:
        publisher = await Raw.connect(broker.port)
        await publisher.send(*(publish("jobs", n, "queue") for n in range(10)))
        await publisher.recv_n(10)
        done = await drain_queue(broker.port, "jobs", 4)  # acks 0-3, each reply received
        assert [m["message"] for m in done] == [0, 1, 2, 3]
        broker.kill()
        await publisher.close()
        broker.start()
        rest = await drain_queue(broker.port, "jobs", 6)
        assert [m["message"] for m in rest] == [4, 5, 6, 7, 8, 9]
        status_client = await Raw.connect(broker.port)
        status = await status_client.request({"action": "status"})
        assert status["queues"]["jobs"]["depth"] == 0
        await status_client.close()
    finally:
        broker.kill()


async def durable_deliveries_until(port: int, marker: str) -> tuple[Raw, list[dict[str, Any]]]:
    """Attach durable subscription ``d`` of topic ``news`` (manual acks), publish
    ``marker`` and return what was delivered up to and including it: deliveries are
    in log order, so anything the cursor hands out again comes before the marker."""
    client = await Raw.connect(port)
    await client.send(
        {"action": "subscribe", "topic": "news", "durable": "d", "ack": "manual", "prefetch": 1000}
    )
    assert (await client.recv())["type"] == "ack"
    publisher = await Raw.connect(port)
    assert (await publisher.request(publish("news", marker)))["type"] == "ack"
    await publisher.close()
    delivered: list[dict[str, Any]] = []
    while not delivered or delivered[-1]["message"] != marker:
        frame = await client.recv()
        assert frame["type"] == "message", frame
        delivered.append(frame)
    return client, delivered


async def ack_all(client: Raw, messages: list[dict[str, Any]]) -> None:
    """Ack ``messages`` and wait for every reply."""
    await client.send(
        *({"action": "ack", "message_id": m["message_id"], "id": n} for n, m in enumerate(messages))
    )
    replies = await client.recv_n(len(messages))
    assert [(r["type"], r["id"]) for r in replies] == [("ack", n) for n in range(len(messages))]


async def test_durable_acks_behind_an_unacked_message_survive_reconnect_and_sigkill(
    data_dir: Path,
) -> None:
    broker = BrokerProcess(data_dir)
    broker.start()
    try:
        first, got = await durable_deliveries_until(broker.port, "start")
        publisher = await Raw.connect(broker.port)
        await publisher.send(*(publish("news", n) for n in range(100)))
        assert all(a["type"] == "ack" for a in await publisher.recv_n(100))
        await publisher.close()
        got = await first.recv_n(100)
        assert [m["message"] for m in got] == list(range(100))
        # Everything acked but message 0 (and the marker, which stays unacked too).
        await ack_all(first, got[1:])
        await first.close()

        # A reconnect without a restart: only the two unacked come back.
        again, delivered = await durable_deliveries_until(broker.port, "reconnected")
        assert [m["message"] for m in delivered] == ["start", 0, "reconnected"]
        assert delivered[1]["message_id"] == got[0]["message_id"]
        await ack_all(again, delivered[2:])

        # SIGKILL: the same after a restart.
        broker.kill()
        await again.close()
        broker.start()
        after, delivered = await durable_deliveries_until(broker.port, "restarted")
        assert [m["message"] for m in delivered] == ["start", 0, "restarted"]
        await ack_all(after, delivered)
        await after.close()

        broker.stop()
        broker.start()
        last, delivered = await durable_deliveries_until(broker.port, "done")
        assert [m["message"] for m in delivered] == ["done"]
        status = await last.request({"action": "status"})
        assert status["topics"]["news"]["durable"]["d"]["acked_ahead"] == 0
        await last.close()
    finally:
        broker.kill()


@pytest.mark.parametrize("how", ["stop", "interrupt"])
async def test_graceful_shutdown_exits_zero_and_keeps_unacked_messages(
    data_dir: Path, how: str
) -> None:
    broker = BrokerProcess(data_dir)
    broker.start()
    publisher = await Raw.connect(broker.port)
    await publisher.send(*(publish("jobs", n, "queue") for n in range(5)))
    await publisher.recv_n(5)
    consumer = await Raw.connect(broker.port)
    await consumer.send({"action": "subscribe", "topic": "jobs", "mode": "queue", "ack": "manual"})
    await consumer.recv_n(6)  # the ack and five messages, none acked
    status = broker.stop() if how == "stop" else broker.interrupt()
    assert status == 0
    assert any("stopped" in line for line in broker.log_lines)
    await publisher.close()
    await consumer.close()
    broker.start()
    try:
        messages = await drain_queue(broker.port, "jobs", 5)
        assert [m["message"] for m in messages] == [0, 1, 2, 3, 4]
    finally:
        broker.stop()


async def test_a_second_broker_cannot_use_the_same_data_dir(data_dir: Path) -> None:
    with BrokerProcess(data_dir):
        second = BrokerProcess(data_dir, start_timeout=10)
        with pytest.raises(Exception, match="never matched"):
            second.start()
        assert second.process is not None
        assert second.process.wait(10) != 0


async def test_a_broker_process_without_a_data_dir_keeps_one_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not the broker's default (./.msg_data in the current directory): a test must not
    # leave data where it was run from, and a restart of the same object finds its data.
    monkeypatch.chdir(tmp_path)
    with BrokerProcess() as broker:
        data_dir = broker.data_dir
        conn = await Raw.connect(broker.port)
        try:
            reply = await conn.request(publish("jobs", "kept", mode="queue"))
            assert reply["type"] == "ack", reply
        finally:
            await conn.close()
        assert broker.stop() == 0
        broker.start()
        [message] = await drain_queue(broker.port, "jobs", 1)
        assert message["message"] == "kept"
    assert not data_dir.exists()
    assert not (tmp_path / ".msg_data").exists()


async def test_publishes_without_replies_are_stored_once_a_later_request_is_answered(
    data_dir: Path,
) -> None:
    # A reply comes only after every earlier request is done, so a ping after
    # publishes that asked for no reply answers once they are on disk.
    broker = BrokerProcess(data_dir)
    broker.start()
    try:
        publisher = await Raw.connect(broker.port)
        count = 2000
        await publisher.send(
            *({**publish("jobs", n, "queue"), "reply": False} for n in range(count)),
            {"action": "publish", "topic": "bad name", "message": 0, "reply": False, "id": 1},
            {"action": "ping", "id": 2},
        )
        error = await publisher.recv()
        assert (error["type"], error["code"], error["id"], error["reply"]) == (
            "error",
            "invalid_topic",
            1,
            False,
        )
        assert await publisher.recv() == {"type": "pong", "id": 2}
        broker.kill()
        await publisher.close()

        broker.start()
        messages = await drain_queue(broker.port, "jobs", count)
        assert [m["message"] for m in messages] == list(range(count))
    finally:
        broker.kill()
