"""Dead letters: a nack's reason travels with the message, and a message delivered
``max_deliveries`` times without an ack is dead-lettered instead of delivered again."""

from __future__ import annotations

from typing import Any

from tests.core.harness import Harness, publish, subscribe


def nack(message: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"action": "nack", "message_id": message["message_id"], **fields}


def dead_letters(h: Harness, queue: str = "jobs") -> list[dict[str, Any]]:
    reader = h.connect()
    h.send(reader, subscribe(f"$dead.{queue}", "queue"))
    return h.messages(reader)


def test_the_reason_of_a_nack_is_delivered_with_the_dead_letter() -> None:
    h = Harness()
    c, pub = h.connect(), h.connect()
    h.send(c, subscribe("jobs", "queue", ack="manual"))
    h.send(pub, publish("jobs", "poison", "queue"), publish("jobs", "bad", "queue"))
    first, second = h.messages(c)
    [reply] = h.send(c, nack(first, requeue=False, reason="cannot parse: 'poison'"))
    assert reply == {"type": "ack", "message_id": first["message_id"]}
    h.send(c, nack(second, requeue=False))
    with_reason, without = dead_letters(h)
    assert with_reason["message"] == "poison"
    assert with_reason["reason"] == "cannot parse: 'poison'"
    assert without["message"] == "bad"
    assert "reason" not in without


def test_a_requeued_message_keeps_no_reason() -> None:
    h = Harness()
    c, pub = h.connect(), h.connect()
    h.send(c, subscribe("jobs", "queue", ack="manual"))
    h.send(pub, publish("jobs", "retry me", "queue"))
    [m] = h.messages(c)
    h.send(c, nack(m, reason="busy"))
    [again] = h.messages(c)
    assert again["attempt"] == 2
    assert "reason" not in again


def test_a_message_is_dead_lettered_after_max_deliveries() -> None:
    h = Harness(max_deliveries=3)
    c, pub = h.connect(), h.connect()
    h.send(c, subscribe("jobs", "queue", ack="manual"))
    h.send(pub, publish("jobs", "poison", "queue"), publish("jobs", "fine", "queue"))
    attempts = []
    for _ in range(3):
        for m in h.messages(c):
            if m["message"] == "poison":
                attempts.append(m.get("attempt", 1))
                h.send(c, nack(m))  # requeue: the consumer crashes on it, say
    assert attempts == [1, 2, 3]
    assert h.messages(c) == []  # the fourth delivery never happens
    [corpse] = dead_letters(h)
    assert corpse["message"] == "poison"
    assert corpse["reason"] == "delivered 3 times without an ack (max_deliveries)"
    status = h.send(pub, {"action": "status"})[0]
    assert status["queues"]["jobs"]["dead_lettered"] == 1
    assert status["queues"]["jobs"]["depth"] == 0
    assert status["totals"]["dead_lettered"] == 1


def test_disconnects_count_as_deliveries_too() -> None:
    # A consumer that dies on a message (its connection drops with it unacked) is
    # the case the limit is for.
    h = Harness(max_deliveries=2)
    pub = h.connect()
    h.send(pub, publish("jobs", "crasher", "queue"))
    for _ in range(2):
        c = h.connect()
        h.send(c, subscribe("jobs", "queue", ack="manual"))
        assert [m["message"] for m in h.messages(c)] == ["crasher"]
        h.disconnect(c)
    c = h.connect()
    h.send(c, subscribe("jobs", "queue", ack="manual"))
    assert h.messages(c) == []
    assert [m["message"] for m in dead_letters(h)] == ["crasher"]


def test_without_a_limit_a_message_is_delivered_again_and_again() -> None:
    h = Harness(max_deliveries=0)
    c, pub = h.connect(), h.connect()
    h.send(c, subscribe("jobs", "queue", ack="manual"))
    h.send(pub, publish("jobs", "poison", "queue"))
    for attempt in range(1, 31):
        [m] = h.messages(c)
        assert m.get("attempt", 1) == attempt
        h.send(c, nack(m))


def test_auto_ack_consumers_and_dead_letter_queues_have_no_limit() -> None:
    h = Harness(max_deliveries=1)
    manual, pub = h.connect(), h.connect()
    h.send(manual, subscribe("jobs", "queue", ack="manual"))
    h.send(pub, publish("jobs", "twice", "queue"))
    [m] = h.messages(manual)
    h.send(manual, nack(m, requeue=False, reason="no"))
    # The dead-letter queue is the operator's: read it as often as needed.
    reader = h.connect()
    h.send(reader, subscribe("$dead.jobs", "queue", ack="manual"))
    for _ in range(3):
        [d] = h.messages(reader)
        h.send(reader, nack(d))
    h.send(reader, {"action": "unsubscribe", "topic": "$dead.jobs", "mode": "queue"})
    # An auto-ack consumer takes the message whatever its count: it is done once sent.
    auto = h.connect()
    h.send(auto, subscribe("$dead.jobs", "queue"))
    [taken] = h.messages(auto)
    assert taken["message"] == "twice"
