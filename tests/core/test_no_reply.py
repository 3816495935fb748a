"""Publishes that ask for no reply (``"reply": false``): stored and delivered like any
other, answered only when refused, and still in their place in the reply order."""

from __future__ import annotations

from typing import Any

import pytest

from msg.core.ids import SequentialIds
from msg.core.router import Router
from msg.persistence import StoreFailure
from msg.protocol.codec import RequestReader, encode_request
from msg.protocol.frames import Publishes
from msg.storage.memory import MemoryStore
from tests.core.harness import Harness, publish, run_now, subscribe


def quiet(topic: str, message: Any, mode: str = "pubsub", **extra: Any) -> dict[str, Any]:
    return publish(topic, message, mode, reply=False, **extra)


def test_a_stored_publish_that_asked_for_no_reply_is_answered_by_nothing(h: Harness) -> None:
    sub, pub = h.connect(), h.connect()
    h.send(sub, subscribe("news"))
    assert h.send(pub, *(quiet("news", n) for n in range(5))) == []
    assert [m["message"] for m in h.messages(sub)] == list(range(5))
    assert h.router.pending_replies(pub) == 0


def test_queue_messages_published_without_replies_are_stored_for_consumers(h: Harness) -> None:
    pub = h.connect()
    assert h.send(pub, *(quiet("jobs", n, "queue") for n in range(3))) == []
    consumer = h.connect()
    h.send(consumer, subscribe("jobs", "queue"))
    assert [m["message"] for m in h.messages(consumer)] == [0, 1, 2]


def test_replies_to_the_requests_around_them_keep_their_order(h: Harness) -> None:
    pub = h.connect()
    replies = h.send(
        pub,
        publish("t", 1, id=1),
        quiet("t", 2, id=2),
        quiet("t", 3),
        publish("t", 4, id=4),
        {"action": "ping", "id": 5},
    )
    assert [(r["type"], r.get("id")) for r in replies] == [("ack", 1), ("ack", 4), ("pong", 5)]


def test_a_refused_publish_that_asked_for_no_reply_gets_its_error_in_its_place() -> None:
    h = Harness()
    h.store = MemoryStore(max_queue_messages=2)
    h.router = Router(ids=SequentialIds("t"), now=h.now)
    h.router.recovered(run_now(h.store.open()))
    pub = h.connect()
    replies = h.send(
        pub,
        quiet("jobs", 1, "queue"),
        quiet("jobs", 2, "queue", id="b"),
        quiet("jobs", 3, "queue", id="c"),
        publish("jobs", 4, "queue", id="d"),
        {"action": "ping", "id": "e"},
    )
    assert [(r["type"], r.get("id"), r.get("code"), r.get("reply")) for r in replies] == [
        ("error", "c", "queue_full", False),
        ("error", "d", "queue_full", None),
        ("pong", "e", None, None),
    ]


def test_a_publish_refused_while_read_only_says_it_asked_for_no_reply(h: Harness) -> None:
    s = h.connect()
    h.router.read_only = StoreFailure.STORAGE_FULL
    [error] = h.send(s, quiet("t", 1, id=3))
    assert (error["code"], error["id"], error["reply"]) == ("storage_full", 3, False)


def test_a_malformed_publish_that_asked_for_no_reply_says_so(h: Harness) -> None:
    s = h.connect()
    [error, pong] = h.send(s, quiet("a b", 1), {"action": "ping"})
    assert (error["code"], error["reply"]) == ("invalid_topic", False)
    assert pong["type"] == "pong"


def test_acks_after_publishes_without_replies_are_answered(h: Harness) -> None:
    # An ack never joins a run of publishes that asked for no reply (the run's slot
    # would swallow its reply).
    c, pub = h.connect(), h.connect()
    h.send(c, subscribe("jobs", "queue", ack="manual"))
    h.send(pub, publish("jobs", "a", "queue"), publish("jobs", "b", "queue"))
    first, second = h.messages(c)
    replies = h.send(
        c,
        {"action": "ack", "message_id": first["message_id"]},
        quiet("jobs", "c", "queue"),
        {"action": "ack", "message_id": second["message_id"]},
    )
    assert [(r["type"], r["message_id"]) for r in replies] == [
        ("ack", first["message_id"]),
        ("ack", second["message_id"]),
    ]


@pytest.mark.parametrize("subscribed", [False, True], ids=["other-subscriber", "self-subscribed"])
def test_read_batches_of_publishes_without_replies(h: Harness, subscribed: bool) -> None:
    # As the server hands them over: a whole read cut into batches by the codec,
    # including one that is sent to the subscribers before it is booked.
    sub, pub = h.connect(), h.connect()
    h.send(sub, subscribe("news"))
    if subscribed:
        h.send(pub, subscribe("news"))
    reader = RequestReader()
    lines = [encode_request("publish", topic="news", reply=False, message=n) for n in range(4)]
    lines.append(encode_request("publish", topic="news", message=4, id=9))
    lines += [encode_request("publish", topic="news", reply=False, message=n) for n in (5, 6)]
    batches = reader.feed_batches(b"".join(lines))
    assert [(type(b), getattr(b, "reply", None)) for b in batches] == [
        (Publishes, False),
        (Publishes, True),
        (Publishes, False),
    ]
    h.router.handle(pub, batches, h.now)
    h.pump()
    frames = h.take(pub)
    replies = [f for f in frames if f["type"] != "message"]
    assert [(r["type"], r.get("id")) for r in replies] == [("ack", 9)]
    assert [m["message"] for m in h.messages(sub)] == list(range(7))
    if subscribed:
        # The publisher's own copy of message 4 comes after its ack.
        kinds = [(f["type"], f.get("message")) for f in frames]
        assert kinds.index(("ack", None)) < kinds.index(("message", 4))
