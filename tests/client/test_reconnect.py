"""Losing the connection: in-flight requests fail, the client reconnects with backoff,
subscriptions come back, and messages from the old connection are handled honestly.

Connections are cut with a proxy (tests.client.proxy) so the broker itself can stay
up; the restart test kills the broker and points the proxy at its new port.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from msg.client import (
    Backoff,
    Client,
    ConnectionClosedError,
    Message,
    StaleMessageError,
)
from msg.testing import BrokerProcess
from tests.client.conftest import FAST_BACKOFF
from tests.client.proxy import Proxy


async def _cut_with_request_in_flight(proxy: Proxy, client: Client) -> asyncio.Task[str]:
    """Start a publish, make sure it reached the broker, then cut: its fate is unknown."""
    proxy.hold()
    before = proxy.client_bytes
    task = asyncio.create_task(client.publish("limbo", "?"))
    await proxy.wait_for_client_bytes(before + 1)
    proxy.cut()
    proxy.release()
    return task


async def test_in_flight_requests_fail_and_subscriptions_come_back(
    proxy: Proxy, proxied: Client, other: Client
) -> None:
    news = await proxied.subscribe("news")
    gone = await proxied.subscribe("gone")
    in_flight = await _cut_with_request_in_flight(proxy, proxied)
    with pytest.raises(ConnectionClosedError, match="unknown"):
        await in_flight
    await gone.unsubscribe()  # while reconnecting, or just after: either way it stays gone
    await proxied.ping()  # waits for the new connection
    assert proxied.reconnects == 1
    assert proxied.connected
    await other.publish("news", "after")
    message = await news.next(timeout=10)
    assert message.data == "after"
    topics = (await other.status())["topics"]
    assert topics["news"]["subscribers"] == 1
    assert topics.get("gone", {}).get("subscribers", 0) == 0


async def test_durable_subscription_resumes_from_its_cursor(
    proxy: Proxy, proxied: Client, other: Client
) -> None:
    sub = await proxied.subscribe("events", durable="audit", ack="manual")
    await other.publish("events", "one")
    one = await sub.next(timeout=10)
    await one.ack()
    await other.publish("events", "two")
    two = await sub.next(timeout=10)  # not acked before the connection goes
    proxy.cut()
    await other.publish("events", "three")  # while the subscriber is away
    again = await sub.next(timeout=10)
    assert again.data == "two"
    assert again.message_id == two.message_id
    assert again.generation != two.generation
    three = await sub.next(timeout=10)
    assert three.data == "three"
    with pytest.raises(StaleMessageError) as caught:
        await two.ack()
    assert caught.value.message_id == two.message_id
    await again.ack()
    await three.ack()
    durable = (await other.status())["topics"]["events"]["durable"]["audit"]
    assert durable["online"]
    assert durable["pending"] == 0


async def test_unacked_queue_messages_come_again_and_old_ones_are_stale(
    proxy: Proxy, proxied: Client, other: Client
) -> None:
    sub = await proxied.subscribe("jobs", queue=True, ack="manual", prefetch=10)
    await other.publish_many("jobs", ["a", "b", "c"], queue=True)
    first = await sub.next(timeout=10)
    assert first.data == "a"
    old_generation = first.generation
    accepted = proxy.accepted
    proxy.cut()
    await proxy.wait_for_accepted(accepted + 1)  # the client noticed, and is back
    # Whatever of b and c had arrived before the cut was discarded with the old
    # connection: everything iterated now comes over the new one, exactly once.
    seen: dict[str, Message] = {}
    while len(seen) < 3:
        message = await sub.next(timeout=10)
        assert message.generation != old_generation
        assert message.data not in seen
        seen[message.data] = message
    assert seen["a"].message_id == first.message_id
    assert seen["a"].redelivered
    with pytest.raises(StaleMessageError):
        await first.nack()
    for message in seen.values():
        await message.ack()
    queue = (await other.status())["queues"]["jobs"]
    assert queue["depth"] == 0
    assert queue["unacked"] == 0


async def test_broker_restart(broker: BrokerProcess, proxy: Proxy, proxied: Client) -> None:
    news = await proxied.subscribe("news")
    jobs = await proxied.subscribe("jobs", queue=True)
    broker.kill()
    await asyncio.to_thread(broker.restart)  # a new process, on a new port
    proxy.target = broker.address
    await proxied.ping()  # reconnected through the proxy, subscriptions restored
    async with await Client.connect(broker.host, broker.port) as publisher:
        await publisher.publish("news", "fresh")
        await publisher.publish("jobs", "work", queue=True)
    assert (await news.next(timeout=10)).data == "fresh"
    assert (await jobs.next(timeout=10)).data == "work"
    assert proxied.reconnects == 1


async def test_without_reconnect_the_client_closes(proxy: Proxy) -> None:
    client = await Client.connect(proxy.host, proxy.port, reconnect=False)
    try:
        sub = await client.subscribe("news")
        in_flight = await _cut_with_request_in_flight(proxy, client)
        with pytest.raises(ConnectionClosedError):
            await in_flight
        with pytest.raises(ConnectionClosedError, match="lost"):
            await sub.next(timeout=10)
        assert client.closed
        with pytest.raises(ConnectionClosedError):
            await client.ping()
    finally:
        await client.close()


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_gives_up_after_max_attempts(proxy: Proxy) -> None:
    client = await Client.connect(
        proxy.host, proxy.port, max_reconnect_attempts=3, backoff=FAST_BACKOFF
    )
    try:
        sub = await client.subscribe("news")
        proxy.target = ("127.0.0.1", _unused_port())  # the broker is gone for good
        accepted = proxy.accepted
        proxy.cut()
        with pytest.raises(ConnectionClosedError, match="3 reconnect attempts failed"):
            await sub.next(timeout=10)
        assert client.closed
        assert proxy.accepted == accepted + 3
    finally:
        await client.close()


async def test_close_during_reconnect(proxy: Proxy) -> None:
    client = await Client.connect(
        proxy.host, proxy.port, backoff=Backoff(base=5.0, cap=5.0)
    )  # a long wait before the first attempt
    proxy.cut()
    waiting = asyncio.create_task(client.ping())  # waits for a connection
    async with asyncio.timeout(5):
        await client.close()  # does not wait for the backoff
    with pytest.raises(ConnectionClosedError):
        await waiting


def test_backoff_doubles_with_jitter_up_to_a_cap() -> None:
    low = Backoff(base=0.1, cap=1.0, random=lambda: 0.0)
    high = Backoff(base=0.1, cap=1.0, random=lambda: 0.999999)
    assert [low.compute(n) for n in range(6)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5])
    assert [high.compute(n) for n in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert low.compute(10_000) == pytest.approx(0.5)  # no overflow
    default = Backoff()
    for failures in range(20):
        assert 0 < default.compute(failures) <= default.cap
    with pytest.raises(ValueError, match="failures"):
        default.compute(-1)
    with pytest.raises(ValueError, match="cap"):
        Backoff(base=2.0, cap=1.0)
