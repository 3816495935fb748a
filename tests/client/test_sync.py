"""The blocking client, end to end against a real broker (plain functions, no loop)."""

from __future__ import annotations

import threading

import pytest

from msg.client import (
    ConnectFailedError,
    ReceiveTimeoutError,
    RemoteError,
    SyncClient,
)
from msg.testing import BrokerProcess


def test_sync_client_end_to_end(broker: BrokerProcess) -> None:
    with (
        SyncClient.connect(broker.host, broker.port) as client,
        SyncClient.connect(broker.host, broker.port) as publisher,
    ):
        assert client.ping() >= 0
        # Pub/sub, iterated.
        with client.subscribe("news") as news:
            ids = publisher.publish_many("news", ["a", "b", "c"])
            got = []
            for message in news:
                got.append((message.data, message.message_id, message.topic))
                if len(got) == 3:
                    break
            assert got == [(d, i, "news") for d, i in zip("abc", ids, strict=True)]
            with pytest.raises(ReceiveTimeoutError):
                news.next(timeout=0.05)
        # A queue with manual acks.
        publisher.publish("jobs", {"n": 1}, queue=True)
        with client.subscribe("jobs", queue=True, ack="manual") as jobs:
            job = jobs.next(timeout=5)
            assert job.data == {"n": 1}
            assert job.raw["mode"] == "queue"
            job.nack()
            again = jobs.next(timeout=5)
            assert again.redelivered
            assert again.attempt == 2
            again.ack()
        status = publisher.status()
        assert status["queues"]["jobs"]["acked"] == 1
        with pytest.raises(RemoteError) as caught:
            client.ack("nothing-like-it")
        assert caught.value.code == "unknown_message"
    assert client.closed


def test_sync_subscription_ends_when_unsubscribed_from_another_thread(
    broker: BrokerProcess,
) -> None:
    with SyncClient.connect(broker.host, broker.port) as client:
        sub = client.subscribe("t")
        ended = threading.Event()

        def consume() -> None:
            for _ in sub:
                pass
            ended.set()

        consumer = threading.Thread(target=consume)
        consumer.start()
        client.unsubscribe(sub)
        assert ended.wait(10)
        consumer.join(10)


def test_sync_connect_refused(broker: BrokerProcess) -> None:
    broker.stop()
    with pytest.raises(ConnectFailedError):
        SyncClient.connect(broker.host, broker.port, connect_timeout=2)
    # No thread is left behind.
    assert not [t for t in threading.enumerate() if t.name.startswith("msg-client")]
