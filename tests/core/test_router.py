"""The broker core, driven with requests and a real memory store; no loop, no sockets."""

from __future__ import annotations

import json
from typing import Any

from msg.persistence import StoreFailure
from msg.protocol.codec import parse_request
from tests.core.harness import Harness, publish, run_call, subscribe

# ---------------------------------------------------------------------------
# pub/sub


def test_publish_is_acked_with_a_message_id_and_delivered_to_the_subscriber(h: Harness) -> None:
    sub, pub = h.connect(), h.connect()
    assert h.send(sub, subscribe("news")) == [{"type": "ack", "topic": "news", "mode": "pubsub"}]
    assert h.take(sub) == []
    [ack] = h.send(pub, publish("news", {"hello": "world"}, id=7))
    assert ack["type"] == "ack"
    assert ack["id"] == 7
    assert h.take(sub) == [
        {
            "type": "message",
            "topic": "news",
            "mode": "pubsub",
            "message": {"hello": "world"},
            "message_id": ack["message_id"],
        }
    ]


def test_every_subscriber_gets_every_message_in_publish_order(h: Harness) -> None:
    subs = [h.connect() for _ in range(3)]
    for sub in subs:
        h.send(sub, subscribe("t"))
        h.take(sub)
    pub = h.connect()
    h.send(pub, *(publish("t", n) for n in range(50)))
    for sub in subs:
        assert [m["message"] for m in h.messages(sub)] == list(range(50))


def test_a_subscriber_gets_only_messages_published_after_its_subscribe(h: Harness) -> None:
    pub, sub = h.connect(), h.connect()
    h.send(pub, publish("t", "before"))
    h.send(sub, subscribe("t"))
    h.send(pub, publish("t", "after"))
    assert [m["message"] for m in h.messages(sub)] == ["after"]


def test_topics_and_queues_with_the_same_name_are_separate(h: Harness) -> None:
    topic_sub, queue_sub, pub = h.connect(), h.connect(), h.connect()
    h.send(topic_sub, subscribe("x"))
    h.send(queue_sub, subscribe("x", "queue"))
    h.send(pub, publish("x", "to-topic"), publish("x", "to-queue", "queue"))
    assert [m["message"] for m in h.messages(topic_sub)] == ["to-topic"]
    assert [m["message"] for m in h.messages(queue_sub)] == ["to-queue"]


def test_unsubscribe_stops_deliveries(h: Harness) -> None:
    sub, pub = h.connect(), h.connect()
    h.send(sub, subscribe("t"))
    assert h.send(sub, {"action": "unsubscribe", "topic": "t"})[-1]["type"] == "ack"
    h.send(pub, publish("t", 1))
    assert h.messages(sub) == []


def test_subscribing_twice_and_unsubscribing_unknown_are_errors(h: Harness) -> None:
    s = h.connect()
    h.send(s, subscribe("t"))
    [error] = h.send(s, subscribe("t"))
    assert error["code"] == "already_subscribed"
    [error] = h.send(s, {"action": "unsubscribe", "topic": "other"})
    assert error["code"] == "not_subscribed"


# ---------------------------------------------------------------------------
# replies and ordering


def test_replies_come_in_request_order_even_when_storage_answers_later(h: Harness) -> None:
    s = h.connect()
    frames = h.send(
        s, publish("t", 1, id="a"), {"action": "ping", "id": "b"}, publish("q", 2, "queue", id="c")
    )
    assert [f.get("id") for f in frames] == ["a", "b", "c"]
    assert [f["type"] for f in frames] == ["ack", "pong", "ack"]


def test_the_subscribe_ack_precedes_the_first_message(h: Harness) -> None:
    pub, s = h.connect(), h.connect()
    h.send(pub, publish("jobs", "waiting", "queue"))
    frames = h.exchange(s, subscribe("jobs", "queue", id=1))
    assert [f["type"] for f in frames] == ["ack", "message"]


def test_a_publish_ending_a_read_is_written_before_it_is_booked(h: Harness) -> None:
    # The server writes the dirty sessions before it takes the store calls, so a
    # lone publish reaches its subscriber before the append and the ack's slot exist.
    sub, pub = h.connect(), h.connect()
    h.send(sub, subscribe("t"))
    h.router.handle(pub, [parse_request(publish("t", 1, id=9))], h.now)
    sessions = {session.id: session for session in h.router.take_dirty()}
    [frame] = sessions[sub].out.take()
    delivered = json.loads(frame)
    assert delivered["message"] == 1
    assert sessions[pub].out.unfilled == 0
    [call] = h.router.take_calls()
    assert call.name == "append"
    assert sessions[pub].out.unfilled == 1
    run_call(h, call)
    h.pump()
    assert h.take(pub) == [{"type": "ack", "message_id": delivered["message_id"], "id": 9}]


def test_a_publisher_subscribed_to_its_topic_gets_its_ack_before_its_message(
    h: Harness,
) -> None:
    s = h.connect()
    h.send(s, subscribe("t"))
    assert [f["type"] for f in h.exchange(s, publish("t", 1))] == ["ack", "message"]


def test_a_request_read_after_a_publish_is_answered_after_the_publish(h: Harness) -> None:
    sub, pub = h.connect(), h.connect()
    h.send(sub, subscribe("t"))
    h.router.handle(pub, [parse_request(publish("t", 1, id=1))], h.now)
    h.router.handle(pub, [parse_request({"action": "ping", "id": 2})], h.now)
    h.pump()
    assert [(f["type"], f["id"]) for f in h.take(pub)] == [("ack", 1), ("pong", 2)]


def test_a_publish_is_stored_when_its_publisher_leaves_before_the_flush(h: Harness) -> None:
    away, sub, pub = h.connect(), h.connect(), h.connect()
    h.send(away, subscribe("t", durable="d"))
    h.disconnect(away)
    h.send(sub, subscribe("t"))
    h.router.handle(pub, [parse_request(publish("t", "kept"))], h.now)
    h.router.disconnect(pub)
    h.pump()
    assert [m["message"] for m in h.messages(sub)] == ["kept"]
    back = h.connect()
    frames = h.exchange(back, subscribe("t", durable="d"))
    assert [m["message"] for m in frames[1:]] == ["kept"]


def test_errors_leave_the_connection_usable(h: Harness) -> None:
    s = h.connect()
    frames = h.send(
        s,
        {"action": "frobnicate"},
        {"action": "publish", "topic": ""},
        {"action": "ack", "message_id": "nope"},
        {"action": "ping"},
    )
    assert [f.get("code") for f in frames] == [
        "unknown_action",
        "invalid_topic",
        "unknown_message",
        None,
    ]
    assert frames[-1] == {"type": "pong"}


# ---------------------------------------------------------------------------
# queues


def test_queue_messages_wait_for_a_consumer_and_arrive_in_order(h: Harness) -> None:
    pub = h.connect()
    h.send(pub, *(publish("jobs", n, "queue") for n in range(10)))
    consumer = h.connect()
    h.send(consumer, subscribe("jobs", "queue"))
    assert [m["message"] for m in h.messages(consumer)] == list(range(10))


def test_each_queue_message_goes_to_exactly_one_consumer_round_robin(h: Harness) -> None:
    consumers = [h.connect() for _ in range(4)]
    for c in consumers:
        h.send(c, subscribe("jobs", "queue"))
        h.take(c)
    pub = h.connect()
    for n in range(40):
        h.send(pub, publish("jobs", n, "queue"))
    got = [[m["message"] for m in h.messages(c)] for c in consumers]
    assert sorted(n for g in got for n in g) == list(range(40))
    assert [len(g) for g in got] == [10, 10, 10, 10]
    for g in got:
        assert g == sorted(g)


def test_manual_ack_respects_prefetch(h: Harness) -> None:
    pub, c = h.connect(), h.connect()
    h.send(pub, *(publish("jobs", n, "queue") for n in range(5)))
    h.send(c, subscribe("jobs", "queue", ack="manual", prefetch=2))
    first = h.messages(c)
    assert [m["message"] for m in first] == [0, 1]
    [ack] = h.send(c, {"action": "ack", "message_id": first[0]["message_id"], "id": "x"})
    assert ack == {"type": "ack", "id": "x", "message_id": first[0]["message_id"]}
    assert [m["message"] for m in h.messages(c)] == [2]


def test_acking_twice_or_from_another_connection_is_unknown_message(h: Harness) -> None:
    pub, c, other = h.connect(), h.connect(), h.connect()
    h.send(pub, publish("jobs", 1, "queue"))
    h.send(c, subscribe("jobs", "queue", ack="manual"))
    [m] = h.messages(c)
    [error] = h.send(other, {"action": "ack", "message_id": m["message_id"]})
    assert error["code"] == "unknown_message"
    assert error["message_id"] == m["message_id"]
    assert h.send(c, {"action": "ack", "message_id": m["message_id"]})[0]["type"] == "ack"
    [error] = h.send(c, {"action": "ack", "message_id": m["message_id"]})
    assert error["code"] == "unknown_message"


def test_a_run_of_acks_is_answered_in_order_whatever_it_mixes(h: Harness) -> None:
    pub, c = h.connect(), h.connect()
    h.send(c, subscribe("jobs", "queue", ack="manual", prefetch=4))
    h.send(c, subscribe("mail", "queue", ack="manual", prefetch=4))
    h.take(c)
    h.send(pub, *[publish("jobs", n, "queue") for n in range(4)], publish("mail", 9, "queue"))
    delivered = h.messages(c)
    jobs = [m["message_id"] for m in delivered if m["topic"] == "jobs"]
    [mail] = [m["message_id"] for m in delivered if m["topic"] == "mail"]
    # One read: all plain acks of one consumer (the batched path) ...
    replies = h.send(c, *[{"action": "ack", "message_id": m} for m in jobs[:2]])
    assert [(r["type"], r["message_id"]) for r in replies] == [("ack", m) for m in jobs[:2]]
    # ... then a read mixing another consumer, a repeat and an unknown id: each
    # answered in turn.
    acks = [jobs[2], mail, jobs[2], "t-999", jobs[3]]
    replies = h.send(c, *[{"action": "ack", "message_id": m} for m in acks])
    assert [r.get("code", r["type"]) for r in replies] == [
        "ack",
        "ack",
        "unknown_message",
        "unknown_message",
        "ack",
    ]
    assert [r["message_id"] for r in replies] == acks
    # Every ack freed a prefetch slot: four more messages come at once.
    h.send(pub, *[publish("jobs", n, "queue") for n in range(4, 8)])
    assert len([m for m in h.messages(c) if m["topic"] == "jobs"]) == 4


def test_a_claim_for_many_consumers_keeps_each_ones_order(h: Harness) -> None:
    pub = h.connect()
    consumers = [h.connect() for _ in range(3)]
    for c in consumers:
        h.send(c, subscribe("jobs", "queue", ack="manual", prefetch=100))
    # One connection with two consumers (of two queues) takes the one-by-one path.
    both = h.connect()
    h.send(both, subscribe("jobs", "queue", ack="manual", prefetch=100))
    h.send(both, subscribe("mail", "queue", ack="manual", prefetch=100))
    h.send(pub, *[publish("jobs", n, "queue") for n in range(40)])
    got = {c: h.messages(c) for c in [*consumers, both]}
    numbers = {c: [m["message"] for m in ms] for c, ms in got.items()}
    assert sorted(n for ns in numbers.values() for n in ns) == list(range(40))
    for ns in numbers.values():
        assert ns == sorted(ns)
        assert len(ns) == 10  # round-robin
    # Each delivery can be acked by its own consumer's connection, and only by it.
    a, b = consumers[0], consumers[1]
    [error] = h.send(b, {"action": "ack", "message_id": got[a][0]["message_id"]})
    assert error["code"] == "unknown_message"
    for c, ms in got.items():
        replies = h.send(c, *[{"action": "ack", "message_id": m["message_id"]} for m in ms])
        assert [r["type"] for r in replies] == ["ack"] * 10


def test_nack_requeue_redelivers_to_another_consumer_marked_redelivered(h: Harness) -> None:
    a, b, pub = h.connect(), h.connect(), h.connect()
    h.send(a, subscribe("jobs", "queue", ack="manual", prefetch=1))
    h.send(b, subscribe("jobs", "queue", ack="manual", prefetch=1))
    h.take(a), h.take(b)
    h.send(pub, publish("jobs", "only", "queue"))
    got_a, got_b = h.messages(a), h.messages(b)
    [first] = got_a + got_b
    holder, other = (a, b) if got_a else (b, a)
    h.send(holder, {"action": "nack", "message_id": first["message_id"], "requeue": True})
    [again] = h.messages(other)
    assert again["message_id"] == first["message_id"]
    assert again["redelivered"] is True
    assert again["attempt"] == 2


def test_unacked_messages_of_a_disconnected_consumer_are_redelivered(h: Harness) -> None:
    a, pub = h.connect(), h.connect()
    h.send(a, subscribe("jobs", "queue", ack="manual"))
    h.send(pub, *(publish("jobs", n, "queue") for n in range(3)))
    delivered = h.messages(a)
    h.send(a, {"action": "ack", "message_id": delivered[0]["message_id"]})
    h.disconnect(a)
    b = h.connect()
    h.send(b, subscribe("jobs", "queue", ack="manual"))
    again = h.messages(b)
    assert [m["message"] for m in again] == [1, 2]
    assert all(m["redelivered"] for m in again)


def test_nack_without_requeue_dead_letters_the_message(h: Harness) -> None:
    c, pub = h.connect(), h.connect()
    h.send(c, subscribe("jobs", "queue", ack="manual"))
    h.send(pub, publish("jobs", "poison", "queue"))
    [m] = h.messages(c)
    assert (
        h.send(c, {"action": "nack", "message_id": m["message_id"], "requeue": False})[0]["type"]
        == "ack"
    )
    dead = h.connect()
    h.send(dead, subscribe("$dead.jobs", "queue"))
    [d] = h.messages(dead)
    assert d["message"] == "poison"
    assert d["topic"] == "$dead.jobs"
    assert h.messages(c) == []


def test_auto_ack_consumer_that_stops_reading_stops_receiving(h: Harness) -> None:
    c, other, pub = h.connect(), h.connect(), h.connect()
    h.stalled.add(c)
    h.send(c, subscribe("jobs", "queue", prefetch=5))
    h.send(pub, *(publish("jobs", n, "queue") for n in range(20)))
    assert len(h.messages(c)) == 5
    h.send(other, subscribe("jobs", "queue"))
    assert [m["message"] for m in h.messages(other)] == list(range(5, 20))


def test_unsettled_deliveries_are_taken_back_after_the_ack_timeout() -> None:
    h = Harness(ack_timeout=30.0)
    a, b, pub = h.connect(), h.connect(), h.connect()
    h.send(a, subscribe("jobs", "queue", ack="manual"))
    h.send(pub, publish("jobs", "slow", "queue"))
    [m] = h.messages(a)
    h.send(b, subscribe("jobs", "queue", ack="manual"))
    h.tick(10)
    assert h.messages(b) == []
    h.tick(25)
    [again] = h.messages(b)
    assert again["message_id"] == m["message_id"]
    assert again["attempt"] == 2
    [late] = h.send(a, {"action": "ack", "message_id": m["message_id"]})
    assert late["code"] == "unknown_message"


def test_publishes_are_refused_while_storage_is_read_only(h: Harness) -> None:
    s = h.connect()
    h.router.read_only = StoreFailure.STORAGE_ERROR
    [error] = h.send(s, publish("t", 1, id=3))
    assert error["code"] == "storage_error"
    assert error["id"] == 3
    h.router.read_only = None
    assert h.send(s, publish("t", 1))[0]["type"] == "ack"


# ---------------------------------------------------------------------------
# durable subscriptions


def test_durable_subscriber_gets_what_was_published_while_it_was_away(h: Harness) -> None:
    pub = h.connect()
    s1 = h.connect()
    h.send(s1, subscribe("news", durable="svc"))
    h.send(pub, publish("news", 1))
    assert [m["message"] for m in h.messages(s1)] == [1]
    h.disconnect(s1)
    h.send(pub, *(publish("news", n) for n in (2, 3, 4)))
    s2 = h.connect()
    frames = h.exchange(s2, subscribe("news", durable="svc"))
    assert frames[0]["type"] == "ack"
    assert frames[0]["durable"] == "svc"
    assert [m["message"] for m in frames[1:]] == [2, 3, 4]
    assert all(m["durable"] == "svc" for m in frames[1:])
    h.send(pub, publish("news", 5))
    assert [m["message"] for m in h.messages(s2)] == [5]


def test_a_new_durable_starts_at_the_end_of_the_log(h: Harness) -> None:
    pub, s = h.connect(), h.connect()
    h.send(pub, publish("news", "old"))
    h.send(s, subscribe("news", durable="fresh"))
    h.send(pub, publish("news", "new"))
    assert [m["message"] for m in h.messages(s)] == ["new"]


def test_a_durable_name_can_be_attached_once(h: Harness) -> None:
    a, b = h.connect(), h.connect()
    h.send(a, subscribe("news", durable="svc"))
    [error] = h.send(b, subscribe("news", durable="svc"))
    assert error["code"] == "durable_in_use"


def test_durable_manual_ack_redelivers_unacked_on_return(h: Harness) -> None:
    pub, s1 = h.connect(), h.connect()
    h.send(s1, subscribe("news", durable="svc", ack="manual", prefetch=10))
    h.send(pub, *(publish("news", n) for n in range(3)))
    got = h.messages(s1)
    h.send(s1, {"action": "ack", "message_id": got[0]["message_id"]})
    h.disconnect(s1)
    s2 = h.connect()
    h.send(s2, subscribe("news", durable="svc", ack="manual"))
    assert [m["message"] for m in h.messages(s2)] == [1, 2]


def test_durable_nack_requeue_delivers_again(h: Harness) -> None:
    pub, s = h.connect(), h.connect()
    h.send(s, subscribe("news", durable="svc", ack="manual", prefetch=1))
    h.send(pub, publish("news", "x"))
    [m] = h.messages(s)
    h.send(s, {"action": "nack", "message_id": m["message_id"]})
    [again] = h.messages(s)
    assert again["message_id"] == m["message_id"]
    assert again["attempt"] == 2


def test_unsubscribe_with_durable_forgets_the_cursor(h: Harness) -> None:
    pub, s = h.connect(), h.connect()
    h.send(s, subscribe("news", durable="svc"))
    [ack] = h.send(s, {"action": "unsubscribe", "topic": "news", "durable": "svc"})
    assert ack["type"] == "ack"
    h.send(pub, publish("news", "while-forgotten"))
    h.send(s, subscribe("news", durable="svc"))
    h.take(s)
    h.send(pub, publish("news", "later"))
    assert [m["message"] for m in h.messages(s)] == ["later"]
    [error] = h.send(pub, {"action": "unsubscribe", "topic": "news", "durable": "nobody"})
    assert error["code"] == "not_subscribed"


# ---------------------------------------------------------------------------
# status


def test_status_reports_queues_topics_connections_and_rates(h: Harness) -> None:
    pub, c, s = h.connect(), h.connect(), h.connect()
    h.send(s, subscribe("news"))
    h.send(c, subscribe("jobs", "queue", ack="manual", prefetch=1))
    h.send(pub, *(publish("jobs", n, "queue") for n in range(3)), publish("news", "x"))
    h.tick(1)
    [status] = h.send(pub, {"action": "status", "id": "s"})
    assert status["type"] == "status"
    assert status["id"] == "s"
    assert status["connections"] == 3
    assert status["queues"]["jobs"]["depth"] == 2
    assert status["queues"]["jobs"]["unacked"] == 1
    assert status["queues"]["jobs"]["consumers"] == 1
    assert status["topics"]["news"]["subscribers"] == 1
    assert status["totals"]["published"] == 4
    assert set(status["rates"]) == {"published_per_s", "delivered_per_s", "acked_per_s"}
    assert status["uptime"] >= 1


# ---------------------------------------------------------------------------
# every reply is owed, whatever happens in between


def test_a_durable_subscribe_ended_before_its_cursor_opened_is_still_answered(
    h: Harness,
) -> None:
    s = h.connect()
    frames: list[Any] = [
        parse_request(subscribe("news", durable="svc")),
        parse_request({"action": "ping"}),
    ]
    h.router.handle(s, frames, h.now)
    # The peer half-closes before the store has opened the cursor.
    h.router.end_subscriptions(s)
    h.pump()
    assert [f["type"] for f in h.take(s)] == ["ack", "pong"]
    assert h.router.pending_replies(s) == 0


def test_acks_waiting_on_a_forgotten_durable_cursor_are_answered(h: Harness) -> None:
    pub, s = h.connect(), h.connect()
    h.send(s, subscribe("news", durable="svc", ack="manual"))
    h.send(pub, publish("news", 1))
    [m] = h.messages(s)
    frames = h.send(
        s,
        {"action": "ack", "message_id": m["message_id"], "id": "a"},
        {"action": "unsubscribe", "topic": "news", "durable": "svc", "id": "u"},
    )
    assert [(f["type"], f["id"]) for f in frames] == [("ack", "a"), ("ack", "u")]
    assert h.router.pending_replies(s) == 0


def test_a_publish_after_a_durable_subscribe_in_one_batch_reaches_it(h: Harness) -> None:
    s = h.connect()
    frames = h.exchange(
        s,
        publish("jobs", 0, "queue"),
        subscribe("d", durable="x"),
        publish("d", "after"),
    )
    assert [f["type"] for f in frames] == ["ack", "ack", "ack", "message"]
    assert frames[-1]["message"] == "after"


def test_status_lists_a_queue_that_only_has_consumers(h: Harness) -> None:
    s = h.connect()
    h.send(s, subscribe("empty", "queue"))
    [status] = h.send(s, {"action": "status"})
    assert status["queues"]["empty"]["consumers"] == 1
    assert status["queues"]["empty"]["depth"] == 0
