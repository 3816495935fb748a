"""Publishes that ask for no reply (``reply=False``), against a real broker: delivered
and stored like any other, nothing kept per message, refusals to ``error_callback``
and never to a waiting caller, ``flush`` as the barrier, and flow control."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from msg.client import (
    Client,
    ConnectionClosedError,
    PublishRefusedError,
    RemoteError,
    RequestTimeoutError,
    SyncClient,
)
from msg.testing import BrokerProcess
from tests.client.proxy import WAIT_TIMEOUT, Proxy


class Refusals:
    """An ``error_callback`` that keeps what it is given and lets a test wait for it."""

    def __init__(self) -> None:
        self.errors: list[PublishRefusedError] = []
        self.threads: set[str] = set()
        self._changed = threading.Condition()

    def __call__(self, error: PublishRefusedError) -> None:
        with self._changed:
            self.errors.append(error)
            self.threads.add(threading.current_thread().name)
            self._changed.notify_all()

    def wait_for(self, count: int) -> list[PublishRefusedError]:
        """Block (up to WAIT_TIMEOUT) until ``count`` errors came (sync tests only)."""
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.errors) >= count, WAIT_TIMEOUT)
            return list(self.errors)


@pytest.fixture
async def quiet(broker: BrokerProcess) -> AsyncIterator[tuple[Client, Refusals]]:
    """A client whose refused no-reply publishes are collected."""
    refusals = Refusals()
    async with await Client.connect(broker.host, broker.port, error_callback=refusals) as client:
        yield client, refusals


def _pending(client: Client) -> int:
    conn = client._conn
    assert conn is not None
    return len(conn.pending)


async def test_no_reply_publishes_are_delivered_in_order_and_stored(
    client: Client, other: Client
) -> None:
    # Typed bool, not Literal[False]: the overload that may return None, so that mypy
    # lets the test look at what a statement would ignore.
    no_reply: bool = False
    async with await other.subscribe("feed") as feed:
        for n in range(50):
            assert await client.publish("feed", n, reply=no_reply) is None
        assert await client.publish_many("feed", range(50, 100), reply=no_reply) is None
        assert [(await feed.next(timeout=5)).data for _ in range(100)] == list(range(100))
    for n in range(20):
        await client.publish("work", {"n": n}, queue=True, reply=False)
    await client.publish_many("work", [{"n": n} for n in range(20, 40)], queue=True, reply=False)
    await client.flush()
    assert (await other.status())["queues"]["work"]["depth"] == 40
    async with await other.subscribe("work", queue=True, ack="manual") as work:
        for n in range(40):
            message = await work.next(timeout=5)
            assert message.data == {"n": n}
            await message.ack()


async def test_no_reply_publishes_keep_nothing_pending(client: Client, other: Client) -> None:
    for n in range(1000):
        await client.publish("bulk", n, queue=True, reply=False)
        assert _pending(client) == 0
    await client.publish_many("bulk", range(1000), queue=True, reply=False)
    assert _pending(client) == 0
    await client.flush()
    assert _pending(client) == 0
    assert (await other.status())["queues"]["bulk"]["depth"] == 2000


async def test_a_refusal_goes_to_the_callback_not_to_a_waiting_caller(
    quiet: tuple[Client, Refusals],
) -> None:
    client, refusals = quiet
    client._ids = itertools.count(1000)  # known request ids from here on
    # Both written in the same write: the refusal comes back first, right before the
    # ack the second caller waits for.
    nothing, message_id = await asyncio.gather(
        client.publish("not a topic", 1, reply=False), client.publish("fine", 2)
    )
    assert nothing is None
    assert isinstance(message_id, str)
    await client.flush()
    [error] = refusals.errors
    assert isinstance(error, RemoteError)
    assert error.code == "invalid_topic"
    assert error.request_id == 1000
    assert error.reply["reply"] is False
    assert "whitespace" in error.text


async def test_a_refusal_without_an_id_never_answers_the_oldest_request(
    proxy: Proxy, proxied: Client
) -> None:
    """An id-less reply normally answers the oldest pending request; marked
    ``"reply": false`` it must not, even then."""
    refusals = Refusals()
    proxied.error_callback = refusals
    proxy.hold()
    before = proxy.client_bytes
    ping = asyncio.create_task(proxied.ping())
    await proxy.wait_for_client_bytes(before + 1)
    assert _pending(proxied) == 1
    conn = proxied._conn
    assert conn is not None
    conn._on_reply({"type": "error", "reply": False, "error": "not stored", "code": "storage_full"})
    assert _pending(proxied) == 1
    proxy.release()
    assert isinstance(await ping, float)
    [error] = refusals.errors
    assert error.code == "storage_full"
    assert error.request_id is None


async def test_refusals_are_logged_by_default_and_a_failing_callback_is_survived(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="msg.client"):
        await client.publish("bad topic", 1, reply=False)
        await client.flush()
    [record] = [r for r in caplog.records if "refused" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "invalid_topic" in record.getMessage()
    caplog.clear()

    def broken(error: PublishRefusedError) -> None:
        raise RuntimeError("the application's bug")

    client.error_callback = broken
    with caplog.at_level(logging.ERROR, logger="msg.client"):
        await client.publish("bad topic", 1, reply=False)
        await client.flush()  # the reader lived on to read the pong
    assert any(r.exc_info and "error_callback" in r.getMessage() for r in caplog.records)
    assert client.connected
    message_id: str = await client.publish("good", 1)  # (typed str by default)
    assert message_id


@pytest.mark.parametrize("broker_args", [["--max-queue-messages", "3"]])
async def test_queue_full_reaches_the_callback(
    quiet: tuple[Client, Refusals], other: Client
) -> None:
    client, refusals = quiet
    client._ids = itertools.count(500)
    await client.publish_many("capped", range(5), queue=True, reply=False)
    await client.publish("capped", 5, queue=True, reply=False)
    await client.flush()
    assert [(e.code, e.request_id) for e in refusals.errors] == [
        ("queue_full", 503),
        ("queue_full", 504),
        ("queue_full", 505),
    ]
    assert (await other.status())["queues"]["capped"]["depth"] == 3


async def test_flush_waits_for_storage(tmp_path: Path, broker_args: list[str]) -> None:
    """After flush, the messages survive the broker being killed (fsync always)."""
    with BrokerProcess(tmp_path / "data", args=[*broker_args, "--fsync", "always"]) as broker:
        async with await Client.connect(broker.host, broker.port, reconnect=False) as client:
            for n in range(300):
                await client.publish("kept", n, queue=True, reply=False)
            await client.flush()
            broker.kill()
        await asyncio.to_thread(broker.restart)
        async with (
            await Client.connect(broker.host, broker.port) as client,
            await client.subscribe("kept", queue=True, ack="manual", prefetch=1000) as kept,
        ):
            for n in range(300):
                message = await kept.next(timeout=5)
                assert message.data == n
                await message.ack()


async def test_losing_the_connection_makes_the_next_flush_raise(
    proxy: Proxy, proxied: Client, other: Client
) -> None:
    async def cut_with_a_ping_in_flight() -> None:
        # A request whose reply is held: when it fails, the client has seen the cut.
        proxy.hold()
        ping = asyncio.create_task(proxied.ping())
        await proxy.wait_for_client_bytes(before + 1)
        proxy.cut()
        with pytest.raises(ConnectionClosedError):
            await ping
        proxy.release()

    before = proxy.client_bytes
    await cut_with_a_ping_in_flight()
    await proxied.flush()  # no no-reply publish was lost: nothing to report
    sub = await other.subscribe("lossy")
    before = proxy.client_bytes
    await proxied.publish("lossy", "maybe", reply=False)
    await cut_with_a_ping_in_flight()  # no reply accounts for "maybe"
    # While reconnecting, a no-reply publish waits for the new connection.
    await proxied.publish("lossy", "sure", reply=False)
    with pytest.raises(ConnectionClosedError, match="unknown"):
        await proxied.flush()
    await proxied.flush()  # reported once
    seen = [(await sub.next(timeout=5)).data]
    if seen[0] == "maybe":  # the broker had it before the cut, most likely
        seen.append((await sub.next(timeout=5)).data)
    assert seen[-1] == "sure"
    assert proxied.reconnects == 2


async def test_a_tight_loop_waits_for_a_broker_that_is_not_reading() -> None:
    """Flow control: nothing awaits no-reply publishes' replies, so each must wait
    for the socket once the transport's buffer is full, not queue without bound."""
    stop = asyncio.Event()

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()  # the handshake's ping
        rid = line.split(b'"id":')[1].split(b"}")[0]
        writer.write(b'{"type":"pong","id":' + rid + b"}\n")
        await stop.wait()  # and never read again
        writer.close()

    server = await asyncio.start_server(stalled, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with await Client.connect(
            "127.0.0.1", port, request_timeout=0.5, reconnect=False
        ) as client:
            payload = "x" * 1000

            async def tight_loop() -> None:
                for _ in range(100_000):  # 100 MB, far beyond what sockets buffer
                    await client.publish("t", payload, reply=False)

            with pytest.raises(RequestTimeoutError, match="nothing was sent"):
                await tight_loop()
            conn = client._conn
            assert conn is not None
            queued = conn.writer.transport.get_write_buffer_size() + sum(map(len, conn._out))
            assert queued < 1024 * 1024
            stop.set()
    finally:
        stop.set()
        server.close()
        await server.wait_closed()


def test_sync_client_no_reply(broker: BrokerProcess) -> None:
    refusals = Refusals()
    with (
        SyncClient.connect(broker.host, broker.port, error_callback=refusals) as client,
        SyncClient.connect(broker.host, broker.port) as consumer,
    ):
        with consumer.subscribe("sync-feed") as feed:
            assert client.publish("sync-feed", 0, reply=False) is None
            assert client.publish_many("sync-feed", [1, 2, 3], reply=False) is None
            assert [feed.next(timeout=5).data for _ in range(4)] == [0, 1, 2, 3]
        client.publish("sync-jobs", "a", queue=True, reply=False)
        client.publish("no good", "b", reply=False)
        client.flush()
        [error] = refusals.wait_for(1)
        assert error.code == "invalid_topic"
        assert refusals.threads == {f"msg-client-{broker.host}:{broker.port}"}
        assert consumer.status()["queues"]["sync-jobs"]["depth"] == 1
        assert isinstance(client.publish("sync-feed", "with a reply"), str)
