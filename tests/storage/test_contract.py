"""The storage contract: every backend must pass this suite unchanged.

Behaviour is checked only through the :class:`~msg.persistence.Store` interface, so a
new backend (Redis, later) joins by adding a parameter to the ``make_store`` fixture.
"""

from __future__ import annotations

import asyncio

import pytest

from msg.persistence import (
    Append,
    Claim,
    Cursor,
    CursorCommit,
    Kind,
    Outcome,
    Reclaimed,
    Retention,
    Settle,
    Settled,
    Store,
    StoreFailure,
)
from tests.storage.conftest import StoreFactory

Q = "jobs"
T = "news"


def qapp(
    *message_ids: str, queue: str = Q, payload: bytes = b'{"n":1}', ts: float = 1000.0
) -> Append:
    """One append of ``message_ids`` to a queue, all with the same payload."""
    return Append(Kind.QUEUE, queue, message_ids, [payload] * len(message_ids), ts)


def tapp(
    *message_ids: str, topic: str = T, payload: bytes = b'"hello"', ts: float = 1000.0
) -> Append:
    return Append(Kind.TOPIC, topic, message_ids, [payload] * len(message_ids), ts)


async def fill(store: Store, count: int, queue: str = Q, prefix: str = "m") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(count)]
    [result] = await store.append([qapp(*ids, queue=queue)])
    assert result.failure is None
    assert len(result.positions) == count
    return ids


async def claim_ids(
    store: Store, *consumers: str, queue: str = Q, **options: object
) -> list[tuple[str, str]]:
    claim = Claim(queue, consumers, **options)  # type: ignore[arg-type]
    [deliveries] = await store.claim([claim])
    return [(d.message_id, d.consumer) for d in deliveries]


async def settle(
    store: Store,
    outcome: Outcome,
    consumer: str,
    *message_ids: str,
    queue: str = Q,
    reason: str | None = None,
) -> Settled:
    [settled] = await store.settle([Settle(queue, consumer, message_ids, outcome, reason)])
    return settled


async def ack(store: Store, message_id: str, consumer: str, queue: str = Q) -> bool:
    """Ack one message; True if it was in flight to ``consumer``."""
    settled = await settle(store, Outcome.ACK, consumer, message_id, queue=queue)
    assert settled.failure is None
    return message_id not in settled.unknown


# -- open, capabilities, writable -------------------------------------------------


async def test_opens_empty_and_writable(store: Store) -> None:
    assert store.writable() is None
    assert isinstance(store.capabilities.durable, bool)
    stats = await store.stats()
    assert dict(stats.queues) == {}
    assert dict(stats.topics) == {}
    assert stats.read_only is None


# -- queues: append and ordering ---------------------------------------------------


async def test_queue_positions_increase_and_claims_follow_append_order(store: Store) -> None:
    first = await store.append([qapp("a", "b")])
    second = await store.append([qapp("c")])
    positions = [p for r in first + second for p in r.positions]
    assert positions == sorted(positions)
    assert len(set(positions)) == 3
    assert await claim_ids(store, "x", "x", "x", "x") == [("a", "x"), ("b", "x"), ("c", "x")]


async def test_fresh_positions_are_a_range(store: Store) -> None:
    # All new: positions are consecutive, and a range (no list built per message).
    [queue, topic] = await store.append([qapp("a", "b", "c"), tapp("x", "y", "z")])
    for result in (queue, topic):
        assert result.failure is None
        first = result.positions[0]
        assert result.positions == range(first, first + 3)
    [again] = await store.append([qapp("d", "e")])
    assert again.positions == range(queue.positions[-1] + 1, queue.positions[-1] + 3)


async def test_mismatched_columns_are_refused_and_change_nothing(store: Store) -> None:
    good = qapp("a")
    bad = Append(Kind.QUEUE, Q, ["b", "c"], [b"1"], 1.0)
    with pytest.raises(ValueError, match="payloads"):
        await store.append([good, bad])
    assert await claim_ids(store, "c") == []
    [result] = await store.append([qapp("a")])
    assert result.failure is None
    assert await claim_ids(store, "c") == [("a", "c")]


async def test_empty_append(store: Store) -> None:
    [queue, topic] = await store.append([qapp(), tapp()])
    assert (len(queue.positions), queue.failure) == (0, None)
    assert (len(topic.positions), topic.failure) == (0, None)
    assert await claim_ids(store, "c") == []


async def test_delivery_carries_message(store: Store) -> None:
    await store.append([qapp("a", payload=b'{"k":[1,2]}', ts=1234.5)])
    [[d]] = await store.claim([Claim(Q, ("c1",))])
    assert (d.queue, d.consumer, d.message_id) == (Q, "c1", "a")
    assert d.payload == b'{"k":[1,2]}'
    assert d.published_at == 1234.5
    assert d.attempt == 1
    assert d.reason is None


async def test_payloads_are_parallel_to_ids(store: Store) -> None:
    payloads = [b"[%d]" % i for i in range(5)]
    ids = [f"m{i}" for i in range(5)]
    await store.append(
        [Append(Kind.QUEUE, Q, ids, payloads, 1.0), Append(Kind.TOPIC, T, ids, payloads, 2.0)]
    )
    [ds] = await store.claim([Claim(Q, ("c",) * 5)])
    assert [(d.message_id, d.payload, d.published_at) for d in ds] == [
        (i, p, 1.0) for i, p in zip(ids, payloads, strict=True)
    ]
    read = await store.read(T, 0, 10)
    assert [(m.message_id, m.payload, m.published_at) for m in read.messages] == [
        (i, p, 2.0) for i, p in zip(ids, payloads, strict=True)
    ]


async def test_concurrent_appends_take_effect_in_call_order(store: Store) -> None:
    await asyncio.gather(*(store.append([qapp(f"m{i}", f"n{i}")]) for i in range(20)))
    claimed = await claim_ids(store, *["c"] * 40)
    assert [m for m, _ in claimed] == [x for i in range(20) for x in (f"m{i}", f"n{i}")]


async def test_batch_mixes_queues_and_topics(store: Store) -> None:
    results = await store.append(
        [qapp("a"), tapp("t1"), qapp("b", queue="other"), tapp("t2", "t3")]
    )
    assert [r.failure for r in results] == [None] * 4
    assert list(results[3].positions) == [results[1].positions[0] + 1, results[1].positions[0] + 2]
    assert await claim_ids(store, "c") == [("a", "c")]
    assert await claim_ids(store, "c", queue="other") == [("b", "c")]


async def test_queue_and_topic_of_same_name_are_separate(store: Store) -> None:
    await store.append([qapp("q1", queue="same"), tapp("t1", topic="same")])
    read = await store.read("same", 0, 10)
    assert [m.message_id for m in read.messages] == ["t1"]
    assert await claim_ids(store, "c", queue="same") == [("q1", "c")]


async def test_idempotent_append_by_message_id(store: Store) -> None:
    first = await store.append([qapp("a"), qapp("a"), tapp("t"), tapp("t")])
    again = await store.append([qapp("a"), tapp("t")])
    assert first[0].positions[0] == first[1].positions[0] == again[0].positions[0]
    assert first[2].positions[0] == first[3].positions[0] == again[1].positions[0]
    assert await claim_ids(store, "c", "c") == [("a", "c")]
    read = await store.read(T, 0, 10)
    assert [m.message_id for m in read.messages] == ["t"]
    # A retry of a message that is in flight or already acked still creates nothing.
    [retry] = await store.append([qapp("a")])
    assert list(retry.positions) == [first[0].positions[0]]
    assert await ack(store, "a", "c")
    [retry] = await store.append([qapp("a")])
    assert list(retry.positions) == [first[0].positions[0]]
    assert await claim_ids(store, "c") == []


async def test_duplicate_ids_within_one_append(store: Store) -> None:
    [queue, topic] = await store.append([qapp("a", "b", "a", "c", "b"), tapp("x", "x", "y")])
    q = list(queue.positions)
    assert (q[2], q[4]) == (q[0], q[1])
    assert len({q[0], q[1], q[3]}) == 3
    t = list(topic.positions)
    assert t[0] == t[1] != t[2]
    assert [m for m, _ in await claim_ids(store, *["c"] * 5)] == ["a", "b", "c"]
    assert [m.message_id for m in (await store.read(T, 0, 10)).messages] == ["x", "y"]
    stats = await store.stats()
    assert stats.topics[T].retained == 2


async def test_duplicate_ids_across_appends_mixed_with_new_ones(store: Store) -> None:
    [first] = await store.append([qapp("a", "b")])
    [tfirst] = await store.append([tapp("x", "y")])
    [second] = await store.append([qapp("c", "b", "d", "a")])
    [tsecond] = await store.append([tapp("y", "z")])
    a, b = first.positions
    c, b2, d, a2 = second.positions
    assert (a2, b2) == (a, b)
    assert a < b < c < d
    x, y = tfirst.positions
    y2, z = tsecond.positions
    assert (y2, z) == (y, y + 1) == (x + 1, x + 2)
    claimed = await claim_ids(store, *["c"] * 10)
    assert [m for m, _ in claimed] == ["a", "b", "c", "d"]


async def test_fresh_appends_are_stored_and_remembered_for_a_resend(store: Store) -> None:
    fresh = [
        Append(Kind.QUEUE, Q, ["a", "b"], [b"1", b"2"], 1000.0, fresh=True),
        Append(Kind.TOPIC, T, ["x", "y"], [b"3", b"4"], 1000.0, fresh=True),
    ]
    [queue, topic] = await store.append(fresh)
    assert (queue.failure, topic.failure) == (None, None)
    # The same appends again, as a resend (not fresh): nothing is stored twice.
    [queue2, topic2] = await store.append([qapp("a", "b", "c"), tapp("x", "y", "z")])
    assert list(queue2.positions)[:2] == list(queue.positions)
    assert list(topic2.positions)[:2] == list(topic.positions)
    assert [m for m, _ in await claim_ids(store, *["c"] * 5)] == ["a", "b", "c"]
    read = await store.read(T, 0, 10)
    assert [(m.message_id, m.payload) for m in read.messages] == [
        ("x", b"3"),
        ("y", b"4"),
        ("z", b'"hello"'),
    ]


async def test_fresh_append_to_a_full_queue_stops_where_it_is_full(
    make_store: StoreFactory,
) -> None:
    store = await make_store(max_queue_messages=2)
    [result] = await store.append([Append(Kind.QUEUE, Q, ["a", "b", "c"], [b"1"] * 3, 1.0, True)])
    assert len(result.positions) == 2
    assert result.failure is StoreFailure.QUEUE_FULL


async def test_queue_full(make_store: StoreFactory) -> None:
    store = await make_store(max_queue_messages=2)
    [result] = await store.append([qapp("a", "b", "c")])
    assert len(result.positions) == 2
    assert result.failure is StoreFailure.QUEUE_FULL
    assert result.detail
    # In-flight messages still count; done ones make room.
    await claim_ids(store, "c1")
    [full] = await store.append([qapp("d")])
    assert (len(full.positions), full.failure) == (0, StoreFailure.QUEUE_FULL)
    assert await ack(store, "a", "c1")
    assert (await store.append([qapp("d")]))[0].failure is None
    assert (await store.append([qapp("x", queue="other")]))[0].failure is None


async def test_queue_full_in_the_middle_stores_a_prefix(make_store: StoreFactory) -> None:
    store = await make_store(max_queue_messages=3)
    [first] = await store.append([qapp("a")])
    # b and c fit; d does not, so neither does e, and a after it is not looked at.
    [result, other] = await store.append([qapp("b", "a", "c", "d", "e", "a"), qapp("z", queue="o")])
    assert result.failure is StoreFailure.QUEUE_FULL
    assert len(result.positions) == 3
    b, a, c = result.positions
    assert a == first.positions[0]
    assert a < b < c
    assert other.failure is None  # other items of the same call are unaffected
    assert [m for m, _ in await claim_ids(store, *["c"] * 5)] == ["a", "b", "c"]
    # A duplicate of a stored message is still reported while the queue is full.
    [again] = await store.append([qapp("c", "b", "d")])
    assert list(again.positions) == [c, b]
    assert again.failure is StoreFailure.QUEUE_FULL


# -- claims ------------------------------------------------------------------------


async def test_claim_of_empty_or_unknown_queue(store: Store) -> None:
    assert await store.claim([Claim("nothing", ("c",)), Claim(Q, ("c",))]) == [[], []]
    await fill(store, 1)
    assert await store.claim([Claim(Q, ())]) == [[]]


async def test_claim_fills_slots_in_order(store: Store) -> None:
    await fill(store, 5)
    assert await claim_ids(store, "a", "b", "c") == [("m0", "a"), ("m1", "b"), ("m2", "c")]
    assert await claim_ids(store, "a", "a", "b") == [("m3", "a"), ("m4", "a")]
    assert await claim_ids(store, "a") == []


async def test_claims_span_appends(store: Store) -> None:
    for batch in range(4):
        await fill(store, 3, prefix=f"b{batch}-")
    claimed = await claim_ids(store, *["c"] * 5)
    assert [m for m, _ in claimed] == ["b0-0", "b0-1", "b0-2", "b1-0", "b1-1"]
    claimed = await claim_ids(store, *["c"] * 10)
    assert [m for m, _ in claimed] == ["b1-2", "b2-0", "b2-1", "b2-2", "b3-0", "b3-1", "b3-2"]


async def test_one_call_many_claims(store: Store) -> None:
    await fill(store, 3)
    result = await store.claim([Claim(Q, ("a",)), Claim(Q, ("b", "b")), Claim(Q, ("c",))])
    assert [[d.message_id for d in ds] for ds in result] == [["m0"], ["m1", "m2"], []]


async def test_redelivery_goes_to_another_consumer_where_possible(store: Store) -> None:
    await fill(store, 3)
    assert await claim_ids(store, "a") == [("m0", "a")]
    assert await store.release(Q, "a") == 1
    # m0 was a's; it goes to b, and a gets the next message in its slot.
    assert await claim_ids(store, "a", "b") == [("m0", "b"), ("m1", "a")]
    settled = await settle(store, Outcome.REQUEUE, "b", "m0")
    assert settled == Settled()
    assert await claim_ids(store, "b", "b", "c") == [("m0", "c"), ("m2", "b")]


async def test_redelivery_to_same_consumer_when_no_other(store: Store) -> None:
    await fill(store, 1)
    await claim_ids(store, "a")
    await store.release(Q, "a")
    [[d]] = await store.claim([Claim(Q, ("a", "a"))])
    assert (d.message_id, d.consumer, d.attempt) == ("m0", "a", 2)


async def test_attempt_counts_deliveries(store: Store) -> None:
    await fill(store, 1)
    for attempt in (1, 2, 3):
        [[d]] = await store.claim([Claim(Q, ("c",))])
        assert d.attempt == attempt
        assert await settle(store, Outcome.REQUEUE, "c", "m0") == Settled()


async def test_auto_ack_claims_are_gone(store: Store) -> None:
    await fill(store, 3)
    assert await claim_ids(store, "a", "b", auto_ack=True) == [("m0", "a"), ("m1", "b")]
    stats = (await store.stats()).queues[Q]
    assert (stats.ready, stats.in_flight) == (1, 0)
    assert (await settle(store, Outcome.ACK, "a", "m0")).unknown == {"m0"}
    assert await store.release(Q, "a") == 0
    assert await claim_ids(store, "a", "b") == [("m2", "a")]


# -- settle ------------------------------------------------------------------------


async def test_ack_removes_message(store: Store) -> None:
    await fill(store, 2)
    await claim_ids(store, "c", "c")
    assert await ack(store, "m0", "c")
    assert not await ack(store, "m0", "c")
    stats = (await store.stats()).queues[Q]
    assert (stats.ready, stats.in_flight) == (0, 1)
    assert await store.release(Q, "c") == 1
    assert await claim_ids(store, "c", "c") == [("m1", "c")]


async def test_settle_unknown_is_listed_and_changes_nothing(store: Store) -> None:
    await fill(store, 2)
    await claim_ids(store, "a")
    results = await store.settle(
        [
            Settle(Q, "b", ["m0"], Outcome.ACK),  # held by someone else
            Settle(Q, "a", ["m1"], Outcome.ACK),  # ready, not in flight
            Settle(Q, "a", ["zz"], Outcome.DEAD),  # unknown message
            Settle("unknown", "a", ["m0"], Outcome.REQUEUE),  # unknown queue
        ]
    )
    assert [r.unknown for r in results] == [{"m0"}, {"m1"}, {"zz"}, {"m0"}]
    assert all(r.failure is None for r in results)
    stats = await store.stats()
    assert (stats.queues[Q].ready, stats.queues[Q].in_flight) == (1, 1)
    assert "$dead." + Q not in stats.queues or stats.queues["$dead." + Q].ready == 0


@pytest.mark.parametrize("outcome", list(Outcome))
async def test_settle_group_with_some_unknown_ids(store: Store, outcome: Outcome) -> None:
    await fill(store, 5)
    await claim_ids(store, "a", "a", "b", "a")  # a: m0 m1 m3; b: m2; m4 ready
    [settled] = await store.settle(
        [Settle(Q, "a", ["m0", "m2", "zz", "m3", "m4"], outcome, reason="r")]
    )
    assert settled.unknown == {"m2", "zz", "m4"}
    assert settled.failure is None
    stats = await store.stats()
    # m1 (a) and m2 (b) stay in flight; m0 and m3 were settled, m4 is still ready.
    assert stats.queues[Q].in_flight == 2
    ready = await claim_ids(store, *["c"] * 5)
    expected = ["m0", "m3", "m4"] if outcome is Outcome.REQUEUE else ["m4"]
    assert [m for m, _ in ready] == expected
    dead = await claim_ids(store, *["c"] * 5, queue="$dead." + Q)
    assert [m for m, _ in dead] == (["m0", "m3"] if outcome is Outcome.DEAD else [])


async def test_settle_group_outcomes(store: Store) -> None:
    await fill(store, 6)
    await claim_ids(store, *["a"] * 6)
    results = await store.settle(
        [
            Settle(Q, "a", ["m0", "m1"], Outcome.ACK),
            Settle(Q, "a", ["m2", "m3"], Outcome.REQUEUE),
            Settle(Q, "a", ["m4", "m5"], Outcome.DEAD, reason="nope"),
        ]
    )
    assert results == [Settled(), Settled(), Settled()]
    stats = await store.stats()
    assert (stats.queues[Q].ready, stats.queues[Q].in_flight) == (2, 0)
    assert await claim_ids(store, "b", "b", "b") == [("m2", "b"), ("m3", "b")]
    [ds] = await store.claim([Claim("$dead." + Q, ("ops",) * 5)])
    assert [(d.message_id, d.reason) for d in ds] == [("m4", "nope"), ("m5", "nope")]


async def test_settle_same_id_twice_in_a_group(store: Store) -> None:
    await fill(store, 2)
    await claim_ids(store, "a", "a")
    assert await settle(store, Outcome.ACK, "a", "m0", "m0", "m1") == Settled()
    assert (await store.stats()).queues[Q].in_flight == 0


async def test_empty_settle_group(store: Store) -> None:
    assert await settle(store, Outcome.ACK, "a") == Settled()


async def test_requeue_returns_message_in_sequence_order(store: Store) -> None:
    await fill(store, 3)
    await claim_ids(store, "a", "b")
    results = await store.settle(
        [Settle(Q, "b", ["m1"], Outcome.REQUEUE), Settle(Q, "a", ["m0"], Outcome.REQUEUE)]
    )
    assert results == [Settled(), Settled()]
    claimed = await claim_ids(store, "c", "c", "c")
    assert [m for m, _ in claimed] == ["m0", "m1", "m2"]


async def test_dead_letter_moves_message_to_dead_queue(store: Store) -> None:
    await store.append([qapp("m0", payload=b'{"bad":true}', ts=55.0), qapp("m1")])
    await claim_ids(store, "c", "c")
    settled = await settle(store, Outcome.DEAD, "c", "m0", reason="cannot parse")
    assert settled == Settled()
    stats = await store.stats()
    assert stats.queues[Q].in_flight == 1
    assert stats.queues["$dead." + Q].ready == 1
    [[d]] = await store.claim([Claim("$dead." + Q, ("ops",))])
    assert (d.message_id, d.payload, d.published_at) == ("m0", b'{"bad":true}', 55.0)
    assert d.attempt == 1
    assert d.reason == "cannot parse"
    assert not await ack(store, "m0", "c")
    assert await ack(store, "m0", "ops", queue="$dead." + Q)


async def test_failed_dead_letter_group_changes_nothing(make_store: StoreFactory) -> None:
    store = await make_store(max_queue_messages=3)
    await fill(store, 3)
    await claim_ids(store, "a", "a", "a")
    # The dead-letter queue has room for 3: two fit, the group of two more does not.
    assert await settle(store, Outcome.DEAD, "a", "m0", "m1", reason="x") == Settled()
    await fill(store, 2, prefix="n")
    await claim_ids(store, "a", "a")
    failed = await settle(store, Outcome.DEAD, "a", "m2", "n0", "zz", reason="y")
    assert failed.failure is StoreFailure.QUEUE_FULL
    assert failed.unknown == {"zz"}
    stats = await store.stats()
    assert (stats.queues[Q].ready, stats.queues[Q].in_flight) == (0, 3)
    assert (stats.queues["$dead." + Q].ready, stats.queues["$dead." + Q].in_flight) == (2, 0)
    # Still held by a, so they can be settled otherwise; the failed group left no trace.
    assert await settle(store, Outcome.ACK, "a", "m2", "n0") == Settled()
    [ds] = await store.claim([Claim("$dead." + Q, ("ops",) * 5)])
    assert [(d.message_id, d.reason) for d in ds] == [("m0", "x"), ("m1", "x")]


# -- release and reclaim -----------------------------------------------------------


async def test_release_makes_held_messages_ready(store: Store) -> None:
    await fill(store, 4)
    await claim_ids(store, "a", "b", "a")
    assert await store.release(Q, "a") == 2
    assert await store.release(Q, "a") == 0
    assert await store.release("unknown", "a") == 0
    stats = (await store.stats()).queues[Q]
    assert (stats.ready, stats.in_flight) == (3, 1)
    assert not await ack(store, "m0", "a")
    claimed = await claim_ids(store, "c", "c", "c")
    assert [m for m, _ in claimed] == ["m0", "m2", "m3"]


async def test_reclaim_by_deadline(store: Store) -> None:
    await fill(store, 3)
    await claim_ids(store, "a", "b", deadline=100.0)
    await claim_ids(store, "c")  # no deadline: never reclaimed
    assert await store.reclaim(99.0) == []
    assert await ack(store, "m1", "b")
    reclaimed = await store.reclaim(101.0)
    assert reclaimed == [Reclaimed(Q, "a", "m0")]
    assert await store.reclaim(1000.0) == []
    [[d]] = await store.claim([Claim(Q, ("d",), deadline=200.0)])
    assert (d.message_id, d.attempt) == ("m0", 2)
    assert not await ack(store, "m0", "a")
    # Released before its deadline: not reclaimed a second time.
    assert await store.release(Q, "d") == 1
    assert await store.reclaim(300.0) == []


async def test_settle_racing_release_wins(store: Store) -> None:
    await fill(store, 2)
    await claim_ids(store, "a", "a")
    settled, released = await asyncio.gather(
        store.settle([Settle(Q, "a", ["m0"], Outcome.ACK)]), store.release(Q, "a")
    )
    assert settled == [Settled()]
    assert released == 1  # m1 only: m0 was being settled
    assert await claim_ids(store, "b", "b") == [("m1", "b")]


async def test_requeue_racing_release(store: Store) -> None:
    await fill(store, 1)
    await claim_ids(store, "a")
    settled, released = await asyncio.gather(
        store.settle([Settle(Q, "a", ["m0"], Outcome.REQUEUE)]), store.release(Q, "a")
    )
    assert settled == [Settled()]
    assert released == 0
    assert await claim_ids(store, "b") == [("m0", "b")]


async def test_settle_racing_reclaim(store: Store) -> None:
    await fill(store, 1)
    await claim_ids(store, "a", deadline=10.0)
    settled, reclaimed = await asyncio.gather(
        store.settle([Settle(Q, "a", ["m0"], Outcome.ACK)]), store.reclaim(20.0)
    )
    assert settled == [Settled()]
    assert reclaimed == []
    assert await claim_ids(store, "b") == []


# -- topics ------------------------------------------------------------------------


async def test_topic_positions_are_consecutive_and_readable(store: Store) -> None:
    ids = [f"t{i}" for i in range(10)]
    [result] = await store.append(
        [Append(Kind.TOPIC, T, ids, [b"%d" % i for i in range(10)], 1000.0)]
    )
    positions = list(result.positions)
    assert positions == list(range(positions[0], positions[0] + 10))
    read = await store.read(T, 0, 100)
    assert read.first == positions[0]
    assert read.end == positions[-1] + 1
    assert [m.position for m in read.messages] == positions
    assert [m.payload for m in read.messages] == [b"%d" % i for i in range(10)]
    assert read.messages[0].published_at == 1000.0
    part = await store.read(T, positions[3], 4)
    assert [m.message_id for m in part.messages] == ["t3", "t4", "t5", "t6"]
    assert (await store.read(T, read.end, 10)).messages == ()
    assert (await store.read(T, positions[0], 0)).messages == ()
    [other] = await store.append([tapp("o", topic="other")])
    assert (await store.read("other", 0, 10)).messages[0].position == other.positions[0]


async def test_read_of_unknown_topic_is_empty(store: Store) -> None:
    read = await store.read("nothing", 0, 10)
    assert read.messages == ()
    assert read.first == read.end


async def test_topic_reads_across_many_appends(store: Store) -> None:
    for batch in range(20):
        await store.append(
            [tapp(*[f"t{batch}-{i}" for i in range(10)], payload=b'"%s"' % (b"x" * 50))]
        )
    read = await store.read(T, 0, 1000)
    assert len(read.messages) == 200
    assert [m.message_id for m in read.messages][95:97] == ["t9-5", "t9-6"]
    positions = [m.position for m in read.messages]
    assert positions == list(range(read.first, read.end))
    middle = await store.read(T, positions[137], 3)
    assert [m.message_id for m in middle.messages] == ["t13-7", "t13-8", "t13-9"]


async def test_retention_by_count_drops_oldest(make_store: StoreFactory) -> None:
    store = await make_store(retention=Retention(max_messages=10, max_bytes=None, max_age=None))
    for i in range(100):
        await store.append([tapp(f"t{i}", payload=b'"%s"' % (b"y" * 40))])
    await store.maintain(2000.0)
    stats = (await store.stats()).topics[T]
    # Backends may trim in coarser units (whole segments), but keep at least the limit.
    assert 10 <= stats.retained < 100
    read = await store.read(T, 0, 1000)
    assert read.first == stats.first > 0
    assert read.messages[0].position == read.first
    assert read.messages[-1].message_id == "t99"
    assert read.end == stats.end == read.messages[-1].position + 1
    assert len(read.messages) == stats.retained


async def test_retention_by_age(make_store: StoreFactory) -> None:
    store = await make_store(retention=Retention(max_messages=None, max_bytes=None, max_age=60.0))
    for i in range(50):
        await store.append([tapp(f"old{i}", payload=b'"%s"' % (b"z" * 40), ts=1000.0)])
    await store.maintain(1050.0)
    assert (await store.stats()).topics[T].retained == 50
    await store.maintain(5000.0)
    stats = (await store.stats()).topics[T]
    assert stats.retained == 0
    assert stats.first == stats.end
    assert stats.bytes == 0
    [appended] = await store.append([tapp("new", ts=5000.0)])
    assert list(appended.positions) == [stats.end]
    read = await store.read(T, 0, 100)
    assert [m.message_id for m in read.messages] == ["new"]
    assert read.first == stats.end


async def test_retention_by_bytes(make_store: StoreFactory) -> None:
    store = await make_store(retention=Retention(max_messages=None, max_bytes=1000, max_age=None))
    for i in range(100):
        await store.append([tapp(f"t{i}", payload=b'"%s"' % (b"b" * 48))])
    await store.maintain(2000.0)
    stats = (await store.stats()).topics[T]
    assert 1000 <= stats.bytes < 5000
    assert 20 <= stats.retained < 100


# -- cursors -----------------------------------------------------------------------


async def test_cursor_open_commit_delete(store: Store) -> None:
    await store.append([tapp("t0", "t1")])
    end = (await store.read(T, 0, 0)).end
    assert (await store.open_cursor(T, "audit")).position == end
    await store.append([tapp("t2")])
    assert (await store.open_cursor(T, "audit")).position == end  # found, not moved
    assert await store.commit_cursors([CursorCommit(T, "audit", end + 1)]) == [None]
    assert (await store.open_cursor(T, "audit")).position == end + 1
    stats = (await store.stats()).topics[T]
    assert dict(stats.cursors) == {"audit": end + 1}
    assert await store.delete_cursor(T, "audit")
    assert not await store.delete_cursor(T, "audit")
    assert not await store.delete_cursor("nothing", "audit")
    assert (await store.open_cursor(T, "audit")).position == end + 1  # new cursor at the end


async def test_cursor_on_new_topic_and_many_commits(store: Store) -> None:
    assert (await store.open_cursor("fresh", "c")).position == (await store.read("fresh", 0, 0)).end
    commits = [CursorCommit("fresh", f"c{i % 3}", i) for i in range(30)]
    assert await store.commit_cursors(commits) == [None] * 30
    stats = (await store.stats()).topics["fresh"]
    assert dict(stats.cursors) == {"c": 0, "c0": 27, "c1": 28, "c2": 29}


async def test_a_cursor_keeps_the_positions_acked_above_its_floor(store: Store) -> None:
    await store.append([tapp(*(f"t{i}" for i in range(10)))])
    await store.open_cursor(T, "audit")
    # Everything from 2 on acked but 4, 5 and 8; 0 and 1 held.
    commit = CursorCommit(T, "audit", 0, ((2, 3), (6, 7), (9, 9)))
    assert await store.commit_cursors([commit]) == [None]
    assert await store.open_cursor(T, "audit") == Cursor(0, ((2, 3), (6, 7), (9, 9)))
    stats = (await store.stats()).topics[T]
    assert dict(stats.cursors) == {"audit": 0}
    assert dict(stats.cursors_acked) == {"audit": 5}
    # A commit replaces the whole state: ranges below the new floor are gone.
    assert await store.commit_cursors([CursorCommit(T, "audit", 5, ((6, 7),))]) == [None]
    assert await store.open_cursor(T, "audit") == Cursor(5, ((6, 7),))
    assert await store.commit_cursors([CursorCommit(T, "audit", 10)]) == [None]
    assert await store.open_cursor(T, "audit") == Cursor(10)
    assert dict((await store.stats()).topics[T].cursors_acked) == {}


@pytest.mark.parametrize(
    ("position", "acked"),
    [
        (5, ((5, 6),)),  # the floor itself is not done
        (5, ((3, 4),)),  # below the floor
        (0, ((4, 3),)),  # backwards
        (0, ((4, 5), (6, 7))),  # touching: one range
        (0, ((6, 7), (2, 3))),  # out of order
        (0, ((2, 5), (4, 7))),  # overlapping
    ],
)
def test_acked_ranges_have_one_spelling(position: int, acked: tuple[tuple[int, int], ...]) -> None:
    with pytest.raises(ValueError, match="range"):
        CursorCommit(T, "audit", position, acked)
    with pytest.raises(ValueError, match="range"):
        Cursor(position, acked)


# -- stats and maintain ------------------------------------------------------------


async def test_queue_stats(store: Store) -> None:
    await store.append([Append(Kind.QUEUE, Q, ["a", "b", "c"], [b"[1]", b"[22]", b"3"], 1.0)])
    await claim_ids(store, "x")
    stats = (await store.stats()).queues[Q]
    assert (stats.ready, stats.in_flight, stats.bytes) == (2, 1, 8)
    await ack(store, "a", "x")
    stats = (await store.stats()).queues[Q]
    assert (stats.ready, stats.in_flight, stats.bytes) == (2, 0, 5)


async def test_topic_stats(store: Store) -> None:
    await store.append([Append(Kind.TOPIC, T, ["a", "b"], [b"[1]", b"[22]"], 1.0)])
    stats = (await store.stats()).topics[T]
    assert stats.end - stats.first == stats.retained == 2
    assert stats.bytes == 7


async def test_maintain_keeps_live_data(store: Store) -> None:
    ids = await fill(store, 50)
    for _ in range(3):
        await store.maintain(1000.0)
    claimed = await claim_ids(store, *["c"] * 60)
    assert [m for m, _ in claimed] == ids


@pytest.mark.parametrize("count", [1, 300])
async def test_long_publish_ack_loop(store: Store, count: int) -> None:
    for round_ in range(5):
        ids = await fill(store, count, prefix=f"r{round_}-")
        deliveries = await claim_ids(store, *["c"] * count)
        assert [m for m, _ in deliveries] == ids
        assert await settle(store, Outcome.ACK, "c", *ids) == Settled()
        await store.maintain(1000.0 + round_)
    stats = (await store.stats()).queues[Q]
    assert (stats.ready, stats.in_flight, stats.bytes) == (0, 0, 0)
