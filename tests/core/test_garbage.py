"""The hot paths create no reference cycles.

The broker raises the garbage collector's thresholds (see msg.broker.server), so an
object that only the cyclic collector can free lives much longer than one freed by
reference counting; a cycle through a batch once kept every payload of every batch
alive for minutes. This test runs publishes, deliveries and acks with the collector
off, then counts what only the collector can reclaim.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.core.harness import Harness


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("collector_off")
def test_publish_deliver_ack_leave_no_cycles() -> None:
    h = Harness()
    publisher, subscriber, consumer = h.connect(), h.connect(), h.connect()
    h.send(subscriber, {"action": "subscribe", "topic": "news"})
    h.send(consumer, {"action": "subscribe", "topic": "jobs", "mode": "queue", "ack": "manual"})
    for _ in range(20):
        h.send(
            publisher,
            *({"action": "publish", "topic": "news", "message": n} for n in range(50)),
            *(
                {"action": "publish", "topic": "jobs", "message": n, "mode": "queue"}
                for n in range(50)
            ),
        )
        for message in h.messages(consumer):
            h.send(consumer, {"action": "ack", "message_id": message["message_id"]})
        h.take(subscriber)
    assert gc.collect() < 50
