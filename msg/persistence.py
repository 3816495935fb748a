"""The persistence layer: the storage seam and the backends behind it.

Theory of operation
-------------------
The broker core decides *who* gets a message; the store decides *which* messages
exist and what state each is in. The store is authoritative for delivery state: which
queue messages are ready, which are in flight and to which consumer, where each
durable topic cursor stands. The core only keeps what a connection needs (its
subscriptions, the ids it may ack, its credit).

That split is what lets several brokers share one store later (see
``shared/STORAGE.md``): a shared backend answers the same operations from shared
state, and the core does not change.

The seam is a set of operations on queues and topics, each taking a *batch* so that
the broker pays for one storage round trip (one group commit, one pipeline) per loop
iteration, never one per message. Batches are columnar where they run once per
message: an :class:`Append` carries all the messages of one iteration bound for one
queue or topic as parallel lists, a :class:`Settle` all the acks of one consumer, so
the broker builds no object per message to cross the seam:

===================  ===========================================================
``append``           store new messages (queues and topics); the result is final
                     only when the message is durable under the fsync policy
``claim``            take up to one ready message per consumer slot, in order
``settle``           ack, requeue or dead-letter messages a consumer held
``release``          a consumer went away: its messages become ready again
``reclaim``          deliveries whose ack deadline passed become ready again
``read``             read a topic's log from a position (replay, catch-up)
``open_cursor``      find or create a durable subscription's cursor
``commit_cursors``   record where durable cursors stand (floor and acks above it)
``delete_cursor``    forget a durable subscription
``stats``            counts for monitoring
``maintain``         periodic work: retention, compaction, timed fsync
===================  ===========================================================

Rules every backend keeps (the contract suite in ``tests/storage`` checks them):

- Operations take effect in the order they are called, even when their results
  arrive later. A message becomes claimable only once its append has completed.
- msg makes message ids; a backend stores them and never invents its own.
- ``append`` and ``settle`` fail per item, with a :class:`StoreFailure`; a failed
  item changed nothing. Within one :class:`Append`, the messages stored are always a
  prefix: ``positions`` has one entry per message stored, and the rest failed. A
  :class:`Settle` succeeds or fails as a whole, except for message ids that were not
  in flight to that consumer, which it lists and leaves alone. A store that has had
  an I/O error it cannot vouch for turns read-only: :meth:`Store.writable` then
  reports it, and appends fail.
- Messages claimed with ``auto_ack`` are gone once claimed. Otherwise a message
  stays in flight until settled, released or reclaimed, and ``attempt`` counts its
  deliveries.
- A durable cursor is a :class:`Cursor`: a *floor* (every position below it is done)
  and the positions above the floor that are done too (acked out of order), as
  ranges. ``commit_cursors`` replaces the whole state of each cursor it names, and
  ``open_cursor`` returns the last state committed, so a subscriber that returns
  (reconnect, restart) is handed exactly the positions not done.
- Queue message lifecycle (also in ``docs/persistence.md``)::

      READY --claim--> IN_FLIGHT --settle(ack)------> gone
        ^                  |------settle(requeue)---> READY  (attempt + 1 on next claim)
        |                  |------settle(dead)------> $dead.<queue> (READY there)
        +--release/reclaim-+

The backends: :class:`msg.storage.memory.MemoryStore` (nothing survives a restart;
tests and throwaway brokers) and :class:`msg.storage.filestore.FileStore` (the
default: append-only JSON-lines logs under the data directory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

__all__ = [
    "Append",
    "Appended",
    "Capabilities",
    "Claim",
    "Cursor",
    "CursorCommit",
    "Delivery",
    "FsyncPolicy",
    "Kind",
    "Outcome",
    "QueueStats",
    "Ranges",
    "Reclaimed",
    "Recovery",
    "Retention",
    "Settle",
    "Settled",
    "Store",
    "StoreFailure",
    "StoreStats",
    "TopicMessage",
    "TopicRead",
    "TopicStats",
]


class Kind(StrEnum):
    """Topics (fan-out, a retained log) and queues (each message to one consumer)."""

    QUEUE = "queue"
    TOPIC = "topic"


class FsyncPolicy(StrEnum):
    """When the file store forces written records to the disk."""

    ALWAYS = "always"
    """Before any result is returned; writes arriving together share one fsync."""
    EVERYSEC = "everysec"
    """Once a second: a power loss can lose the last second of acked writes."""
    NEVER = "never"
    """When the operating system decides (and on clean shutdown)."""


class StoreFailure(StrEnum):
    """Why an item of a batch was not done. Values are protocol error codes."""

    STORAGE_FULL = "storage_full"
    STORAGE_ERROR = "storage_error"
    QUEUE_FULL = "queue_full"


class Outcome(StrEnum):
    """What settling an in-flight queue message does with it."""

    ACK = "ack"
    REQUEUE = "requeue"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do, so the broker can refuse or emulate features honestly."""

    durable: bool
    """Messages survive a broker restart."""
    shared: bool = False
    """Several brokers may use the same store at once."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of each topic's log is kept; the oldest messages go first.

    A limit of None means no limit of that kind.
    """

    max_messages: int | None = 1_000_000
    max_bytes: int | None = 1024**3
    max_age: float | None = 7 * 24 * 3600.0
    """Seconds; Kafka's default retention of seven days."""


@dataclass(frozen=True, slots=True)
class Append:
    """Store messages at the end of queue or topic ``name``, in order.

    ``message_ids`` and ``payloads`` are parallel: message ``i`` has id
    ``message_ids[i]`` and JSON-encoded value ``payloads[i]``. All were published in
    the same loop iteration, at ``published_at``. A message whose id the queue or topic
    already holds is not stored again (an append resent after a lost connection
    creates no duplicates); its existing position is reported.
    """

    kind: Kind
    name: str
    message_ids: Sequence[str]
    payloads: Sequence[bytes]
    published_at: float
    fresh: bool = False
    """The caller made every id just now, for this first attempt (the broker's own
    ids for new publishes): none can be held already or repeat within the append, so
    the store may skip looking them up. It still remembers them, so a later resend of
    the same append (``fresh`` False) is recognised. Never set it on a resend."""


@dataclass(frozen=True, slots=True)
class Appended:
    """Result of one :class:`Append`: where its messages are, or why not.

    ``positions[i]`` is message ``i``'s position (queues: its sequence number; topics:
    its log position). Messages from ``len(positions)`` on were not stored, because of
    ``failure``. When every message was new, ``positions`` is a ``range`` (no list is
    built per message); compare it element-wise, never with ``==`` against a list.
    """

    positions: Sequence[int] = ()
    failure: StoreFailure | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Claim:
    """Take ready messages of ``queue``: at most one for each entry of ``consumers``.

    Messages are handed out in queue order, filling the slots in the order given, so
    the caller decides the distribution (round-robin is one slot per consumer per
    round). A message that was last delivered to a consumer goes to a different
    consumer of this claim where one is available.
    """

    queue: str
    consumers: tuple[str, ...]
    auto_ack: bool = False
    """Consumed when claimed: no settle will follow, the message is gone."""
    deadline: float | None = None
    """When unsettled deliveries of this claim may be reclaimed (see ``reclaim``)."""


# Not frozen: one is built per message delivered, on the broker's hot path, and a
# frozen dataclass's __init__ costs three times as much. The store may keep a reference
# to each Delivery it hands out (a redelivery gets a new one): never mutate one.
@dataclass(slots=True)
class Delivery:
    """One message handed to one consumer. Read-only by contract."""

    queue: str
    consumer: str
    message_id: str
    payload: bytes
    published_at: float
    attempt: int
    """1 on the first delivery, then counting redeliveries."""
    reason: str | None = None
    """Messages of a ``$dead.`` queue: why the consumer rejected it (``Settle.reason``)."""


@dataclass(frozen=True, slots=True)
class Settle:
    """Finish in-flight messages of ``queue`` that ``consumer`` holds, all the same way.

    An id given twice is settled once (not reported as unknown). "None of the group was
    settled" on failure is about results: a crash may tear the group's write, and the
    torn messages come back after the restart (at least once, never lost).
    """

    queue: str
    consumer: str
    message_ids: Sequence[str]
    outcome: Outcome
    reason: str | None = None
    """For dead letters: why the consumer rejected them, kept with the messages."""


@dataclass(frozen=True, slots=True)
class Settled:
    """Result of one :class:`Settle`."""

    unknown: frozenset[str] = frozenset()
    """Ids that were not in flight to that consumer: nothing changed for them."""
    failure: StoreFailure | None = None
    """If set, none of the messages was settled."""


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """A delivery whose deadline passed; the message is ready again."""

    queue: str
    consumer: str
    message_id: str


@dataclass(frozen=True, slots=True)
class TopicMessage:
    """A message in a topic's log."""

    position: int
    message_id: str
    payload: bytes
    published_at: float


@dataclass(frozen=True, slots=True)
class TopicRead:
    """Result of :meth:`Store.read`."""

    messages: tuple[TopicMessage, ...]
    first: int
    """The oldest position still retained (== end when the log is empty)."""
    end: int
    """The position the next append will get."""


Ranges = tuple[tuple[int, int], ...]
"""Sets of log positions as ``(first, last)`` pairs, both inclusive: sorted, disjoint
and not touching (``last + 1 < next first``), so each set has one spelling."""


def _ranges_problem(position: int, acked: Ranges) -> str | None:
    """What is wrong with ``acked`` as the acked positions above floor ``position``
    (None: nothing). Each range must be of positions past the floor, ``first <= last``,
    in order, and apart from the next by at least one position that is not acked."""
    after = position  # the floor itself is not done, so the first range starts past it
    for first, last in acked:
        if first <= after:
            if after == position:
                return f"range [{first}, {last}] does not start past the floor {position}"
            return f"range [{first}, {last}] is out of order or touches the one before"
        if last < first:
            return f"range [{first}, {last}] ends before it starts"
        after = last + 1
    return None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a durable cursor stands.

    ``position`` is the floor: the lowest position not done (acked, dropped, or
    trimmed by retention), where a returning subscriber resumes. ``acked`` are the
    positions above it that are done too, because the subscriber acked them before
    an earlier one; a returning subscriber skips them. Each unacked position between
    the floor and the last acked one splits a range, so the ranges number at most one
    more than the messages the subscriber held unacked (its prefetch bounds them).
    """

    position: int
    acked: Ranges = ()

    def __post_init__(self) -> None:
        if self.acked and (problem := _ranges_problem(self.position, self.acked)) is not None:
            raise ValueError(problem)

    @property
    def acked_count(self) -> int:
        """How many positions above the floor are done."""
        return sum(last - first + 1 for first, last in self.acked)


@dataclass(frozen=True, slots=True)
class CursorCommit:
    """Durable cursor ``name`` on ``topic`` now stands at ``position`` (the floor, next
    to deliver) with the positions ``acked`` above it done too (see :class:`Cursor`).

    A commit replaces the cursor's whole state, so one record of it is enough to
    restore the cursor: the store need not remember earlier commits.
    """

    topic: str
    name: str
    position: int
    acked: Ranges = ()

    def __post_init__(self) -> None:
        if self.acked and (problem := _ranges_problem(self.position, self.acked)) is not None:
            raise ValueError(problem)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts for one queue."""

    ready: int
    in_flight: int
    bytes: int
    """Payload bytes held for messages not yet done."""


@dataclass(frozen=True, slots=True)
class TopicStats:
    """Counts for one topic's log."""

    first: int
    end: int
    bytes: int
    cursors: Mapping[str, int] = field(default_factory=dict)
    """Each durable cursor's floor (:attr:`Cursor.position`)."""
    cursors_acked: Mapping[str, int] = field(default_factory=dict)
    """For cursors with positions acked above their floor: how many."""

    @property
    def retained(self) -> int:
        """Messages currently kept in the log."""
        return self.end - self.first


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Everything :meth:`Store.stats` reports."""

    queues: Mapping[str, QueueStats]
    topics: Mapping[str, TopicStats]
    read_only: StoreFailure | None = None


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :meth:`Store.open` found."""

    queues: Mapping[str, int]
    """Ready messages per queue."""
    topics: Mapping[str, int]
    """End position per topic."""
    torn_records: int = 0
    corrupt_records: int = 0


class Store(Protocol):
    """Queue and topic storage. See the module docstring for the contract.

    Every method is called from the event loop thread. Batched methods return one
    result per item, in order.
    """

    @property
    def capabilities(self) -> Capabilities:
        """What this backend can do."""
        ...

    async def open(self) -> Recovery:
        """Load or connect; called once before anything else."""
        ...

    async def close(self) -> None:
        """Make everything written durable and release resources."""
        ...

    def writable(self) -> StoreFailure | None:
        """None if appends can succeed now; else why they will fail. Cheap, synchronous."""
        ...

    async def append(self, items: Sequence[Append]) -> list[Appended]:
        """Store new messages; each result is final (durable under the policy)."""
        ...

    async def claim(self, claims: Sequence[Claim]) -> list[list[Delivery]]:
        """Take ready messages for consumers; one list of deliveries per claim."""
        ...

    async def settle(self, items: Sequence[Settle]) -> list[Settled]:
        """Ack, requeue or dead-letter in-flight messages."""
        ...

    async def release(self, queue: str, consumer: str) -> int:
        """Make every message ``consumer`` holds on ``queue`` ready again; return how many."""
        ...

    async def reclaim(self, now: float) -> list[Reclaimed]:
        """Make deliveries whose deadline is before ``now`` ready again."""
        ...

    async def read(self, topic: str, position: int, limit: int) -> TopicRead:
        """Up to ``limit`` messages of ``topic`` from ``position`` on (or the oldest kept)."""
        ...

    async def open_cursor(self, topic: str, name: str) -> Cursor:
        """Durable cursor ``name`` as last committed; a new cursor starts at the end."""
        ...

    async def commit_cursors(self, items: Sequence[CursorCommit]) -> list[StoreFailure | None]:
        """Replace durable cursors' states; each result is final (durable under the
        policy). A failed item leaves its cursor as it was."""
        ...

    async def delete_cursor(self, topic: str, name: str) -> bool:
        """Forget a durable cursor; False if there was none."""
        ...

    async def stats(self) -> StoreStats:
        """Counts for every queue and topic."""
        ...

    async def maintain(self, now: float) -> None:
        """Periodic work, about once a second: retention, compaction, timed fsync."""
        ...
