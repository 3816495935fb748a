"""Delivery state of queues and topics, kept in memory, shared by the single-node stores.

Theory of operation
-------------------
Both :class:`~msg.storage.memory.MemoryStore` and :class:`~msg.storage.filestore.FileStore`
answer every delivery question from this index; the file store adds a log that makes
each change durable and replays it into the index at start-up. The index does no IO
and never awaits, so each operation is atomic with respect to every other.

The hot paths (append, claim, settle) run once per message at up to a few hundred
thousand messages a second, so the index is shaped to do per message only what it
must, and everything else once per batch:

- A queue message that was never delivered is not an object. The messages of one
  append wait in a :class:`Run`: the append's own columns (ids, payloads) plus a
  ``range`` of sequence numbers and a read position. Appending is a few bulk dict
  updates; a million-message backlog is a few thousand runs, not a million objects
  for the cyclic garbage collector to walk.
- An :class:`Entry` (five slots) exists from a message's first delivery until it is
  done: it holds the :class:`~msg.persistence.Delivery` handed out (which carries
  the id, payload, consumer and attempt, and is never mutated: a redelivery hands
  out a new one), the sequence number, the segment, the state and the deadline.
- Settling works on a whole group of ids of one consumer.

Per queue: ``live`` maps every message id not yet done to its sequence number
(idempotent append, ``max_messages``); ``entries`` maps the delivered ones to their
:class:`Entry`; ``held`` indexes entries by consumer (for ``release``). Ready
messages wait in two places: ``runs`` (never delivered, in sequence order) and
``returned`` (a heap of entries that came back: requeued, released, reclaimed). A
claim takes the smaller head of the two, so the queue hands out messages strictly by
sequence without ever sorting. Deadlines go into one heap per index, one item per
claim; an item only says when to look, the entry's own deadline decides.

Every state change follows :data:`LIFECYCLE`, the queue message lifecycle as a
table. ``PENDING`` exists for stores whose appends complete later (the file store's
group commit): the run has its sequence numbers but nobody can claim it yet.
``SETTLING`` is the mirror image for settles: the outcome is being made durable, and
meanwhile neither ``release`` nor ``reclaim`` may hand the message out again.
``PENDING`` and ``READY`` before the first delivery are the state of a run; entries
carry the states from ``IN_FLIGHT`` on. Hot paths check a state and then assign the
successor that the table gives (looked up once, at import), so the table stays the
one source of truth without a lookup per message.

A topic's index is only positions, payload byte count, the recent ids (idempotent
append) and the durable cursors; where the messages live is up to the store.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from itertools import repeat
from operator import attrgetter
from types import MappingProxyType
from typing import Final, cast

from msg.persistence import (
    Append,
    Claim,
    Cursor,
    Delivery,
    Outcome,
    QueueStats,
    Reclaimed,
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
    "Offer",
    "QueueFull",
    "QueueIndex",
    "RecentIds",
    "Run",
    "State",
    "TopicIndex",
    "check_columns",
    "step",
    "unknown_ids",
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

# Successors the hot paths assign after checking the state they start from.
_CLAIMED: Final = LIFECYCLE[_S.READY, _E.CLAIM]
_SETTLING: Final = LIFECYCLE[_S.IN_FLIGHT, _E.SETTLE]
_DONE: Final = LIFECYCLE[_S.SETTLING, _E.ACK]
if {LIFECYCLE[s, e] for s in (_S.SETTLING, _S.SETTLING_RELEASED) for e in (_E.ACK, _E.DEAD)} != {
    _DONE
}:
    raise AssertionError("finish_settle assumes ack and dead end every settle in DONE")


_MESSAGE_ID_OF: Final = attrgetter("delivery.message_id")
_ONE_MORE: Final = (1).__add__
_PAYLOAD_OF: Final = attrgetter("delivery.payload")
_STATE_OF: Final = attrgetter("state")
_CONSUMER_OF: Final = attrgetter("delivery.consumer")


def _consume(iterator: Iterator[object]) -> None:
    """Run ``iterator`` to its end in C (a bulk dict operation over a map)."""
    deque(iterator, maxlen=0)


class LifecycleError(RuntimeError):
    """An event that the lifecycle table does not allow in the message's state (a bug)."""


class Entry:
    """A queue message delivered at least once and not yet done; owned by its queue."""

    __slots__ = ("deadline", "delivery", "segment", "seq", "state")

    def __init__(
        self,
        seq: int,
        delivery: Delivery,
        segment: int = 0,
        state: State = State.IN_FLIGHT,
        deadline: float | None = None,
    ) -> None:
        self.seq = seq
        self.delivery = delivery
        """The latest delivery: message, last consumer, deliveries so far (attempt)."""
        self.segment = segment
        """File store: the segment holding its newest copy (for live counts)."""
        self.state = state
        self.deadline = deadline
        """When the current delivery may be reclaimed; None: never."""


def step(entry: Entry, event: Event) -> None:
    """Move ``entry`` along the lifecycle table."""
    after = LIFECYCLE.get((entry.state, event))
    if after is None:
        raise LifecycleError(
            f"message {entry.delivery.message_id!r}: {event} is not allowed when {entry.state}"
        )
    entry.state = after


class Run:
    """Queue messages appended together and never delivered, in sequence order.

    Columnar, so appending builds no object per message: ``ids``, ``payloads`` and
    ``published`` are parallel tuples, ``seqs`` is a ``range`` for an append.
    Tuples, not lists: the cyclic GC untracks a tuple of strings, bytes or numbers
    the first time it sees one, so a backlog of runs costs full collections nothing
    (a list is traversed every time). ``attempts`` and ``reasons`` are None when all are 0
    and None (everything but recovered and dead-lettered messages). Messages before
    ``head`` have been claimed.
    """

    __slots__ = (
        "attempts",
        "bytes",
        "head",
        "ids",
        "payloads",
        "published",
        "reasons",
        "segment",
        "seqs",
    )

    def __init__(
        self,
        seqs: Sequence[int],
        ids: Sequence[str],
        payloads: Sequence[bytes],
        published: Sequence[float],
        segment: int = 0,
        attempts: Sequence[int] | None = None,
        reasons: Sequence[str | None] | None = None,
    ) -> None:
        self.seqs = seqs
        self.ids = ids
        self.payloads = payloads
        self.published = published
        self.attempts = attempts
        self.reasons = reasons
        self.segment = segment
        """File store: the segment holding the messages from ``head`` on."""
        self.head = 0
        self.bytes = sum(map(len, payloads))
        """Payload bytes of all its messages (counted into the queue on commit)."""

    def __len__(self) -> int:
        """Messages not yet claimed."""
        return len(self.seqs) - self.head

    def rest(self) -> Iterator[tuple[int, str, bytes, float, int, str | None]]:
        """(seq, id, payload, published_at, attempt, reason) of the messages not claimed."""
        attempts = self.attempts
        reasons = self.reasons
        for k in range(self.head, len(self.seqs)):
            yield (
                self.seqs[k],
                self.ids[k],
                self.payloads[k],
                self.published[k],
                0 if attempts is None else attempts[k],
                None if reasons is None else reasons[k],
            )


class RecentIds:
    """Ids of recent appends with their positions: the last ``size`` to ``2 * size``.

    Two generations instead of an ordered dict with eviction: forgetting half the
    window at once is free. The window is checked and grown per batch, so it may hold
    one batch more than ``2 * size``.

    Ids are only *looked up* when an append may be a resend (not ``fresh``), which the
    broker never sends itself. So a batch is remembered as it came, (ids, positions),
    and put into a dict only when a lookup needs it: the hot path adds a batch with
    no work per id, and a generation that is never looked up is dropped unread.
    """

    __slots__ = ("_count", "_new", "_old", "_size")

    def __init__(self, size: int = DEDUP_WINDOW) -> None:
        self._size = size
        self._new = _Generation()
        self._old = _Generation()
        self._count = 0
        """Ids in the new generation."""

    def get(self, message_id: str) -> int | None:
        found = self._new.ids().get(message_id)
        return self._old.ids().get(message_id) if found is None else found

    def none_of(self, message_ids: Iterable[str]) -> bool:
        """True if none of ``message_ids`` is remembered (two C-level passes)."""
        return self._new.ids().keys().isdisjoint(message_ids) and self._old.ids().keys().isdisjoint(
            message_ids
        )

    def add(self, message_id: str, position: int) -> None:
        self._new.ids()[message_id] = position
        self._count += 1
        if self._count >= self._size:
            self._old = self._new
            self._new = _Generation()
            self._count = 0

    def add_many(self, message_ids: Sequence[str], positions: Sequence[int]) -> None:
        # A tuple: the caller may reuse its list (tuple() of a tuple is free).
        self._new.batches.append((tuple(message_ids), positions))
        self._count += len(message_ids)
        if self._count >= self._size:
            self._old = self._new
            self._new = _Generation()
            self._count = 0

    def discard(self, message_id: str) -> None:
        self._new.ids().pop(message_id, None)
        self._old.ids().pop(message_id, None)


class _Generation:
    """Half of a :class:`RecentIds` window: batches as added, made a dict when read."""

    __slots__ = ("batches", "by_id")

    def __init__(self) -> None:
        self.by_id: dict[str, int] = {}
        self.batches: list[tuple[tuple[str, ...], Sequence[int]]] = []

    def ids(self) -> dict[str, int]:
        """Every id of this generation, with its position."""
        if self.batches:
            by_id = self.by_id
            for message_ids, positions in self.batches:
                by_id.update(zip(message_ids, positions, strict=True))
            self.batches.clear()
        return self.by_id


class Offer:
    """What :meth:`QueueIndex.offer` / :meth:`TopicIndex.offer` made of one append."""

    __slots__ = ("full", "new_ids", "new_payloads", "positions", "seqs")

    def __init__(
        self,
        positions: Sequence[int],
        seqs: range,
        new_ids: Sequence[str],
        new_payloads: Sequence[bytes],
        full: bool,
    ) -> None:
        self.positions = positions
        """One per message stored (new or already held): a range when all are new."""
        self.seqs = seqs
        """The positions given to the new messages (consecutive)."""
        self.new_ids = new_ids
        self.new_payloads = new_payloads
        self.full = full
        """The queue was full: messages from ``len(positions)`` on were not stored."""


def _offer_slow(
    held: Mapping[str, int] | None,
    recent: RecentIds,
    message_ids: Sequence[str],
    payloads: Sequence[bytes],
    first: int,
    room: int | None,
) -> Offer:
    """Message by message: some ids are known (or repeated), or not all fit."""
    positions: list[int] = []
    new_ids: list[str] = []
    new_payloads: list[bytes] = []
    staged: dict[str, int] = {}
    seq = first
    full = False
    for message_id, payload in zip(message_ids, payloads, strict=True):
        known = staged.get(message_id)
        if known is None and held is not None:
            known = held.get(message_id)
        if known is None:
            known = recent.get(message_id)
        if known is not None:
            positions.append(known)
            continue
        if room is not None and len(new_ids) >= room:
            full = True
            break
        staged[message_id] = seq
        new_ids.append(message_id)
        new_payloads.append(payload)
        positions.append(seq)
        seq += 1
    seqs = range(first, seq)
    if len(positions) == len(seqs):
        return Offer(seqs, seqs, new_ids, new_payloads, full)
    return Offer(positions, seqs, new_ids, new_payloads, full)


class QueueIndex:
    """Delivery state of one queue."""

    __slots__ = (
        "bytes",
        "entries",
        "held",
        "in_flight",
        "live",
        "max_messages",
        "name",
        "next_seq",
        "pending",
        "recent",
        "returned",
        "runs",
        "waiting",
    )

    def __init__(self, name: str, max_messages: int | None = None) -> None:
        self.name = name
        self.max_messages = max_messages
        self.live: dict[str, int] = {}
        """Every message not done, pending ones included: id -> sequence number."""
        self.entries: dict[str, Entry] = {}
        self.runs: deque[Run] = deque()
        self.waiting = 0
        """Messages in ``runs`` not yet claimed."""
        self.returned: list[tuple[int, Entry]] = []
        self.held: dict[str, dict[str, Entry]] = {}
        self.pending: dict[Run, None] = {}
        """Runs appended and not yet committed or discarded (file store)."""
        self.in_flight = 0
        self.bytes = 0
        self.next_seq = 0
        self.recent = RecentIds()

    @property
    def ready(self) -> int:
        return self.waiting + len(self.returned)

    def stats(self) -> QueueStats:
        return QueueStats(ready=self.ready, in_flight=self.in_flight, bytes=self.bytes)

    # -- appending ---------------------------------------------------------------

    def offer(
        self,
        message_ids: Sequence[str],
        payloads: Sequence[bytes],
        published_at: float,
        segment: int = 0,
        fresh: bool = False,
    ) -> tuple[Offer, Run | None]:
        """Stage one append: the new messages become a PENDING run (None if none).

        Ids already held or recently appended keep their position (idempotent
        append); messages that do not fit stop the append there. The common case,
        all new and all fitting, costs a few C-level passes over the ids; with
        ``fresh`` (see :attr:`~msg.persistence.Append.fresh`) the ids are not looked up.
        """
        count = len(message_ids)
        if len(payloads) != count:
            raise ValueError(f"{count} message ids but {len(payloads)} payloads")
        live = self.live
        limit = self.max_messages
        first = self.next_seq
        recent = self.recent
        if (limit is None or len(live) + count <= limit) and (
            fresh
            or (
                live.keys().isdisjoint(message_ids)
                and recent.none_of(message_ids)
                and len(set(message_ids)) == count
            )
        ):
            seqs = range(first, first + count)
            offer = Offer(seqs, seqs, message_ids, payloads, False)
        else:
            room = None if limit is None else max(limit - len(live), 0)
            offer = _offer_slow(live, recent, message_ids, payloads, first, room)
            seqs = offer.seqs
        if not seqs:
            return offer, None
        self.next_seq = seqs.stop
        # Copies (tuple() of a tuple is free): the caller may reuse its lists.
        new_ids = tuple(offer.new_ids)
        live.update(zip(new_ids, seqs, strict=True))
        recent.add_many(new_ids, seqs)
        run = Run(seqs, new_ids, tuple(offer.new_payloads), (published_at,) * len(seqs), segment)
        self.pending[run] = None
        return offer, run

    def stage_dead_letters(
        self, entries: Sequence[Entry], reason: str | None, segment: int = 0
    ) -> Run | None:
        """Stage copies of ``entries`` (rejected from another queue) as a PENDING run.

        Messages already here (a duplicate publish that was rejected twice) are not
        copied again. Returns None if there is nothing to copy; raises
        :class:`QueueFull` if the rest do not all fit (a settle group is all or
        nothing).
        """
        live = self.live
        fresh = [e.delivery for e in entries if e.delivery.message_id not in live]
        if not fresh:
            return None
        limit = self.max_messages
        if limit is not None and len(live) + len(fresh) > limit:
            raise QueueFull(self.name)
        first = self.next_seq
        seqs = range(first, first + len(fresh))
        self.next_seq = seqs.stop
        ids = tuple(d.message_id for d in fresh)
        live.update(zip(ids, seqs, strict=True))
        self.recent.add_many(ids, seqs)
        run = Run(
            seqs,
            ids,
            tuple(d.payload for d in fresh),
            tuple(d.published_at for d in fresh),
            segment,
            reasons=(reason,) * len(fresh),
        )
        self.pending[run] = None
        return run

    def commit(self, run: Run) -> None:
        """The append of ``run`` completed: its messages can be claimed."""
        self.pending.pop(run, None)
        runs = self.runs
        if runs and runs[-1].seqs[-1] > run.seqs[0]:
            # Commits arrive in sequence order; this keeps the order even if one did not.
            for seq, message_id, payload, published_at, attempt, reason in run.rest():
                delivery = Delivery(
                    self.name, "", message_id, payload, published_at, attempt, reason
                )
                self._return(Entry(seq, delivery, run.segment, _S.READY))
            self.bytes += run.bytes
            return
        runs.append(run)
        self.waiting += len(run)
        self.bytes += run.bytes

    def discard(self, run: Run) -> None:
        """The append of ``run`` failed: forget it, as if never appended."""
        self.pending.pop(run, None)
        live = self.live
        recent = self.recent
        for message_id in run.ids:
            del live[message_id]
            recent.discard(message_id)
        if run.seqs[-1] == self.next_seq - 1:
            self.next_seq = run.seqs[0]

    def restore(self, runs: Iterable[Run]) -> None:
        """Load runs replayed from a log (in sequence order), all READY."""
        live = self.live
        for run in runs:
            live.update(zip(run.ids, run.seqs, strict=True))
            self.runs.append(run)
            self.waiting += len(run)
            self.bytes += run.bytes

    # -- delivering --------------------------------------------------------------

    def _return(self, entry: Entry) -> None:
        self.entries[entry.delivery.message_id] = entry
        heapq.heappush(self.returned, (entry.seq, entry))

    def _make_ready(self, entry: Entry, event: Event) -> None:
        step(entry, event)
        entry.deadline = None
        heapq.heappush(self.returned, (entry.seq, entry))

    def claim(self, claim: Claim, consumed: list[tuple[int, int]] | None = None) -> list[Delivery]:
        """Hand out ready messages, one per slot, in sequence order.

        auto_ack deliveries are done at once; their (sequence number, segment) pairs
        are appended to ``consumed`` (the file store logs them).
        """
        slots = claim.consumers
        count = min(len(slots), self.waiting + len(self.returned))
        if count == 0:
            return []
        if self.returned or claim.auto_ack:
            return self._claim_any(claim, count, consumed)
        # The hot path: never-delivered messages, in order, one per slot. Each run's
        # share is built column by column with map(), so no bytecode runs per message
        # but the two constructors'.
        name = self.name
        deadline = claim.deadline
        entries = self.entries
        runs = self.runs
        out: list[Delivery] = []
        i = 0
        while i < count:
            run = runs[0]
            head = run.head
            stop = min(len(run.seqs), head + count - i)
            take = stop - head
            consumers = slots[i : i + take]
            ids = run.ids[head:stop]
            attempts = run.attempts
            reasons = run.reasons
            deliveries = list(
                map(
                    Delivery,
                    repeat(name, take),
                    consumers,
                    ids,
                    run.payloads[head:stop],
                    run.published[head:stop],
                    repeat(1, take) if attempts is None else map(_ONE_MORE, attempts[head:stop]),
                    repeat(None, take) if reasons is None else reasons[head:stop],
                )
            )
            claimed = list(
                map(
                    Entry,
                    run.seqs[head:stop],
                    deliveries,
                    repeat(run.segment, take),
                    repeat(_CLAIMED, take),
                    repeat(deadline, take),
                )
            )
            entries.update(zip(ids, claimed, strict=True))
            self._hold_all(consumers, ids, claimed)
            out += deliveries
            i += take
            run.head = stop
            if stop == len(run.seqs):
                runs.popleft()
        self.waiting -= count
        self.in_flight += count
        return out

    def _hold_all(self, consumers: Sequence[str], ids: Sequence[str], claimed: list[Entry]) -> None:
        """Index fresh claims by consumer: one bulk update when one consumer took them all."""
        held_by = self.held
        first = consumers[0]
        if consumers.count(first) == len(consumers):
            held = held_by.get(first)
            if held is None:
                held = held_by[first] = {}
            held.update(zip(ids, claimed, strict=True))
            return
        for consumer, message_id, entry in zip(consumers, ids, claimed, strict=True):
            held = held_by.get(consumer)
            if held is None:
                held = held_by[consumer] = {}
            held[message_id] = entry

    def _next_ready(self) -> Entry | Run:
        """The ready message with the lowest sequence number: an entry, or a run's head."""
        returned = self.returned
        runs = self.runs
        if returned and (not runs or returned[0][0] < runs[0].seqs[runs[0].head]):
            return heapq.heappop(returned)[1]
        return runs[0]

    def _take_from_run(self, run: Run) -> tuple[int, str, bytes, float, int, str | None, int]:
        """Take the head of ``run``: (seq, id, payload, published_at, attempt, reason, segment)."""
        k = run.head
        run.head = k + 1
        self.waiting -= 1
        if run.head == len(run.seqs):
            self.runs.popleft()
        return (
            run.seqs[k],
            run.ids[k],
            run.payloads[k],
            run.published[k],
            0 if run.attempts is None else run.attempts[k],
            None if run.reasons is None else run.reasons[k],
            run.segment,
        )

    def _claim_any(
        self, claim: Claim, count: int, consumed: list[tuple[int, int]] | None
    ) -> list[Delivery]:
        """Claim when redeliveries are waiting or with auto_ack: message by message."""
        slots = claim.consumers
        n = len(slots)
        # Only a claim with several consumers can steer a redelivery elsewhere.
        steer = n > 1 and len(set(slots)) > 1
        taken: list[bool] | None = None
        auto_ack = claim.auto_ack
        deadline = claim.deadline
        name = self.name
        out: list[Delivery] = []
        i = 0
        while len(out) < count:
            source = self._next_ready()
            consumer = slots[i]
            pick = i
            last = source.delivery.consumer if isinstance(source, Entry) else None
            if steer and last == consumer:
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
            if isinstance(source, Entry):
                entry = source
                before = entry.delivery
                delivery = Delivery(
                    name,
                    consumer,
                    before.message_id,
                    before.payload,
                    before.published_at,
                    before.attempt + 1,
                    before.reason,
                )
                entry.delivery = delivery
                if auto_ack:
                    step(entry, Event.CONSUME)
                    del self.entries[delivery.message_id]
                    self._forget(delivery)
                    if consumed is not None:
                        consumed.append((entry.seq, entry.segment))
                else:
                    step(entry, Event.CLAIM)
                    entry.deadline = deadline
                    self._hold(consumer, entry)
            else:
                seq, message_id, payload, published_at, attempt, reason, segment = (
                    self._take_from_run(source)
                )
                delivery = Delivery(
                    name, consumer, message_id, payload, published_at, attempt + 1, reason
                )
                if auto_ack:
                    self._forget(delivery)
                    if consumed is not None:
                        consumed.append((seq, segment))
                else:
                    entry = Entry(seq, delivery, segment, _CLAIMED, deadline)
                    self.entries[message_id] = entry
                    self._hold(consumer, entry)
            out.append(delivery)
        return out

    def _hold(self, consumer: str, entry: Entry) -> None:
        held = self.held.get(consumer)
        if held is None:
            held = self.held[consumer] = {}
        held[entry.delivery.message_id] = entry
        self.in_flight += 1

    def _forget(self, delivery: Delivery) -> None:
        """A message is done (acked, consumed, dead-lettered): only ``recent`` remembers it."""
        del self.live[delivery.message_id]
        self.bytes -= len(delivery.payload)

    def release(self, consumer: str) -> int:
        """Everything ``consumer`` holds becomes ready again (settling ones stay put)."""
        held = self.held.pop(consumer, None)
        if not held:
            return 0
        count = 0
        for entry in held.values():
            if entry.state is State.IN_FLIGHT:
                self._make_ready(entry, Event.RELEASE)
                count += 1
            else:
                # Settling: its outcome decides; if that fails it becomes ready.
                step(entry, Event.RELEASE)
        self.in_flight -= count
        return count

    def reclaim(self, entry: Entry) -> None:
        self._unhold(entry)
        self.in_flight -= 1
        self._make_ready(entry, Event.RECLAIM)

    def _unhold(self, entry: Entry) -> None:
        """Drop ``entry`` from its consumer's held messages (in flight or settling)."""
        consumer = entry.delivery.consumer
        held = self.held.get(consumer)
        if held is not None and held.pop(entry.delivery.message_id, None) is not None and not held:
            del self.held[consumer]

    # -- settling ----------------------------------------------------------------

    def begin_settle(
        self, consumer: str, message_ids: Sequence[str]
    ) -> tuple[list[Entry], list[str]]:
        """Start settling: (entries now SETTLING, ids not in flight to ``consumer``)."""
        found = list(map(self.entries.get, message_ids))
        if (
            found.count(None) == 0
            and list(map(_STATE_OF, found)).count(State.IN_FLIGHT) == len(found)
            and list(map(_CONSUMER_OF, found)).count(consumer) == len(found)
            and len(set(message_ids)) == len(found)  # (hashes cached by the lookups)
        ):
            # The usual settle: every id in flight to this consumer, none repeated.
            _consume(map(setattr, found, repeat("state"), repeat(_SETTLING)))
            return cast("list[Entry]", found), []
        begun: list[Entry] = []
        unknown: list[str] = []
        in_flight = State.IN_FLIGHT
        settling = _SETTLING
        for message_id, entry in zip(message_ids, found, strict=True):
            if entry is None or entry.state is not in_flight or entry.delivery.consumer != consumer:
                unknown.append(message_id)
            else:
                entry.state = settling
                begun.append(entry)
        return begun, unknown

    def finish_settle(self, consumer: str, entries: Sequence[Entry], outcome: Outcome) -> None:
        """The settle of ``consumer``'s ``entries`` is durable: apply ``outcome``.

        (A dead letter's copy is the caller's.) Entries still SETTLING are in the
        consumer's held messages; SETTLING_RELEASED ones left them on release, and
        cannot be in a newer held dict of the same consumer (nobody can claim them
        while they settle), so popping every id with a default is exact.
        """
        held_by = self.held
        held = held_by.get(consumer)
        ids = list(map(_MESSAGE_ID_OF, entries))
        if held is not None:
            _consume(map(held.pop, ids, repeat(None)))
            if not held:
                del held_by[consumer]
        if outcome is Outcome.REQUEUE:
            for entry in entries:
                self._make_ready(entry, Event.REQUEUE)
        else:
            # DONE from either settling state (checked at import).
            _consume(map(setattr, entries, repeat("state"), repeat(_DONE)))
            # Done: forgotten but for ``recent``; bulk deletes, looped in C.
            _consume(map(self.entries.__delitem__, ids))
            _consume(map(self.live.__delitem__, ids))
            self.bytes -= sum(map(len, map(_PAYLOAD_OF, entries)))
        self.in_flight -= len(entries)

    def abort_settle(self, entries: Iterable[Entry]) -> list[Entry]:
        """The settle failed: entries go back in flight, or ready if their consumer went
        away. Returns those back in flight (their deadlines need tracking again)."""
        back: list[Entry] = []
        for entry in entries:
            if entry.state is State.SETTLING_RELEASED:
                self.in_flight -= 1
                self._make_ready(entry, Event.ABORT)
            else:
                step(entry, Event.ABORT)
                back.append(entry)
        return back

    # -- inspection (maintenance, not the hot path) --------------------------------

    def pending_in(self, segment: int) -> bool:
        """True if an append to ``segment`` has not completed yet."""
        return any(run.segment == segment for run in self.pending)


class QueueFull(Exception):  # noqa: N818 - a signal inside the storage package, not an error
    """A dead-letter queue cannot take a whole settle group."""


def check_columns(items: Sequence[Append]) -> None:
    """Refuse a call with an item whose ids and payloads differ in number (a bug).

    Checked for the whole call before anything is staged, so a bad item cannot
    leave the items before it half done.
    """
    for item in items:
        if len(item.message_ids) != len(item.payloads):
            raise ValueError(
                f"append to {item.name!r}: {len(item.message_ids)} message ids"
                f" but {len(item.payloads)} payloads"
            )


def unknown_ids(unknown: list[str], begun: Sequence[Entry]) -> frozenset[str]:
    """The ids not in flight, less those settled in the same group (an id given twice)."""
    if not unknown:
        return _NO_IDS
    return frozenset(unknown).difference([entry.delivery.message_id for entry in begun])


_NO_IDS: Final[frozenset[str]] = frozenset()


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
        self.cursors: dict[str, Cursor] = {}
        self.recent = RecentIds()

    def stats(self) -> TopicStats:
        cursors = self.cursors
        return TopicStats(
            first=self.first,
            end=self.end,
            bytes=self.bytes,
            cursors={name: cursor.position for name, cursor in cursors.items()},
            cursors_acked={
                name: cursor.acked_count for name, cursor in cursors.items() if cursor.acked
            },
        )

    def offer(
        self, message_ids: Sequence[str], payloads: Sequence[bytes], fresh: bool = False
    ) -> Offer:
        """Give positions to the new messages of one append (see :meth:`QueueIndex.offer`)."""
        count = len(message_ids)
        if len(payloads) != count:
            raise ValueError(f"{count} message ids but {len(payloads)} payloads")
        first = self.next_position
        recent = self.recent
        if fresh or (recent.none_of(message_ids) and len(set(message_ids)) == count):
            seqs = range(first, first + count)
            offer = Offer(seqs, seqs, message_ids, payloads, False)
        else:
            offer = _offer_slow(None, recent, message_ids, payloads, first, None)
            seqs = offer.seqs
        self.next_position = seqs.stop
        recent.add_many(offer.new_ids, seqs)
        return offer

    def discard(self, offer: Offer) -> None:
        """The append of ``offer`` failed: forget its positions and ids."""
        if offer.seqs:
            self.next_position = offer.seqs.start
            for message_id in offer.new_ids:
                self.recent.discard(message_id)


class Index:
    """Every queue and topic of one store, plus the deadline heap for ``reclaim``."""

    __slots__ = ("_deadlines", "_tiebreak", "max_queue_messages", "queues", "topics")

    def __init__(self, max_queue_messages: int | None = None) -> None:
        self.max_queue_messages = max_queue_messages
        self.queues: dict[str, QueueIndex] = {}
        self.topics: dict[str, TopicIndex] = {}
        # (deadline, tiebreak, queue, message ids): when to look at those messages;
        # one item per claim. Ids, not entries, so a settled entry is not kept alive.
        self._deadlines: list[tuple[float, int, QueueIndex, list[str]]] = []
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

    def claim(self, claim: Claim, consumed: list[tuple[int, int]] | None = None) -> list[Delivery]:
        """Claim on the named queue; remembers deadlines for :meth:`reclaim`."""
        queue = self.queues.get(claim.queue)
        if queue is None:
            return []
        deliveries = queue.claim(claim, consumed)
        deadline = claim.deadline
        if deadline is not None and deliveries and not claim.auto_ack:
            ids = [d.message_id for d in deliveries]
            heapq.heappush(self._deadlines, (deadline, next(self._tiebreak), queue, ids))
        return deliveries

    def remember_deadlines(self, queue: QueueIndex, entries: Sequence[Entry]) -> None:
        """Track deadlines again (a failed settle put ``entries`` back in flight)."""
        for entry in entries:
            if entry.deadline is not None:
                item = (entry.deadline, next(self._tiebreak), queue, [entry.delivery.message_id])
                heapq.heappush(self._deadlines, item)

    def reclaim(self, now: float) -> list[Reclaimed]:
        heap = self._deadlines
        out: list[Reclaimed] = []
        while heap and heap[0][0] < now:
            _, _, queue, ids = heapq.heappop(heap)
            entries = queue.entries
            for message_id in ids:
                entry = entries.get(message_id)
                # Skip deliveries that ended (settled, released, redelivered since).
                if (
                    entry is None
                    or entry.state is not State.IN_FLIGHT
                    or entry.deadline is None
                    or entry.deadline >= now
                ):
                    continue
                queue.reclaim(entry)
                out.append(Reclaimed(queue.name, entry.delivery.consumer, message_id))
        return out

    def release(self, queue: str, consumer: str) -> int:
        found = self.queues.get(queue)
        return 0 if found is None else found.release(consumer)

    def abort_settle(self, queue: QueueIndex, entries: Iterable[Entry]) -> None:
        self.remember_deadlines(queue, queue.abort_settle(entries))

    def queue_stats(self) -> dict[str, QueueStats]:
        return {name: queue.stats() for name, queue in self.queues.items()}

    def topic_stats(self) -> dict[str, TopicStats]:
        return {name: topic.stats() for name, topic in self.topics.items()}
