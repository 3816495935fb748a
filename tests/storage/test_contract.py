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
    CursorCommit,
    Kind,
    Outcome,
    Reclaimed,
    Retention,
    Settle,
    Store,
    StoredMessage,
    StoreFailure,
)
from tests.storage.conftest import StoreFactory

Q = "jobs"
T = "news"


def qmsg(
    message_id: str, queue: str = Q, payload: bytes = b'{"n":1}', ts: float = 1000.0
) -> Append:
    return Append(Kind.QUEUE, queue, StoredMessage(message_id, payload, ts))


def tmsg(
    message_id: str, topic: str = T, payload: bytes = b'"hello"', ts: float = 1000.0
) -> Append:
    return Append(Kind.TOPIC, topic, StoredMessage(message_id, payload, ts))


async def fill(store: Store, count: int, queue: str = Q, prefix: str = "m") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(count)]
    results = await store.append([qmsg(i, queue) for i in ids])
    assert all(r.failure is None for r in results)
    return ids


async def claim_ids(
    store: Store, *consumers: str, queue: str = Q, **options: object
) -> list[tuple[str, str]]:
    claim = Claim(queue, consumers, **options)  # type: ignore[arg-type]
    [deliveries] = await store.claim([claim])
    return [(d.message_id, d.consumer) for d in deliveries]


async def ack(store: Store, message_id: str, consumer: str, queue: str = Q) -> bool:
    [settled] = await store.settle([Settle(queue, message_id, consumer, Outcome.ACK)])
    assert settled.failure is None
    return settled.found


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
    first = await store.append([qmsg("a"), qmsg("b")])
    second = await store.append([qmsg("c")])
    positions = [r.position for r in first + second]
    assert positions == sorted(positions)
    assert len(set(positions)) == 3
    assert await claim_ids(store, "x", "x", "x", "x") == [("a", "x"), ("b", "x"), ("c", "x")]


async def test_delivery_carries_message(store: Store) -> None:
    await store.append([qmsg("a", payload=b'{"k":[1,2]}', ts=1234.5)])
    [[d]] = await store.claim([Claim(Q, ("c1",))])
    assert (d.queue, d.consumer, d.message_id) == (Q, "c1", "a")
    assert d.payload == b'{"k":[1,2]}'
    assert d.published_at == 1234.5
    assert d.attempt == 1


async def test_concurrent_appends_take_effect_in_call_order(store: Store) -> None:
    await asyncio.gather(*(store.append([qmsg(f"m{i}")]) for i in range(20)))
    claimed = await claim_ids(store, *["c"] * 20)
    assert [m for m, _ in claimed] == [f"m{i}" for i in range(20)]


async def test_batch_mixes_queues_and_topics(store: Store) -> None:
    results = await store.append([qmsg("a"), tmsg("t1"), qmsg("b", queue="other"), tmsg("t2")])
    assert [r.failure for r in results] == [None] * 4
    assert results[3].position == results[1].position + 1
    assert await claim_ids(store, "c") == [("a", "c")]
    assert await claim_ids(store, "c", queue="other") == [("b", "c")]


async def test_queue_and_topic_of_same_name_are_separate(store: Store) -> None:
    await store.append([qmsg("q1", queue="same"), tmsg("t1", topic="same")])
    read = await store.read("same", 0, 10)
    assert [m.message_id for m in read.messages] == ["t1"]
    assert await claim_ids(store, "c", queue="same") == [("q1", "c")]


async def test_idempotent_append_by_message_id(store: Store) -> None:
    first = await store.append([qmsg("a"), qmsg("a"), tmsg("t"), tmsg("t")])
    again = await store.append([qmsg("a"), tmsg("t")])
    assert first[0].position == first[1].position == again[0].position
    assert first[2].position == first[3].position == again[1].position
    assert await claim_ids(store, "c", "c") == [("a", "c")]
    read = await store.read(T, 0, 10)
    assert [m.message_id for m in read.messages] == ["t"]
    # A retry of a message that is in flight or already acked still creates nothing.
    assert (await store.append([qmsg("a")]))[0].position == first[0].position
    assert await ack(store, "a", "c")
    assert (await store.append([qmsg("a")]))[0].position == first[0].position
    assert await claim_ids(store, "c") == []


async def test_queue_full(make_store: StoreFactory) -> None:
    store = await make_store(max_queue_messages=2)
    results = await store.append([qmsg("a"), qmsg("b"), qmsg("c")])
    assert [r.failure for r in results] == [None, None, StoreFailure.QUEUE_FULL]
    assert results[2].detail
    # In-flight messages still count; done ones make room.
    await claim_ids(store, "c1")
    assert (await store.append([qmsg("d")]))[0].failure is StoreFailure.QUEUE_FULL
    assert await ack(store, "a", "c1")
    assert (await store.append([qmsg("d")]))[0].failure is None
    assert (await store.append([qmsg("x", queue="other")]))[0].failure is None


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
    [settled] = await store.settle([Settle(Q, "m0", "b", Outcome.REQUEUE)])
    assert settled.found
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
        [settled] = await store.settle([Settle(Q, "m0", "c", Outcome.REQUEUE)])
        assert settled.found
        assert settled.failure is None


async def test_auto_ack_claims_are_gone(store: Store) -> None:
    await fill(store, 3)
    assert await claim_ids(store, "a", "b", auto_ack=True) == [("m0", "a"), ("m1", "b")]
    stats = (await store.stats()).queues[Q]
    assert (stats.ready, stats.in_flight) == (1, 0)
    assert not (await store.settle([Settle(Q, "m0", "a", Outcome.ACK)]))[0].found
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


async def test_settle_unknown_is_not_found_and_changes_nothing(store: Store) -> None:
    await fill(store, 2)
    await claim_ids(store, "a")
    results = await store.settle(
        [
            Settle(Q, "m0", "b", Outcome.ACK),  # held by someone else
            Settle(Q, "m1", "a", Outcome.ACK),  # ready, not in flight
            Settle(Q, "zz", "a", Outcome.DEAD),  # unknown message
            Settle("unknown", "m0", "a", Outcome.REQUEUE),  # unknown queue
        ]
    )
    assert [r.found for r in results] == [False] * 4
    assert all(r.failure is None for r in results)
    stats = (await store.stats()).queues[Q]
    assert (stats.ready, stats.in_flight) == (1, 1)


async def test_requeue_returns_message_in_sequence_order(store: Store) -> None:
    await fill(store, 3)
    await claim_ids(store, "a", "b")
    results = await store.settle(
        [Settle(Q, "m1", "b", Outcome.REQUEUE), Settle(Q, "m0", "a", Outcome.REQUEUE)]
    )
    assert [r.found for r in results] == [True, True]
    claimed = await claim_ids(store, "c", "c", "c")
    assert [m for m, _ in claimed] == ["m0", "m1", "m2"]


async def test_dead_letter_moves_message_to_dead_queue(store: Store) -> None:
    await store.append([qmsg("m0", payload=b'{"bad":true}', ts=55.0), qmsg("m1")])
    await claim_ids(store, "c", "c")
    [settled] = await store.settle([Settle(Q, "m0", "c", Outcome.DEAD, reason="cannot parse")])
    assert settled.found
    assert settled.failure is None
    stats = await store.stats()
    assert stats.queues[Q].in_flight == 1
    assert stats.queues["$dead." + Q].ready == 1
    [[d]] = await store.claim([Claim("$dead." + Q, ("ops",))])
    assert (d.message_id, d.payload, d.published_at) == ("m0", b'{"bad":true}', 55.0)
    assert d.attempt == 1
    assert d.reason == "cannot parse"
    assert not await ack(store, "m0", "c")
    assert await ack(store, "m0", "ops", queue="$dead." + Q)


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
        store.settle([Settle(Q, "m0", "a", Outcome.ACK)]), store.release(Q, "a")
    )
    assert settled[0].found
    assert settled[0].failure is None
    assert released == 1  # m1 only: m0 was being settled
    assert await claim_ids(store, "b", "b") == [("m1", "b")]


async def test_requeue_racing_release(store: Store) -> None:
    await fill(store, 1)
    await claim_ids(store, "a")
    settled, released = await asyncio.gather(
        store.settle([Settle(Q, "m0", "a", Outcome.REQUEUE)]), store.release(Q, "a")
    )
    assert settled[0].found
    assert released == 0
    assert await claim_ids(store, "b") == [("m0", "b")]


async def test_settle_racing_reclaim(store: Store) -> None:
    await fill(store, 1)
    await claim_ids(store, "a", deadline=10.0)
    settled, reclaimed = await asyncio.gather(
        store.settle([Settle(Q, "m0", "a", Outcome.ACK)]), store.reclaim(20.0)
    )
    assert settled[0].found
    assert reclaimed == []
    assert await claim_ids(store, "b") == []


# -- topics ------------------------------------------------------------------------


async def test_topic_positions_are_consecutive_and_readable(store: Store) -> None:
    results = await store.append([tmsg(f"t{i}", payload=b"%d" % i) for i in range(10)])
    positions = [r.position for r in results]
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
    other = await store.append([tmsg("o", topic="other")])
    assert (await store.read("other", 0, 10)).messages[0].position == other[0].position


async def test_read_of_unknown_topic_is_empty(store: Store) -> None:
    read = await store.read("nothing", 0, 10)
    assert read.messages == ()
    assert read.first == read.end


async def test_topic_reads_across_many_appends(store: Store) -> None:
    for batch in range(20):
        await store.append(
            [tmsg(f"t{batch}-{i}", payload=b'"%s"' % (b"x" * 50)) for i in range(10)]
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
        await store.append([tmsg(f"t{i}", payload=b'"%s"' % (b"y" * 40))])
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
        await store.append([tmsg(f"old{i}", payload=b'"%s"' % (b"z" * 40), ts=1000.0)])
    await store.maintain(1050.0)
    assert (await store.stats()).topics[T].retained == 50
    await store.maintain(5000.0)
    stats = (await store.stats()).topics[T]
    assert stats.retained == 0
    assert stats.first == stats.end
    assert stats.bytes == 0
    [appended] = await store.append([tmsg("new", ts=5000.0)])
    assert appended.position == stats.end
    read = await store.read(T, 0, 100)
    assert [m.message_id for m in read.messages] == ["new"]
    assert read.first == stats.end


async def test_retention_by_bytes(make_store: StoreFactory) -> None:
    store = await make_store(retention=Retention(max_messages=None, max_bytes=1000, max_age=None))
    for i in range(100):
        await store.append([tmsg(f"t{i}", payload=b'"%s"' % (b"b" * 48))])
    await store.maintain(2000.0)
    stats = (await store.stats()).topics[T]
    assert 1000 <= stats.bytes < 5000
    assert 20 <= stats.retained < 100


# -- cursors -----------------------------------------------------------------------


async def test_cursor_open_commit_delete(store: Store) -> None:
    await store.append([tmsg("t0"), tmsg("t1")])
    end = (await store.read(T, 0, 0)).end
    assert await store.open_cursor(T, "audit") == end
    await store.append([tmsg("t2")])
    assert await store.open_cursor(T, "audit") == end  # found, not moved
    assert await store.commit_cursors([CursorCommit(T, "audit", end + 1)]) == [None]
    assert await store.open_cursor(T, "audit") == end + 1
    stats = (await store.stats()).topics[T]
    assert dict(stats.cursors) == {"audit": end + 1}
    assert await store.delete_cursor(T, "audit")
    assert not await store.delete_cursor(T, "audit")
    assert not await store.delete_cursor("nothing", "audit")
    assert await store.open_cursor(T, "audit") == end + 1  # new cursor at the end


async def test_cursor_on_new_topic_and_many_commits(store: Store) -> None:
    assert await store.open_cursor("fresh", "c") == (await store.read("fresh", 0, 0)).end
    commits = [CursorCommit("fresh", f"c{i % 3}", i) for i in range(30)]
    assert await store.commit_cursors(commits) == [None] * 30
    stats = (await store.stats()).topics["fresh"]
    assert dict(stats.cursors) == {"c": 0, "c0": 27, "c1": 28, "c2": 29}


# -- stats and maintain ------------------------------------------------------------


async def test_queue_stats(store: Store) -> None:
    await store.append(
        [qmsg("a", payload=b"[1]"), qmsg("b", payload=b"[22]"), qmsg("c", payload=b"3")]
    )
    await claim_ids(store, "x")
    stats = (await store.stats()).queues[Q]
    assert (stats.ready, stats.in_flight, stats.bytes) == (2, 1, 8)
    await ack(store, "a", "x")
    stats = (await store.stats()).queues[Q]
    assert (stats.ready, stats.in_flight, stats.bytes) == (2, 0, 5)


async def test_topic_stats(store: Store) -> None:
    await store.append([tmsg("a", payload=b"[1]"), tmsg("b", payload=b"[22]")])
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
        results = await store.settle([Settle(Q, m, "c", Outcome.ACK) for m in ids])
        assert all(r.found for r in results)
        await store.maintain(1000.0 + round_)
    stats = (await store.stats()).queues[Q]
    assert (stats.ready, stats.in_flight, stats.bytes) == (0, 0, 0)
