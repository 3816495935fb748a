"""A random workload against a store, a ledger of what it was promised, and the checks.

Theory of operation
-------------------
:func:`run_workload` drives a :class:`~msg.persistence.Store` the way the broker does:
several concurrent tasks publish to queues and a topic, claim, ack, requeue and
dead-letter, release, ack a durable cursor's positions out of order (committing its
floor and the ranges acked above it, as the broker does), and a ticker calls ``maintain`` once per
simulated second (so segments roll, get deleted and compacted). Time is a simulated
:class:`Clock` that each step advances, so "acked 1.3 s before the crash" is exact and
runs take milliseconds.

Everything the store *promised* goes into a :class:`Ledger`, at the simulated time
the promise was returned: every append result (positions), every settle result
without a failure, every cursor commit that succeeded (every position it declared
done must stay done). Everything it was merely
*asked* goes in too (ids sent, settles tried), since an unacknowledged operation may
or may not have taken effect.

After a crash and a restart on the surviving image, :func:`observe` reads the whole
state back and :func:`verify` compares: under ``always`` nothing promised may be lost
and nothing acked may come back; under ``everysec`` only promises younger than a
window may be broken (their ages are returned for the histogram); in every mode
nothing appears that was never sent, nothing twice, and every payload is intact.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from msg.persistence import (
    Append,
    Claim,
    Cursor,
    CursorCommit,
    Delivery,
    Kind,
    Outcome,
    Ranges,
    Settle,
    Store,
)
from msg.storage.index import DEAD_LETTER_PREFIX

QUEUES = ("q0", "q1")
TOPIC = "t"
CURSOR = "d"
TICK = 1.0
"""Seconds between maintain calls: the broker's tick."""


@dataclass
class Clock:
    """Simulated wall-clock time; each workload step advances it."""

    now: float = 1_000_000.0


@dataclass
class Ledger:
    """What a workload asked for and what the store promised, with when."""

    sent: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """Queue or topic -> every message id ever sent to it -> payload."""
    acked: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)
    """Queue or topic -> message id -> (position, when its append was promised)."""
    settles_tried: dict[str, set[Outcome]] = field(default_factory=dict)
    """Message id -> every outcome a settle asked for (promised or not)."""
    settled: dict[str, tuple[Outcome, float]] = field(default_factory=dict)
    """Message id -> the last promised settle, and when."""
    consumed: set[str] = field(default_factory=set)
    """Claimed with auto_ack: gone, but not durably (at most once)."""
    cursor: list[tuple[Cursor, float]] = field(default_factory=list)
    """Promised commits of the durable cursor: (its state, when)."""
    cursor_tried: set[int] = field(default_factory=set)
    """Every position some commit of the cursor declared done, promised or not."""
    crash_time: float | None = None

    def promised(self, name: str) -> dict[str, tuple[int, float]]:
        return self.acked.setdefault(name, {})


@dataclass
class Observed:
    """The state a restarted store reports."""

    queues: dict[str, list[Delivery]]
    topic: list[tuple[int, str, bytes]]
    cursor: Cursor | None


@dataclass(frozen=True)
class Workload:
    """The shape of a run; small counts keep one crash round in tens of milliseconds."""

    publishers: int = 3
    consumers: int = 2
    steps: int = 40
    """Steps per task."""
    mean_step: float = 0.05
    """Mean simulated seconds a step advances the clock."""
    writeback: float | None = None
    """Simulated seconds between the kernel flusher's writebacks (None: never)."""


async def run_workload(
    store: Store,
    rng: random.Random,
    clock: Clock,
    ledger: Ledger,
    *,
    shape: Workload,
    dead: Callable[[], bool],
    writeback: Callable[[], None] | None = None,
) -> None:
    """Run the tasks until their steps are done or ``dead()`` (the machine crashed)."""
    tick = asyncio.Event()
    # Cleared from the moment a tick is due until its maintain has run: simulated time
    # does not pass a tick the broker would not have missed, and the simulated disk
    # syncs in no simulated time. (Store calls that complete at once never yield to
    # the loop, so without this a task could race seconds ahead of the ticker.)
    idle = asyncio.Event()
    idle.set()
    next_tick = clock.now + TICK
    next_writeback = None if shape.writeback is None else clock.now + shape.writeback
    stopped = False

    async def advance() -> None:
        nonlocal next_tick, next_writeback
        await idle.wait()
        clock.now += rng.expovariate(1 / shape.mean_step)
        if clock.now >= next_tick:
            next_tick = clock.now + TICK
            idle.clear()
            tick.set()
        if next_writeback is not None and writeback is not None and clock.now >= next_writeback:
            next_writeback = clock.now + (shape.writeback or 0.0)
            if not dead():
                writeback()
        await asyncio.sleep(0)  # let the other tasks (and the ticker) take turns

    async def ticker() -> None:
        # The broker's tick task: maintain runs serially, once per (simulated) second.
        while not stopped:
            await tick.wait()
            tick.clear()
            try:
                if stopped or dead():
                    return
                await store.maintain(clock.now)
            finally:
                idle.set()

    async def publisher(k: int) -> None:
        for step in range(shape.steps):
            if dead():
                return
            await advance()
            name = rng.choice((*QUEUES, TOPIC))
            kind = Kind.TOPIC if name == TOPIC else Kind.QUEUE
            count = rng.randint(1, 6)
            ids = [f"p{k}-{step}-{i}" for i in range(count)]
            payloads = [_payload(rng, k, step, i) for i in range(count)]
            sent = ledger.sent.setdefault(name, {})
            sent.update(zip(ids, payloads, strict=True))
            [result] = await store.append([Append(kind, name, ids, payloads, clock.now)])
            promised = ledger.promised(name)
            for message_id, position in zip(ids, result.positions, strict=False):
                promised[message_id] = (position, clock.now)

    async def consumer(k: int) -> None:
        me = f"c{k}"
        for _ in range(shape.steps):
            if dead():
                return
            await advance()
            queue = rng.choice(QUEUES)
            auto = rng.random() < 0.1
            [deliveries] = await store.claim(
                [Claim(queue, (me,) * rng.randint(1, 5), auto_ack=auto)]
            )
            if auto:
                ledger.consumed.update(d.message_id for d in deliveries)
                continue
            rng.shuffle(deliveries)
            groups: dict[Outcome, list[str]] = {}
            for delivery in deliveries:
                roll = rng.random()
                if roll < 0.1:
                    continue  # left in flight
                outcome = (
                    Outcome.ACK if roll < 0.75 else Outcome.REQUEUE if roll < 0.9 else Outcome.DEAD
                )
                groups.setdefault(outcome, []).append(delivery.message_id)
            items = [
                Settle(queue, me, ids, outcome, "rejected" if outcome is Outcome.DEAD else None)
                for outcome, ids in groups.items()
            ]
            for item in items:
                for message_id in item.message_ids:
                    ledger.settles_tried.setdefault(message_id, set()).add(item.outcome)
            if items:
                results = await store.settle(items)
                for item, result in zip(items, results, strict=True):
                    if result.failure is None:
                        for message_id in item.message_ids:
                            if message_id not in result.unknown:
                                ledger.settled[message_id] = (item.outcome, clock.now)
            if rng.random() < 0.05:
                await store.release(queue, me)

    async def cursor_mover() -> None:
        # A durable subscriber acking out of order: each step acks a random part of what
        # is not done yet, so gaps stay open for a few steps while later positions are
        # acked, and commits the whole state, as the broker does once per iteration.
        floor = 0
        acked: set[int] = set()
        for _ in range(shape.steps // 2):
            if dead():
                return
            await advance()
            promised = ledger.acked.get(TOPIC, {})
            end = max((p for p, _ in promised.values()), default=-1) + 1
            if end == 0:
                continue
            acked.update(p for p in range(floor, end) if p not in acked and rng.random() < 0.5)
            while floor in acked:
                acked.discard(floor)
                floor += 1
            cursor = Cursor(floor, ranges_of(acked))
            ledger.cursor_tried.update(done_positions(cursor))
            [failure] = await store.commit_cursors(
                [CursorCommit(TOPIC, CURSOR, cursor.position, cursor.acked)]
            )
            if failure is None:
                ledger.cursor.append((cursor, clock.now))

    ticking = asyncio.create_task(ticker())
    try:
        await asyncio.gather(
            *(publisher(k) for k in range(shape.publishers)),
            *(consumer(k) for k in range(shape.consumers)),
            cursor_mover(),
        )
    finally:
        stopped = True
        tick.set()
        await ticking


def ranges_of(positions: set[int]) -> Ranges:
    """``positions`` as sorted (first, last) ranges."""
    ranges: list[tuple[int, int]] = []
    for position in sorted(positions):
        if ranges and ranges[-1][1] == position - 1:
            ranges[-1] = (ranges[-1][0], position)
        else:
            ranges.append((position, position))
    return tuple(ranges)


def done_positions(cursor: Cursor) -> set[int]:
    """Every position ``cursor`` says needs no delivery."""
    done = set(range(cursor.position))
    for first, last in cursor.acked:
        done.update(range(first, last + 1))
    return done


def _payload(rng: random.Random, k: int, step: int, i: int) -> bytes:
    # Mostly small, sometimes large enough to roll a small segment in one record.
    pad = "x" * (rng.randint(0, 120) if rng.random() < 0.9 else rng.randint(500, 3000))
    return b'{"k":%d,"s":%d,"i":%d,"pad":"%s"}' % (k, step, i, pad.encode())


async def observe(store: Store) -> Observed:
    """Everything a restarted store holds: every queue's ready messages (in order),
    the topic's log and the cursor."""
    queues: dict[str, list[Delivery]] = {}
    for name in (*QUEUES, *(DEAD_LETTER_PREFIX + q for q in QUEUES)):
        [deliveries] = await store.claim([Claim(name, ("observer",) * 100_000)])
        queues[name] = deliveries
    read = await store.read(TOPIC, 0, 100_000)
    topic = [(m.position, m.message_id, m.payload) for m in read.messages]
    cursors = (await store.stats()).topics.get(TOPIC)
    cursor = None
    if cursors is not None and CURSOR in cursors.cursors:
        cursor = await store.open_cursor(TOPIC, CURSOR)  # it exists: nothing is written
    return Observed(queues, topic, cursor)


@dataclass
class Verdict:
    """What :func:`verify` found broken, and the ages of promises the crash broke."""

    errors: list[str] = field(default_factory=list)
    lost_ages: list[float] = field(default_factory=list)
    """Seconds between a broken promise and the crash, one per broken promise."""
    promises: int = 0


def verify(ledger: Ledger, seen: Observed, *, window: float | None) -> Verdict:
    """Compare what survived with what was promised.

    ``window``: promises younger than this many seconds at the crash may be broken
    (everysec); 0 for ``always``; None to allow any loss (``never``: measured only).
    Their ages go to :attr:`Verdict.lost_ages` either way.
    """
    verdict = Verdict()
    crash = ledger.crash_time
    assert crash is not None

    def broken(what: str, when: float) -> None:
        age = crash - when
        verdict.lost_ages.append(age)
        if window is not None and age > window:
            verdict.errors.append(f"{what}, promised {age:.3f} s before the crash")

    for queue in QUEUES:
        sent = ledger.sent.get(queue, {})
        present = seen.queues[queue]
        ids = [d.message_id for d in present]
        if len(set(ids)) != len(ids):
            verdict.errors.append(f"{queue}: duplicates {sorted(_dupes(ids))}")
        for delivery in present:
            payload = sent.get(delivery.message_id)
            if payload is None:
                verdict.errors.append(f"{queue}: {delivery.message_id} was never sent")
            elif payload != delivery.payload:
                verdict.errors.append(f"{queue}: {delivery.message_id} payload changed")
            last = ledger.settled.get(delivery.message_id)
            if last is not None and last[0] is not Outcome.REQUEUE:
                broken(f"{queue}: {delivery.message_id} came back after its {last[0]}", last[1])
        promised = ledger.acked.get(queue, {})
        here = set(ids)
        for message_id, (_, when) in promised.items():
            verdict.promises += 1
            if message_id in here or message_id in ledger.consumed:
                continue
            tried = ledger.settles_tried.get(message_id, set())
            if Outcome.ACK in tried or Outcome.DEAD in tried:
                continue  # an ack or dead-letter may have taken effect
            broken(f"{queue}: acked publish {message_id} lost", when)
        # Ready messages come back in the order they were stored.
        seqs = [promised[i][0] for i in ids if i in promised]
        if seqs != sorted(seqs):
            verdict.errors.append(f"{queue}: out of order after recovery")
        dead_queue = DEAD_LETTER_PREFIX + queue
        dead_ids = {d.message_id for d in seen.queues[dead_queue]}
        for delivery in seen.queues[dead_queue]:
            if Outcome.DEAD not in ledger.settles_tried.get(delivery.message_id, set()):
                verdict.errors.append(f"{dead_queue}: {delivery.message_id} was never rejected")
            elif sent.get(delivery.message_id) != delivery.payload:
                verdict.errors.append(f"{dead_queue}: {delivery.message_id} payload changed")
        for message_id, (outcome, when) in ledger.settled.items():
            if outcome is Outcome.DEAD and message_id in sent and message_id not in dead_ids:
                broken(f"{dead_queue}: dead letter {message_id} lost", when)

    sent = ledger.sent.get(TOPIC, {})
    positions = [p for p, _, _ in seen.topic]
    if positions != sorted(set(positions)):
        verdict.errors.append("topic: positions repeat or go backwards")
    by_position = {p: (i, payload) for p, i, payload in seen.topic}
    topic_ids = [i for _, i, _ in seen.topic]
    if len(set(topic_ids)) != len(topic_ids):
        verdict.errors.append(f"topic: duplicates {sorted(_dupes(topic_ids))}")
    for _, message_id, payload in seen.topic:
        if sent.get(message_id) != payload:
            verdict.errors.append(f"topic: {message_id} never sent with that payload")
    for message_id, (position, when) in ledger.acked.get(TOPIC, {}).items():
        verdict.promises += 1
        if by_position.get(position, ("",))[0] != message_id:
            broken(f"topic: acked {message_id} not at position {position}", when)
    # Every position a promised commit declared done (below its floor, or acked above
    # it) must still be done; the oldest commit that is not fully kept dates the loss.
    seen_done = set() if seen.cursor is None else done_positions(seen.cursor)
    verdict.promises += len(ledger.cursor)
    for cursor, when in ledger.cursor:
        missing = done_positions(cursor) - seen_done
        if missing:
            broken(
                f"cursor {seen.cursor} lost positions {sorted(missing)[:5]} of commit {cursor}",
                when,
            )
            break
    # And nothing is done that no commit ever declared done.
    if seen_done - ledger.cursor_tried:
        extra = sorted(seen_done - ledger.cursor_tried)[:5]
        verdict.errors.append(
            f"cursor {seen.cursor} has positions done that no commit had: {extra}"
        )
    return verdict


def _dupes(items: list[str]) -> set[str]:
    seen: set[str] = set()
    return {i for i in items if i in seen or seen.add(i)}  # type: ignore[func-returns-value]
