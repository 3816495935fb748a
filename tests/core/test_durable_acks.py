"""Durable subscriptions remember acks above the floor: what was acked out of order is
not delivered again after a reconnect, and everything not acked is.

Driven with the core harness (a real memory store, no loop, no sockets); the file
store's half is in tests/storage, a real broker's in tests/integration.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from msg.core.model import AckedPositions
from msg.persistence import Cursor, CursorCommit, StoreFailure
from msg.protocol.codec import parse_request
from msg.storage.memory import MemoryStore
from tests.core.harness import Harness, publish, run_now


def subscribe(name: str, **extra: Any) -> dict[str, Any]:
    return {"action": "subscribe", "topic": "news", "durable": name, "ack": "manual", **extra}


def ack(message: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"action": "ack", "message_id": message["message_id"], **extra}


def publish_n(h: Harness, count: int) -> None:
    pub = h.connect()
    replies = h.send(pub, *(publish("news", n) for n in range(count)))
    assert [r["type"] for r in replies] == ["ack"] * count


def subscribed_to_published(
    h: Harness, count: int, **options: Any
) -> tuple[int, list[dict[str, Any]]]:
    """A new connection subscribed as "svc" to "news", then ``count`` messages
    published: the connection and what it was delivered."""
    session = h.connect()
    h.send(session, subscribe("svc", **options))
    publish_n(h, count)
    return session, h.messages(session)


def stored(h: Harness, name: str = "svc") -> Cursor:
    """The cursor as the store holds it (it exists: opening does not create it)."""
    assert name in run_now(h.store.stats()).topics["news"].cursors
    return run_now(h.store.open_cursor("news", name))


# -- the acks above the floor survive a reconnect ------------------------------------


def test_acked_after_an_unacked_one_are_not_delivered_again_after_a_reconnect(
    h: Harness,
) -> None:
    s1, got = subscribed_to_published(h, 1000, prefetch=1000)
    assert [m["message"] for m in got] == list(range(1000))
    replies = h.send(s1, *(ack(m, id=n) for n, m in enumerate(got[1:], 1)))
    assert [r["id"] for r in replies] == list(range(1, 1000))
    # One held message costs one range, however many were acked after it.
    assert stored(h) == Cursor(0, ((1, 999),))
    h.disconnect(s1)

    s2 = h.connect()
    h.send(s2, subscribe("svc"))
    [again] = h.messages(s2)
    assert (again["message"], again["message_id"]) == (0, got[0]["message_id"])
    h.send(s2, ack(again))
    assert stored(h) == Cursor(1000)
    h.disconnect(s2)

    s3 = h.connect()
    h.send(s3, subscribe("svc"))
    assert h.messages(s3) == []
    h.send(h.connect(), publish("news", "next"))
    assert [m["message"] for m in h.messages(s3)] == ["next"]


@pytest.mark.parametrize("prefetch", [1, 3, 100])
def test_scattered_acks_bring_back_exactly_the_unacked_in_order(h: Harness, prefetch: int) -> None:
    s1, got = subscribed_to_published(h, 100, prefetch=100)
    held = [m["message"] for m in got if m["message"] % 7 == 0 or m["message"] % 10 == 3]
    h.send(s1, *(ack(m) for m in got if m["message"] not in held))
    h.disconnect(s1)

    # A smaller prefetch on return: the reads must skip the acked runs, credit or not.
    s2 = h.connect()
    h.send(s2, subscribe("svc", prefetch=prefetch))
    seen: list[int] = []
    while True:
        batch = h.messages(s2)
        if not batch:
            break
        seen += [m["message"] for m in batch]
        h.send(s2, *(ack(m) for m in batch))
    assert seen == held
    assert stored(h) == Cursor(100)


def test_a_reconnect_in_the_same_iteration_as_the_disconnect_sees_the_last_acks(
    h: Harness,
) -> None:
    # The old connection acks and drops, and the subscriber is back, all before the
    # server flushes: the old subscription's last commit must reach the store before
    # the new one opens the cursor.
    s1, got = subscribed_to_published(h, 5, prefetch=10)
    h.router.handle(s1, [parse_request(ack(m)) for m in got[2:]], h.now)
    h.router.disconnect(s1)
    s2 = h.connect()
    h.send(s2, subscribe("svc"))
    assert [m["message"] for m in h.messages(s2)] == [0, 1]


def test_a_nack_without_requeue_counts_as_done_above_the_floor(h: Harness) -> None:
    s1, got = subscribed_to_published(h, 4)
    h.send(s1, {"action": "nack", "message_id": got[2]["message_id"], "requeue": False})
    h.send(s1, ack(got[3]))
    assert stored(h) == Cursor(0, ((2, 3),))
    h.disconnect(s1)
    s2 = h.connect()
    h.send(s2, subscribe("svc"))
    assert [m["message"] for m in h.messages(s2)] == [0, 1]


def test_a_requeued_message_stays_a_gap_until_acked(h: Harness) -> None:
    s, got = subscribed_to_published(h, 3, prefetch=10)
    h.send(s, ack(got[0]), ack(got[2]))
    h.send(s, {"action": "nack", "message_id": got[1]["message_id"]})
    [again] = h.messages(s)
    assert (again["message"], again["attempt"]) == (1, 2)
    assert stored(h) == Cursor(1, ((2, 2),))
    h.send(s, ack(again))
    assert stored(h) == Cursor(3)


def test_an_auto_ack_subscriber_skips_what_a_manual_one_acked(h: Harness) -> None:
    s1, got = subscribed_to_published(h, 6)
    h.send(s1, ack(got[1]), ack(got[4]), ack(got[5]))
    h.disconnect(s1)
    s2 = h.connect()
    h.send(s2, subscribe("svc", ack="auto"))
    assert [m["message"] for m in h.messages(s2)] == [0, 2, 3]
    assert stored(h) == Cursor(6)


def test_status_counts_what_is_acked_ahead_as_not_pending(h: Harness) -> None:
    s, got = subscribed_to_published(h, 10)
    h.send(s, *(ack(m) for m in got[3:]))
    [status] = h.send(s, {"action": "status"})
    assert status["topics"]["news"]["durable"]["svc"] == {
        "online": True,
        "position": 0,
        "acked_ahead": 7,
        "pending": 3,
    }


class RecordingStore(MemoryStore):
    """A memory store that keeps every cursor commit batch it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[list[CursorCommit]] = []

    async def commit_cursors(self, items: Sequence[CursorCommit]) -> list[StoreFailure | None]:
        self.commits.append(list(items))
        return await super().commit_cursors(items)


def test_the_acks_of_one_read_make_one_commit_that_every_reply_waits_for() -> None:
    h = Harness()
    store = h.store = RecordingStore()
    s, got = subscribed_to_published(h, 5)
    store.commits.clear()
    replies = h.send(s, *(ack(m, id=n) for n, m in enumerate(got) if n != 1))
    assert [r["id"] for r in replies] == [0, 2, 3, 4]
    assert store.commits == [[CursorCommit("news", "svc", 1, ((2, 4),))]]


# -- the range set -----------------------------------------------------------------------


def test_acked_positions_join_and_split_ranges() -> None:
    acked = AckedPositions()
    for position in (5, 7, 6, 10, 3, 9):
        acked.add(position)
    assert acked.ranges() == ((3, 3), (5, 7), (9, 10))
    assert 6 in acked
    assert 8 not in acked
    assert [acked.skip(p) for p in (2, 3, 5, 8, 9, 11)] == [2, 4, 8, 8, 11, 11]
    acked.add_range(4, 8)
    assert acked.ranges() == ((3, 10),)
    acked.add_range(20, 25)
    acked.add_range(12, 13)
    acked.drop_below(13)
    assert acked.ranges() == ((13, 13), (20, 25))
    acked.drop_below(30)
    assert not acked


def test_acked_positions_match_a_plain_set() -> None:
    rng = random.Random(7)
    for _ in range(200):
        acked = AckedPositions()
        model: set[int] = set()
        for _ in range(rng.randint(1, 40)):
            roll = rng.random()
            if roll < 0.6:
                position = rng.randrange(60)
                acked.add(position)
                model.add(position)
            elif roll < 0.8:
                first = rng.randrange(60)
                last = first + rng.randrange(-1, 8)
                acked.add_range(first, last)
                model.update(range(first, last + 1))
            else:
                floor = rng.randrange(60)
                acked.drop_below(floor)
                model = {p for p in model if p >= floor}
            ranges = acked.ranges()
            assert {p for first, last in ranges for p in range(first, last + 1)} == model
            # One spelling: sorted, disjoint, never touching (Cursor checks it).
            Cursor(min(model, default=0) - 1, ranges)
            probe = rng.randrange(70)
            skipped = probe
            while skipped in model:
                skipped += 1
            assert acked.skip(probe) == skipped
