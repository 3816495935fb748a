"""Cancellation safety and flow control: replies reach their own caller, always, and a
full subscription pushes back without deadlocking the connection."""

from __future__ import annotations

import asyncio
import random

import pytest

from msg.client import Client, RequestTimeoutError, SlowConsumerError
from msg.testing import BrokerProcess
from tests.client.proxy import Proxy


async def test_cancelled_requests_never_get_or_steal_replies(proxy: Proxy, other: Client) -> None:
    """Cancel publishes while their replies are in flight: every survivor gets the id of
    the message it published, as the deliveries (routed by id) prove."""
    count = 600
    async with await Client.connect(proxy.host, proxy.port) as client:
        sub = await other.subscribe("cancel")
        proxy.hold()  # every reply stays in flight until released
        before = proxy.client_bytes
        tasks = [asyncio.create_task(client.publish("cancel", n)) for n in range(count)]
        await proxy.wait_for_client_bytes(before + count * 30)  # all requests sent
        rng = random.Random(7)
        cancelled = set(rng.sample(range(count), count // 3))
        for n in cancelled:
            tasks[n].cancel()
        proxy.release()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        # Interleave more traffic: replies of the cancelled calls must not leak into it.
        assert await client.ping() >= 0
        status = await client.status()
        assert status["type"] == "status"
    id_of = {}
    for _ in range(count):
        message = await sub.next(timeout=10)
        id_of[message.data] = message.message_id
    for n, result in enumerate(results):
        if n in cancelled:
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result == id_of[n], f"publish {n} got another request's reply"


async def test_cancelling_at_every_point_in_a_request(client: Client) -> None:
    """Cancel requests after 0, 1, 2... loop iterations: before they are written, while
    they are written, while waiting. Whatever survives gets the right reply type."""
    for steps in range(6):
        pings = [asyncio.create_task(client.ping()) for _ in range(20)]
        statuses = [asyncio.create_task(client.status()) for _ in range(20)]
        for _ in range(steps):
            await asyncio.sleep(0)  # exactly one loop iteration, to cancel at each stage
        for task in pings[::2] + statuses[::2]:
            task.cancel()
        for task in pings[1::2]:
            assert isinstance(await task, float)  # a status reply here would raise
        for task in statuses[1::2]:
            assert (await task)["type"] == "status"
        await asyncio.gather(*pings, *statuses, return_exceptions=True)


async def test_timed_out_subscribe_is_undone(proxy: Proxy, other: Client) -> None:
    """A subscribe that times out may still have happened on the broker; the client
    undoes it, so the topic can be subscribed again and nothing is held for nobody."""
    async with await Client.connect(proxy.host, proxy.port, request_timeout=0.3) as client:
        proxy.hold()
        with pytest.raises(RequestTimeoutError):
            await client.subscribe("undo", queue=True, ack="manual")
        proxy.release()
        await client.ping()  # the undo was sent before this, and is answered before it
        queues = (await other.status())["queues"]
        assert queues.get("undo", {}).get("consumers", 0) == 0
        async with await client.subscribe("undo", queue=True, ack="manual") as sub:
            await other.publish("undo", "hi", queue=True)
            assert (await sub.next(timeout=5)).data == "hi"


async def test_full_auto_subscription_pushes_back_without_dropping(
    client: Client, other: Client
) -> None:
    """Nobody waits on the connection: the reader stops at the limit, nothing is lost."""
    sub = await client.subscribe("firehose", max_pending=10)
    ids = await other.publish_many("firehose", range(200))
    received = []
    for _ in range(200):
        assert sub.pending <= 10
        received.append(await sub.next(timeout=10))
    assert [m.message_id for m in received] == ids
    assert sub.dropped_total == 0
    await sub.unsubscribe()


async def test_full_auto_subscription_cannot_deadlock_a_request(
    client: Client, other: Client
) -> None:
    """A reply waits behind deliveries for a full subscription nobody drains: the reader
    reads on, drops the overflow, and the subscription reports it."""
    sub = await client.subscribe("flood", max_pending=10)
    await other.publish_many("flood", range(100))  # all written to client before:
    async with asyncio.timeout(10):
        await client.ping()  # ...this pong, which must get past them
    with pytest.raises(SlowConsumerError) as caught:
        await sub.next()
    assert caught.value.dropped == 90
    assert caught.value.max_pending == 10
    kept = [(await sub.next()).data for _ in range(10)]
    assert kept == list(range(10))
    assert sub.dropped_total == 90


async def test_full_subscription_does_not_block_another(client: Client, other: Client) -> None:
    """Waiting on one subscription while another is full and undrained must work."""
    full = await client.subscribe("ignored", max_pending=5)
    wanted = await client.subscribe("wanted")
    await other.publish_many("ignored", range(50))
    await other.publish("wanted", "here")
    assert (await wanted.next(timeout=10)).data == "here"
    with pytest.raises(SlowConsumerError):
        await full.next()


async def test_manual_subscription_is_bounded_by_prefetch(client: Client, other: Client) -> None:
    sub = await client.subscribe("bounded", queue=True, ack="manual", prefetch=5)
    await other.publish_many("bounded", range(50), queue=True)
    got: list[int] = []
    while len(got) < 50:
        message = await sub.next(timeout=10)
        # The broker never has more than 5 unacked out: what is queued here is at most that.
        assert sub.pending <= 4
        got.append(message.data)
        await message.ack()
    assert got == list(range(50))
    await sub.unsubscribe()


async def test_many_subscriptions_route_by_mode_and_topic(
    client: Client, other: Client, broker: BrokerProcess
) -> None:
    subs = {}
    for n in range(5):
        subs[("pubsub", f"t{n}")] = await client.subscribe(f"t{n}")
        subs[("queue", f"t{n}")] = await client.subscribe(f"t{n}", queue=True)
    for n in range(5):
        await other.publish(f"t{n}", f"topic {n}")
        await other.publish(f"t{n}", f"queue {n}", queue=True)
    for (mode, topic), sub in subs.items():
        message = await sub.next(timeout=5)
        assert message.mode == mode
        assert message.topic == topic
        assert message.data == f"{'topic' if mode == 'pubsub' else 'queue'} {topic[1:]}"
