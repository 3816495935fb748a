"""The asyncio client against a real broker: requests, subscriptions, acks, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from msg.client import (
    BatchPublishError,
    Client,
    ConnectFailedError,
    ConnectionClosedError,
    MsgError,
    ReceiveTimeoutError,
    RemoteError,
    RequestTimeoutError,
    Subscription,
    SubscriptionClosedError,
)
from msg.protocol.frames import AckMode, Mode
from msg.testing import BrokerProcess


async def test_publish_subscribe_round_trip(client: Client, other: Client) -> None:
    async with await client.subscribe("news") as sub:
        values = [{"title": "hello", "n": 1}, "text", 42, 1.5, True, None, [1, [2]]]
        ids = [await other.publish("news", value) for value in values]
        received = [await sub.next(timeout=5) for _ in values]
    assert [m.data for m in received] == values
    assert [m.message_id for m in received] == ids
    first = received[0]
    assert first.topic == "news"
    assert first.mode is Mode.PUBSUB
    assert not first.redelivered
    assert first.attempt == 1
    assert first.durable is None
    assert first.raw == {
        "type": "message",
        "topic": "news",
        "mode": "pubsub",
        "message": values[0],
        "message_id": ids[0],
    }


async def test_subscription_is_an_async_iterator_that_ends_on_unsubscribe(
    client: Client, other: Client
) -> None:
    sub = await client.subscribe("feed")
    await other.publish_many("feed", range(3))
    seen = []
    async for message in sub:
        seen.append(message.data)
        if len(seen) == 3:
            await sub.unsubscribe()
    assert seen == [0, 1, 2]
    assert sub.closed
    with pytest.raises(SubscriptionClosedError):
        await sub.next()
    # The broker forgot it too: the same topic can be subscribed again.
    async with await client.subscribe("feed"):
        pass


async def test_next_times_out(client: Client) -> None:
    async with await client.subscribe("quiet") as sub:
        with pytest.raises(ReceiveTimeoutError):
            await sub.next(timeout=0.05)


async def test_queue_manual_ack_and_nack(client: Client, other: Client) -> None:
    await other.publish("jobs", {"job": 1}, queue=True)
    async with await client.subscribe("jobs", queue=True, ack="manual", prefetch=10) as jobs:
        assert jobs.ack is AckMode.MANUAL
        first = await jobs.next(timeout=5)
        assert first.mode is Mode.QUEUE
        assert first.data == {"job": 1}
        await first.nack()  # requeue: it comes back, marked as a redelivery
        again = await jobs.next(timeout=5)
        assert again.message_id == first.message_id
        assert again.redelivered
        assert again.attempt == 2
        await again.ack()
        # Acked is done: a second ack is an error the broker explains.
        with pytest.raises(RemoteError) as caught:
            await again.ack()
        assert caught.value.code == "unknown_message"
    status = await other.status()
    assert status["queues"]["jobs"]["depth"] == 0
    assert status["queues"]["jobs"]["unacked"] == 0
    assert status["queues"]["jobs"]["acked"] == 1


async def test_nack_without_requeue_dead_letters(client: Client, other: Client) -> None:
    message_id = await other.publish("work", "poison", queue=True)
    async with await client.subscribe("work", queue=True, ack="manual") as work:
        message = await work.next(timeout=5)
        await client.nack(message.message_id, requeue=False)
    async with await client.subscribe("$dead.work", queue=True, ack="manual") as dead:
        corpse = await dead.next(timeout=5)
        assert corpse.data == "poison"
        assert corpse.message_id == message_id
        await client.ack(corpse.message_id)


async def test_a_dead_letter_carries_its_reason_across_a_restart(broker: BrokerProcess) -> None:
    async with await Client.connect(broker.host, broker.port) as client:
        await client.publish("work", {"n": 1}, queue=True)
        async with await client.subscribe("work", queue=True, ack="manual") as work:
            message = await work.next(timeout=5)
            await message.nack(requeue=False, reason="schema v1 is no longer accepted")
    assert broker.stop() == 0
    broker.start()
    async with (
        await Client.connect(broker.host, broker.port) as client,
        await client.subscribe("$dead.work", queue=True, ack="manual") as dead,
    ):
        corpse = await dead.next(timeout=5)
        assert corpse.data == {"n": 1}
        assert corpse.reason == "schema v1 is no longer accepted"
        await corpse.ack()


async def test_a_poison_message_stops_after_max_deliveries(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "data", args=["--max-deliveries", "2"]) as broker:
        async with await Client.connect(broker.host, broker.port) as client:
            await client.publish("work", "poison", queue=True)
            await client.publish("work", "fine", queue=True)
            seen: list[tuple[Any, int]] = []
            async with await client.subscribe("work", queue=True, ack="manual") as work:
                while len(seen) < 3:
                    message = await work.next(timeout=5)
                    seen.append((message.data, message.attempt))
                    if message.data == "poison":
                        await message.nack()  # requeue
                    else:
                        await message.ack()
                assert sorted(seen, key=str) == [("fine", 1), ("poison", 1), ("poison", 2)]
                # The limit applies when the message would be delivered a third time, so
                # the consumer stays subscribed until then (unsubscribing right after
                # the nack could leave it waiting in the queue for the next consumer).
                async with await client.subscribe("$dead.work", queue=True, ack="manual") as dead:
                    corpse = await dead.next(timeout=5)
                    assert corpse.data == "poison"
                    assert corpse.reason == "delivered 2 times without an ack (max_deliveries)"
                    await corpse.ack()
                assert work.pending == 0  # the poison message never came a third time
            status = await client.status()
            assert status["queues"]["work"]["dead_lettered"] == 1
            assert status["queues"]["work"]["depth"] == 0
        assert any("delivered 2 times without an ack" in line for line in broker.log_lines)


async def test_queue_shares_messages_between_consumers(
    client: Client, other: Client, broker: BrokerProcess
) -> None:
    got: list[int] = []
    all_in = asyncio.Event()

    async def consume(sub: Subscription) -> None:
        async for message in sub:
            got.append(message.data)
            if len(got) == 20:
                all_in.set()

    async with await Client.connect(broker.host, broker.port) as third:
        a = await client.subscribe("tasks", queue=True)
        b = await third.subscribe("tasks", queue=True)
        consumers = [asyncio.create_task(consume(a)), asyncio.create_task(consume(b))]
        await other.publish_many("tasks", range(20), queue=True)
        async with asyncio.timeout(10):
            await all_in.wait()
        await a.unsubscribe()
        await b.unsubscribe()
        await asyncio.gather(*consumers)  # unsubscribing ends the iteration
    assert sorted(got) == list(range(20))  # each message to exactly one consumer


async def test_durable_subscription_keeps_its_place(
    client: Client, other: Client, broker: BrokerProcess
) -> None:
    sub = await client.subscribe("events", durable="audit", ack="manual")
    await other.publish("events", "one")
    first = await sub.next(timeout=5)
    assert first.durable == "audit"
    await first.ack()
    await sub.unsubscribe()  # the durable cursor stays
    await other.publish_many("events", ["two", "three"])  # while nobody listens
    async with await Client.connect(broker.host, broker.port) as later:
        async with await later.subscribe("events", durable="audit", ack="manual") as again:
            missed = [await again.next(timeout=5) for _ in range(2)]
            assert [m.data for m in missed] == ["two", "three"]
            for message in missed:
                await message.ack()
        status = await later.status()
        assert status["topics"]["events"]["durable"]["audit"]["pending"] == 0
        await later.delete_durable("events", "audit")
        with pytest.raises(RemoteError) as caught:
            await later.delete_durable("events", "audit")
        assert caught.value.code == "not_subscribed"


async def test_durable_in_use_by_another_connection(client: Client, other: Client) -> None:
    async with await client.subscribe("orders", durable="billing"):
        with pytest.raises(RemoteError) as caught:
            await other.subscribe("orders", durable="billing")
        assert caught.value.code == "durable_in_use"


async def test_publish_many_pipelines_ten_thousand(client: Client, other: Client) -> None:
    count = 10_000
    async with await client.subscribe("bulk") as sub:
        ids = await other.publish_many("bulk", ({"n": n} for n in range(count)))
        assert len(ids) == count
        assert len(set(ids)) == count
        received = [await sub.next(timeout=10) for _ in range(count)]
    assert [m.data["n"] for m in received] == list(range(count))
    assert [m.message_id for m in received] == ids


async def test_concurrent_publishes_are_pipelined(client: Client) -> None:
    count = 10_000
    ids = await asyncio.gather(*(client.publish("many", n, queue=True) for n in range(count)))
    assert len(set(ids)) == count
    status = await client.status()
    assert status["queues"]["many"]["depth"] == count


async def test_publish_many_reports_refusals(client: Client) -> None:
    assert await client.publish_many("empty", []) == []
    with pytest.raises(BatchPublishError) as caught:
        await client.publish_many("$reserved", [1, 2])
    assert [e.code for e in caught.value.errors] == ["invalid_topic", "invalid_topic"]
    assert len(caught.value.results) == 2


async def test_status(client: Client, other: Client) -> None:
    await other.publish("q1", "x", queue=True)
    async with await client.subscribe("t1"), await client.subscribe("q1", queue=True, ack="manual"):
        status = await other.status()
    assert status["type"] == "status"
    assert status["connections"] == 2
    assert status["uptime"] >= 0
    assert status["queues"]["q1"]["consumers"] == 1
    assert status["topics"]["t1"]["subscribers"] == 1
    assert {"published_per_s", "delivered_per_s", "acked_per_s"} <= set(status["rates"])


async def test_ping(client: Client) -> None:
    assert 0 <= await client.ping() < 5


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda c: c.publish("bad topic", 1), "invalid_topic"),
        (lambda c: c.publish("$dead.x", 1, queue=True), "invalid_topic"),
        (lambda c: c.ack("no-such-message"), "unknown_message"),
        (lambda c: c.nack("no-such-message"), "unknown_message"),
        (lambda c: c.subscribe("t", ack="manual"), "bad_request"),  # needs queue or durable
        (lambda c: c.subscribe("t", queue=True, prefetch=0), "bad_request"),
    ],
)
async def test_error_replies_raise_remote_error(
    client: Client, call: Callable[[Client], Awaitable[Any]], code: str
) -> None:
    with pytest.raises(RemoteError) as caught:
        await call(client)
    assert caught.value.code == code
    assert caught.value.reply["type"] == "error"
    assert caught.value.text
    # The connection is fine afterwards.
    await client.ping()


async def test_already_subscribed_keeps_the_first_subscription(
    client: Client, other: Client
) -> None:
    first = await client.subscribe("dup")
    with pytest.raises(RemoteError) as caught:
        await client.subscribe("dup")
    assert caught.value.code == "already_subscribed"
    await other.publish("dup", "still routed")
    assert (await first.next(timeout=5)).data == "still routed"
    await first.unsubscribe()


async def test_ack_on_auto_message_is_a_usage_error(client: Client, other: Client) -> None:
    async with await client.subscribe("auto") as sub:
        await other.publish("auto", 1)
        message = await sub.next(timeout=5)
        with pytest.raises(ValueError, match="ack='auto'"):
            await message.ack()


async def test_unserialisable_message_sends_nothing(client: Client) -> None:
    with pytest.raises(TypeError):
        await client.publish("t", object())
    await client.ping()


async def test_oversized_request_gets_its_own_error(broker_args: list[str], tmp_path: Path) -> None:
    """The broker answers an over-long line without an id; the client gives that
    answer to the right caller because replies come in request order."""
    with BrokerProcess(
        tmp_path / "data", args=[*broker_args, "--max-message-bytes", "4096"]
    ) as small:
        async with await Client.connect(small.host, small.port) as client:
            before, big, after, pong = await asyncio.gather(
                client.publish("t", "small"),
                client.publish("t", "x" * 10_000),
                client.publish("t", "small too"),
                client.ping(),
                return_exceptions=True,
            )
    assert isinstance(before, str)
    assert isinstance(after, str)
    assert isinstance(pong, float)
    assert isinstance(big, RemoteError)
    assert big.code == "too_large"


async def test_connect_refused(broker: BrokerProcess) -> None:
    async with await Client.connect(broker.host, broker.port) as probe:
        await probe.ping()
    broker.stop()
    with pytest.raises(ConnectFailedError) as caught:
        await Client.connect(broker.host, broker.port)
    assert isinstance(caught.value, ConnectionClosedError)  # one except clause for both
    assert f"{broker.host}:{broker.port}" in str(caught.value)


async def test_request_timeout(broker: BrokerProcess) -> None:
    from tests.client.proxy import Proxy

    async with (
        Proxy(broker.address) as proxy,
        await Client.connect(proxy.host, proxy.port, request_timeout=0.2) as client,
    ):
        proxy.hold()
        with pytest.raises(RequestTimeoutError):
            await client.ping()
        proxy.release()
        # The late pong is dropped; the next request gets its own reply.
        assert await client.status()


async def test_closed_client(broker: BrokerProcess) -> None:
    client = await Client.connect(broker.host, broker.port)
    sub = await client.subscribe("t")
    await client.close()
    await client.close()  # idempotent
    assert client.closed
    with pytest.raises(ConnectionClosedError):
        await client.ping()
    with pytest.raises(SubscriptionClosedError):
        await sub.next()
    with pytest.raises(MsgError, match="not connected"):
        await Client(broker.host, broker.port).ping()


async def test_async_with_client_constructor(broker: BrokerProcess) -> None:
    async with Client(broker.host, broker.port) as client:
        assert client.connected
        await client.ping()
    assert client.closed


async def test_close_waits_for_replies_already_owed(broker: BrokerProcess) -> None:
    client = await Client.connect(broker.host, broker.port)
    publishes = [asyncio.create_task(client.publish("late", n, queue=True)) for n in range(100)]
    await asyncio.sleep(0)  # let them be written; close must not cut them off
    await client.close()
    ids = await asyncio.gather(*publishes)
    assert len(set(ids)) == 100


async def test_broker_refusing_the_connection(broker_args: list[str], tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "data", args=[*broker_args, "--max-connections", "1"]) as full:
        async with await Client.connect(full.host, full.port) as first:
            with pytest.raises(ConnectFailedError) as caught:
                await Client.connect(full.host, full.port)
            await first.ping()
    # Usually the broker's explanation arrives before the connection closes; if the
    # close wins the race, the client can only say the connection was closed.
    text = str(caught.value)
    assert "refused the connection" in text or "closed the connection" in text
