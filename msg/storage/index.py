"""Delivery state of queues and topics, kept in memory, shared by the single-node stores.

Theory of operation
-------------------
Both :class:`~msg.storage.memory.MemoryStore` and :class:`~msg.storage.filestore.FileStore`
answer every delivery question from this index; the file store adds a log that makes
each change durable and replays it into the index at start-up. The index does no IO
and never awaits, so each operation is atomic with respect to every other.

A queue keeps one :class:`Entry` per message not yet done, keyed by message id, in
sequence order (dict insertion order). Ready messages wait in two places: ``fresh``
(never delivered, appended in sequence order, so a deque stays sorted for free) and
``returned`` (a heap of messages that came back: requeued, released, reclaimed).
A claim takes the smaller head of the two, so the queue hands out messages strictly
by sequence without ever sorting. In-flight messages are also indexed by consumer
(for ``release``) and, when the claim had a deadline, in one heap for ``reclaim``,
with lazy deletion: a heap item whose delivery is over is skipped when popped.

Every state change goes through :data:`LIFECYCLE`, the queue message lifecycle as a
table. ``PENDING`` exists for stores whose appends complete later (the file store's
group commit): the message has its sequence number but nobody can claim it yet.
``SETTLING`` is the mirror image for settles: the outcome is being made durable, and
meanwhile neither ``release`` nor ``reclaim`` may hand the message out again.

A topic's index is only positions, payload byte count, the recent ids (idempotent
append) and the durable cursors; where the messages live is up to the store.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from msg.persistence import (
    Claim,
    Delivery,
    Outcome,
    QueueStats,
    Reclaimed,
    StoredMessage,
    TopicStats,
)

__all__ = [
    "DEAD_LETTER_PREFIX",
    "DEDUP_WINDOW",
    "LIFECYCLE",
    "Entry",
    "Event",
    "Index",
    "LifecycleError",
    "QueueIndex",
    "RecentIds",
    "State",
    "TopicIndex",
]

# The broker's rule (msg.protocol.names) restated: storage may not import protocol.
DEAD_LETTER_PREFIX: Final = "$dead."

# Ids remembered per queue or topic for idempotent append, beyond the messages still
# live. A client resends only the batches that were in flight when its connection
# broke, a few thousand messages at most; Kafka's idempotent producer remembers the
# last 5 batches per producer. 10k to 20k ids (two generations) cost about 1-2 MB.
DEDUP_WINDOW: Final = 10_000


class State(StrEnum):
    """Where a queue message is in its lifecycle."""

    PENDING = "pending"
    """Appended, not yet durable: has a sequence number, cannot be claimed."""
    READY = "ready"
    IN_FLIGHT = "in_flight"
    SETTLING = "settling"
    """Settled by its consumer; the outcome is being made durable."""
    SETTLING_RELEASED = "settling_released"
    """As SETTLING, and the consumer went away meanwhile: a failed settle makes it READY."""
    DONE = "done"
    """Acked, consumed or dead-lettered (or its append failed): gone from the queue."""


class Event(StrEnum):
    """What can happen to a queue message."""

    COMMIT = "commit"
    DISCARD = "discard"
    CLAIM = "claim"
    CONSUME = "consume"
    SETTLE = "settle"
    ACK = "ack"
    REQUEUE = "requeue"
    DEAD = "dead"
    ABORT = "abort"
    RELEASE = "release"
    RECLAIM = "reclaim"


_S = State
_E = Event

LIFECYCLE: Final[Mapping[tuple[State, Event], State]] = MappingProxyType(
    {
        # An append completes (durable) or fails.
        (_S.PENDING, _E.COMMIT): _S.READY,
        (_S.PENDING, _E.DISCARD): _S.DONE,
        # Delivery: with a settle to follow, or auto_ack.
        (_S.READY, _E.CLAIM): _S.IN_FLIGHT,
        (_S.READY, _E.CONSUME): _S.DONE,
        # The consumer went away, or its deadline passed.
        (_S.IN_FLIGHT, _E.RELEASE): _S.READY,
        (_S.IN_FLIGHT, _E.RECLAIM): _S.READY,
        # Settling: started, then finished one way, or failed (back where it was).
        (_S.IN_FLIGHT, _E.SETTLE): _S.SETTLING,
        (_S.SETTLING, _E.ACK): _S.DONE,
        (_S.SETTLING, _E.DEAD): _S.DONE,
        (_S.SETTLING, _E.REQUEUE): _S.READY,
        (_S.SETTLING, _E.ABORT): _S.IN_FLIGHT,
        (_S.SETTLING, _E.RELEASE): _S.SETTLING_RELEASED,
        (_S.SETTLING_RELEASED, _E.ACK): _S.DONE,
        (_S.SETTLING_RELEASED, _E.DEAD): _S.DONE,
        (_S.SETTLING_RELEASED, _E.REQUEUE): _S.READY,
        (_S.SETTLING_RELEASED, _E.ABORT): _S.READY,
    }
)
"""The queue message lifecycle; a (state, event) pair not listed is a bug."""

# The same table by event, for the hot paths: one dict lookup per transition, and a
# KeyError (a bug) for a transition the table does not allow.
_NEXT: Final[Mapping[Event, Mapping[State, State]]] = MappingProxyType(
    {
        event: MappingProxyType({s: after for (s, e), after in LIFECYCLE.items() if e is event})
        for event in Event
    }
)
_ON_COMMIT: Final = _NEXT[Event.COMMIT]
_ON_CLAIM: Final = _NEXT[Event.CLAIM]
_ON_CONSUME: Final = _NEXT[Event.CONSUME]
_ON_SETTLE: Final = _NEXT[Event.SETTLE]

_OUTCOME_EVENT: Final[Mapping[Outcome, Event]] = MappingProxyType(
    {Outcome.ACK: Event.ACK, Outcome.REQUEUE: Event.REQUEUE, Outcome.DEAD: Event.DEAD}
)
_HELD: Final = frozenset({State.IN_FLIGHT, State.SETTLING, State.SETTLING_RELEASED})


class LifecycleError(RuntimeError):
    """An event that the lifecycle table does not allow in the message's state (a bug)."""


@dataclass(slots=True, eq=False)
class Entry:
    """One queue message that is not done; mutable, owned by its :class:`QueueIndex`."""

    seq: int
    message_id: str
    payload: bytes
    published_at: float
    attempt: int = 0
    """Deliveries so far; the next claim makes it attempt + 1."""
    state: State = State.PENDING
    consumer: str | None = None
    """Holder while in flight."""
    last_consumer: str | None = None
    """Who had it last, so a redelivery can prefer someone else."""
    deadline: float | None = None
    reason: str | None = None
    """Why it was dead-lettered (entries of ``$dead.`` queues)."""
    segment: int = 0
    """File store: the segment holding its newest copy (for live counts)."""


def step(entry: Entry, event: Event) -> None:
    """Move ``entry`` along the lifecycle table."""
    after = LIFECYCLE.get((entry.state, event))
    if after is None:
        raise LifecycleError(
            f"message {entry.message_id!r}: {event} is not allowed when {entry.state}"
        )
    entry.state = after


class RecentIds:
    """Ids of recent appends with their positions: the last ``size`` to ``2 * size``.

    Two generations instead of an ordered dict with eviction: adding is one dict store,
    and forgetting half the window at once is free.
    """

    __slots__ = ("_new", "_old", "_size")

    def __init__(self, size: int = DEDUP_WINDOW) -> None:
        self._size = size
        self._new: dict[str, int] = {}
        self._old: dict[str, int] = {}

    def get(self, message_id: str) -> int | None:
        found = self._new.get(message_id)
        return self._old.get(message_id) if found is None else found

    def add(self, message_id: str, position: int) -> None:
        new = self._new
        new[message_id] = position
        if len(new) >= self._size:
            self._old = new
            self._new = {}

    def discard(self, message_id: str) -> None:
        self._new.pop(message_id, None)
        self._old.pop(message_id, None)


class QueueIndex:
    """Delivery state of one queue."""

    __slots__ = (
        "bytes",
        "entries",
        "fresh",
        "held",
        "in_flight",
        "max_messages",
        "name",
        "next_seq",
        "recent",
        "returned",
    )

    def __init__(self, name: str, max_messages: int | None = None) -> None:
        self.name = name
        self.max_messages = max_messages
        self.entries: dict[str, Entry] = {}
        self.fresh: deque[Entry] = deque()
        self.returned: list[tuple[int, Entry]] = []
        self.held: dict[str, dict[str, Entry]] = {}
        self.in_flight = 0
        self.bytes = 0
        self.next_seq = 0
        self.recent = RecentIds()

    @property
    def ready(self) -> int:
        return len(self.fresh) + len(self.returned)

    def stats(self) -> QueueStats:
        return QueueStats(ready=self.ready, in_flight=self.in_flight, bytes=self.bytes)

    # -- appending ---------------------------------------------------------------

    def known(self, message_id: str) -> int | None:
        """The position of ``message_id`` if it was appended recently or is still live."""
        entry = self.entries.get(message_id)
        return self.recent.get(message_id) if entry is None else entry.seq

    def full(self) -> bool:
        limit = self.max_messages
        return limit is not None and len(self.entries) >= limit

    def offer(self, message: StoredMessage) -> Entry | int | None:
        """Stage ``message`` (PENDING, next sequence number) and return its entry.

        Returns the existing position instead if its id is known (idempotent append),
        or None if the queue is full. One call per message: this is the hot path.
        """
        message_id = message.message_id
        entries = self.entries
        entry = entries.get(message_id)
        if entry is not None:
            return entry.seq
        known = self.recent.get(message_id)
        if known is not None:
            return known
        limit = self.max_messages
        if limit is not None and len(entries) >= limit:
            return None
        seq = self.next_seq
        self.next_seq = seq + 1
        entry = entries[message_id] = Entry(seq, message_id, message.payload, message.published_at)
        self.recent.add(message_id, seq)
        return entry

    def stage_dead_letter(self, entry: Entry, reason: str | None) -> Entry:
        """Stage a copy of ``entry`` (rejected from another queue) as a new message here."""
        seq = self.next_seq
        self.next_seq = seq + 1
        copy = Entry(seq, entry.message_id, entry.payload, entry.published_at, reason=reason)
        self.entries[entry.message_id] = copy
        self.recent.add(entry.message_id, seq)
        return copy

    def commit(self, entry: Entry) -> None:
        """The append of ``entry`` completed: it can be claimed."""
        entry.state = _ON_COMMIT[entry.state]
        self.bytes += len(entry.payload)
        fresh = self.fresh
        if not fresh or fresh[-1].seq < entry.seq:
            fresh.append(entry)
        else:
            # Commits arrive in sequence order; this keeps the order even if one did not.
            heapq.heappush(self.returned, (entry.seq, entry))

    def discard(self, entry: Entry) -> None:
        """The append of ``entry`` failed: forget it, as if never appended."""
        step(entry, Event.DISCARD)
        del self.entries[entry.message_id]
        self.recent.discard(entry.message_id)
        if entry.seq == self.next_seq - 1:
            self.next_seq = entry.seq

    def restore(self, entries: Iterable[Entry]) -> None:
        """Load entries replayed from a log (in sequence order), all READY."""
        for entry in entries:
            entry.state = State.READY
            self.entries[entry.message_id] = entry
            self.fresh.append(entry)
            self.bytes += len(entry.payload)

    # -- delivering --------------------------------------------------------------

    def _pop_ready(self) -> Entry:
        fresh = self.fresh
        returned = self.returned
        if returned and (not fresh or returned[0][0] < fresh[0].seq):
            return heapq.heappop(returned)[1]
        return fresh.popleft()

    def _make_ready(self, entry: Entry, event: Event) -> None:
        step(entry, event)
        entry.consumer = None
        entry.deadline = None
        heapq.heappush(self.returned, (entry.seq, entry))

    def _unhold(self, entry: Entry) -> None:
        consumer = entry.consumer
        if consumer is not None:
            held = self.held.get(consumer)
            if held is not None:
                held.pop(entry.message_id, None)
                if not held:
                    del self.held[consumer]
        self.in_flight -= 1

    def _finish(self, entry: Entry) -> None:
        """Forget a message that is done (acked, consumed, dead-lettered)."""
        del self.entries[entry.message_id]
        self.bytes -= len(entry.payload)

    def claim(self, claim: Claim) -> list[Entry]:
        """Hand out ready messages, one per slot; returns them with ``consumer`` set.

        auto_ack entries come back DONE (and are no longer in the index).
        """
        slots = claim.consumers
        count = min(len(slots), self.ready)
        if count == 0:
            return []
        # Only a claim with several consumers can steer a redelivery elsewhere.
        steer = len(slots) > 1 and len(set(slots)) > 1
        taken: list[bool] | None = None
        out: list[Entry] = []
        auto_ack = claim.auto_ack
        deadline = claim.deadline
        held_by = self.held
        i = 0
        n = len(slots)
        while len(out) < count:
            entry = self._pop_ready()
            consumer = slots[i]
            pick = i
            if steer and entry.last_consumer == consumer:
                for j in range(i + 1, n):
                    if slots[j] != consumer and (taken is None or not taken[j]):
                        pick = j
                        consumer = slots[j]
                        break
            if pick == i:
                i += 1
                while taken is not None and i < n and taken[i]:
                    i += 1
            else:
                if taken is None:
                    taken = [False] * n
                taken[pick] = True
            entry.attempt += 1
            entry.consumer = consumer
            entry.last_consumer = consumer
            if auto_ack:
                entry.state = _ON_CONSUME[entry.state]
                self._finish(entry)
            else:
                entry.state = _ON_CLAIM[entry.state]
                entry.deadline = deadline
                held = held_by.get(consumer)
                if held is None:
                    held = held_by[consumer] = {}
                held[entry.message_id] = entry
                self.in_flight += 1
            out.append(entry)
        return out

    def release(self, consumer: str) -> int:
        """Everything ``consumer`` holds becomes ready again (settling ones stay put)."""
        held = self.held.pop(consumer, None)
        if not held:
            return 0
        count = 0
        for entry in held.values():
            if entry.state is State.IN_FLIGHT:
                self._make_ready(entry, Event.RELEASE)
                self.in_flight -= 1
                count += 1
            else:
                # Settling: its outcome decides; if that fails it becomes ready.
                step(entry, Event.RELEASE)
                entry.consumer = None
        return count

    def reclaim(self, entry: Entry) -> None:
        self._unhold(entry)
        self._make_ready(entry, Event.RECLAIM)

    # -- settling ----------------------------------------------------------------

    def begin_settle(self, message_id: str, consumer: str) -> Entry | None:
        """Start settling; None if ``consumer`` does not hold ``message_id`` in flight."""
        entry = self.entries.get(message_id)
        if entry is None or entry.state is not State.IN_FLIGHT or entry.consumer != consumer:
            return None
        entry.state = _ON_SETTLE[entry.state]
        return entry

    def finish_settle(self, entry: Entry, outcome: Outcome) -> None:
        """The settle is durable: apply ``outcome`` (a dead letter's copy is the caller's)."""
        self._unhold(entry)
        if outcome is Outcome.REQUEUE:
            self._make_ready(entry, Event.REQUEUE)
        else:
            step(entry, _OUTCOME_EVENT[outcome])
            self._finish(entry)

    def abort_settle(self, entry: Entry) -> bool:
        """The settle failed: back in flight (True), or ready if its consumer went away."""
        if entry.state is State.SETTLING_RELEASED:
            self._unhold(entry)
            self._make_ready(entry, Event.ABORT)
            return False
        step(entry, Event.ABORT)
        return True


class TopicIndex:
    """Positions, cursors and recent ids of one topic; the messages live elsewhere."""

    __slots__ = ("bytes", "cursors", "end", "first", "name", "next_position", "recent")

    def __init__(self, name: str, first: int = 0) -> None:
        self.name = name
        self.first = first
        self.end = first
        """Next position to become readable: appends before it completed."""
        self.next_position = first
        """Next position to hand out (ahead of ``end`` while appends are pending)."""
        self.bytes = 0
        self.cursors: dict[str, int] = {}
        self.recent = RecentIds()

    def stats(self) -> TopicStats:
        return TopicStats(
            first=self.first, end=self.end, bytes=self.bytes, cursors=dict(self.cursors)
        )


class Index:
    """Every queue and topic of one store, plus the deadline heap for ``reclaim``."""

    __slots__ = ("_deadlines", "_tiebreak", "max_queue_messages", "queues", "topics")

    def __init__(self, max_queue_messages: int | None = None) -> None:
        self.max_queue_messages = max_queue_messages
        self.queues: dict[str, QueueIndex] = {}
        self.topics: dict[str, TopicIndex] = {}
        # (deadline, tiebreak, queue, entry, attempt); stale items are skipped when popped.
        self._deadlines: list[tuple[float, int, QueueIndex, Entry, int]] = []
        self._tiebreak = itertools.count()

    def queue(self, name: str) -> QueueIndex:
        found = self.queues.get(name)
        if found is None:
            found = self.queues[name] = QueueIndex(name, self.max_queue_messages)
        return found

    def topic(self, name: str) -> TopicIndex:
        found = self.topics.get(name)
        if found is None:
            found = self.topics[name] = TopicIndex(name)
        return found

    def claim(self, claim: Claim) -> list[Entry]:
        """Claim on the named queue; remembers deadlines for :meth:`reclaim`."""
        queue = self.queues.get(claim.queue)
        if queue is None:
            return []
        entries = queue.claim(claim)
        deadline = claim.deadline
        if deadline is not None and not claim.auto_ack:
            heap = self._deadlines
            tiebreak = self._tiebreak
            for entry in entries:
                heapq.heappush(heap, (deadline, next(tiebreak), queue, entry, entry.attempt))
        return entries

    def remember_deadline(self, queue: QueueIndex, entry: Entry) -> None:
        """Track ``entry``'s deadline again (a failed settle put it back in flight)."""
        if entry.deadline is not None:
            item = (entry.deadline, next(self._tiebreak), queue, entry, entry.attempt)
            heapq.heappush(self._deadlines, item)

    def reclaim(self, now: float) -> list[Reclaimed]:
        heap = self._deadlines
        out: list[Reclaimed] = []
        while heap and heap[0][0] < now:
            _, _, queue, entry, attempt = heapq.heappop(heap)
            # Skip deliveries that ended (settled, released, redelivered since).
            if entry.state is not State.IN_FLIGHT or entry.attempt != attempt:
                continue
            consumer = entry.consumer
            assert consumer is not None
            queue.reclaim(entry)
            out.append(Reclaimed(queue.name, consumer, entry.message_id))
        return out

    def release(self, queue: str, consumer: str) -> int:
        found = self.queues.get(queue)
        return 0 if found is None else found.release(consumer)

    def begin_settle(self, queue: str, message_id: str, consumer: str) -> Entry | None:
        found = self.queues.get(queue)
        return None if found is None else found.begin_settle(message_id, consumer)

    def abort_settle(self, queue: QueueIndex, entry: Entry) -> None:
        if queue.abort_settle(entry):
            self.remember_deadline(queue, entry)

    def queue_stats(self) -> dict[str, QueueStats]:
        return {name: queue.stats() for name, queue in self.queues.items()}

    def topic_stats(self) -> dict[str, TopicStats]:
        return {name: topic.stats() for name, topic in self.topics.items()}


def delivery(queue: str, entry: Entry) -> Delivery:
    """The :class:`Delivery` of a freshly claimed entry."""
    consumer = entry.consumer
    assert consumer is not None
    return Delivery(
        queue,
        consumer,
        entry.message_id,
        entry.payload,
        entry.published_at,
        entry.attempt,
        entry.reason,
    )


def is_held(entry: Entry) -> bool:
    """In flight or settling: delivered and not yet back or done."""
    return entry.state in _HELD
