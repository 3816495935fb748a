"""The core's state: sessions, subscriptions, and what it knows of topics and queues.

These are plain mutable records owned by :class:`msg.core.router.Router`; nothing here
does any work beyond small derived values. The store owns the messages themselves;
the core keeps only what routing needs:

- a :class:`Session` per connection: its outbound frames, its subscriptions, and the
  message ids it may ack (``outstanding``);
- a :class:`QueueState` per queue: its consumers in round-robin order, and whether the
  store may have ready messages for them;
- a :class:`TopicState` per topic: live subscribers, durable subscriptions, and the
  log's end position.

A durable subscription remembers which positions are done (acked, dropped, or trimmed
by retention) as a floor (every position below it is done) plus the positions above
it that were acked out of order (:class:`AckedPositions`, kept as ranges). Both go to
the store with every cursor commit, so a subscriber that returns after a disconnect
or a restart gets exactly the messages it had not acked.

Credit is how the core bounds what it hands out: a consumer may hold ``prefetch``
messages. In manual mode a message counts until it is acked or nacked; in auto mode it
counts until the connection's socket has taken it (see ``Router.drained``), so a
consumer that stops reading stops receiving instead of piling up frames in memory.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from msg.core.outbound import Outbound, Slot
from msg.persistence import Ranges
from msg.protocol.frames import AckMode, JsonScalar, Mode

__all__ = [
    "AckedPositions",
    "DurableSub",
    "PlainSub",
    "QueueConsumer",
    "QueueState",
    "Session",
    "Subscription",
    "TopicState",
]


@dataclass(eq=False, slots=True)
class Session:
    """One client connection as the core sees it."""

    id: int
    peer: str
    out: Outbound = field(default_factory=Outbound)
    subs: dict[tuple[Mode, str], Subscription] = field(default_factory=dict)
    outstanding: dict[str, QueueConsumer | DurableSub] = field(default_factory=dict)
    """Manually acked messages delivered on this connection and not yet settled."""
    closed: bool = False

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.peer}>"


@dataclass(eq=False, slots=True)
class PlainSub:
    """A pub/sub subscriber: gets every message published while it is subscribed."""

    session: Session
    topic: TopicState


@dataclass(eq=False, slots=True)
class QueueConsumer:
    """A consumer of a queue."""

    session: Session
    queue: QueueState
    consumer_id: str
    """Unique per subscription, so a late claim result never reaches a newer one."""
    ack: AckMode
    prefetch: int
    prefix: bytes
    """Pre-encoded start of this consumer's delivery frames."""
    in_flight: int = 0
    """Manual: delivered, not settled. Auto: delivered, not yet taken by the socket."""
    reserved: int = 0
    """Slots asked of the store in claims that have not returned yet."""
    active: bool = True

    @property
    def credit(self) -> int:
        """How many more messages this consumer may be handed now."""
        return self.prefetch - self.in_flight - self.reserved


class AckedPositions:
    """A set of log positions kept as sorted, disjoint, non-touching ranges.

    A durable subscriber that holds one message while acking the next million costs
    one range here, not a million entries: the ranges number at most one more than
    the gaps between them, and every gap is a message delivered and not yet settled
    (bounded by the prefetch) or, after a reopen, one still to be delivered again.
    Adding a position is a bisection plus, when it joins no neighbour, a list insert.
    """

    __slots__ = ("_firsts", "_lasts")

    def __init__(self, ranges: Ranges = ()) -> None:
        self._firsts = [first for first, _ in ranges]
        self._lasts = [last for _, last in ranges]

    def __bool__(self) -> bool:
        return bool(self._firsts)

    def __contains__(self, position: int) -> bool:
        i = bisect_right(self._firsts, position)
        return i > 0 and self._lasts[i - 1] >= position

    def add(self, position: int) -> None:
        """Put ``position`` in the set, joining the ranges it touches."""
        firsts, lasts = self._firsts, self._lasts
        if lasts and lasts[-1] == position - 1:
            # Acks in order extend the last range (it is pruned at the next commit):
            # the common case, without a bisection.
            lasts[-1] = position
            return
        i = bisect_right(firsts, position)  # ranges before i start at or before it
        if i and lasts[i - 1] >= position:
            return
        joins_left = i > 0 and lasts[i - 1] == position - 1
        joins_right = i < len(firsts) and firsts[i] == position + 1
        if joins_left and joins_right:
            lasts[i - 1] = lasts[i]
            del firsts[i], lasts[i]
        elif joins_left:
            lasts[i - 1] = position
        elif joins_right:
            firsts[i] = position
        else:
            firsts.insert(i, position)
            lasts.insert(i, position)

    def add_range(self, first: int, last: int) -> None:
        """Put ``first`` to ``last`` (both included) in the set."""
        if last < first:
            return
        firsts, lasts = self._firsts, self._lasts
        i = bisect_left(lasts, first - 1)  # the first range that ends at or after first - 1
        j = bisect_right(firsts, last + 1)  # ranges before j start at or before last + 1
        if i < j:
            first = min(first, firsts[i])
            last = max(last, lasts[j - 1])
        firsts[i:j] = [first]
        lasts[i:j] = [last]

    def skip(self, position: int) -> int:
        """The first position at or after ``position`` that is not in the set."""
        i = bisect_right(self._firsts, position)
        if i and self._lasts[i - 1] >= position:
            return self._lasts[i - 1] + 1
        return position

    def drop_below(self, floor: int) -> None:
        """Forget every position below ``floor``."""
        firsts, lasts = self._firsts, self._lasts
        i = bisect_left(lasts, floor)  # ranges before i end below the floor
        if i:
            del firsts[:i], lasts[:i]
        if firsts and firsts[0] < floor:
            firsts[0] = floor

    def ranges(self) -> Ranges:
        """The set as (first, last) pairs, both inclusive, in order."""
        return tuple(zip(self._firsts, self._lasts, strict=True))


@dataclass(eq=False, slots=True)
class DurableSub:
    """A pub/sub subscriber with a named cursor that outlives its connection."""

    session: Session
    topic: TopicState
    name: str
    ack: AckMode
    prefetch: int
    prefix: bytes
    next_position: int = 0
    """The next log position to deliver."""
    committed: int = 0
    """The floor last written to the store: where a returning subscriber resumes."""
    committed_acked: Ranges = ()
    """The acked ranges last written to the store with ``committed``."""
    unacked: dict[str, int] = field(default_factory=dict)
    """Manual mode: message id -> position, for delivered and unsettled messages."""
    acked: AckedPositions = field(default_factory=AckedPositions)
    """Positions done above the floor: settled out of order, or (from the cursor as
    opened) in an earlier session. ``next_position`` is never one of them."""
    attempts: dict[int, int] = field(default_factory=dict)
    """Positions that were delivered more than once, and how often."""
    redeliver: list[int] = field(default_factory=list)
    """Nacked positions waiting to be delivered again."""
    unflushed: int = 0
    """Auto mode: delivered, not yet taken by the socket."""
    attached: bool = False
    """The store has confirmed the cursor; deliveries may flow."""
    reading: bool = False
    """A catch-up read is in progress."""
    ack_waiters: list[tuple[Slot, JsonScalar, str]] = field(default_factory=list)
    """Ack replies that wait for the next cursor commit to be durable."""
    active: bool = True

    @property
    def credit(self) -> int:
        """How many more messages this subscriber may be handed now."""
        if self.ack is AckMode.MANUAL:
            return self.prefetch - len(self.unacked)
        return self.prefetch - self.unflushed

    @property
    def floor(self) -> int:
        """The lowest position not yet done: what the stored cursor should say.

        Every position below ``next_position`` was delivered, and is done unless it is
        still unacked; ``next_position`` itself is not done (it skips acked ones)."""
        if self.unacked:
            return min(self.unacked.values())
        return self.next_position

    def advance(self, position: int) -> None:
        """Make ``position`` the next to deliver, or the first after it not yet done."""
        acked = self.acked
        self.next_position = acked.skip(position) if acked else position


Subscription = PlainSub | QueueConsumer | DurableSub


@dataclass(eq=False, slots=True)
class QueueState:
    """What the core knows of one queue."""

    name: str
    consumers: list[QueueConsumer] = field(default_factory=list)
    by_id: dict[str, QueueConsumer] = field(default_factory=dict)
    next_consumer: int = 0
    """Round-robin position in ``consumers``."""
    maybe_ready: bool = True
    """The store may hold ready messages; cleared when a claim comes back short."""
    ready_generation: int = 0
    """Bumped whenever messages may have become ready, so a claim that started
    before can tell that its short answer is out of date."""
    published: int = 0
    delivered: int = 0
    acked: int = 0
    dead_lettered: int = 0
    """Messages moved to the dead-letter queue: nacked without requeue, or delivered
    ``max_deliveries`` times."""

    def add(self, consumer: QueueConsumer) -> None:
        self.consumers.append(consumer)
        self.by_id[consumer.consumer_id] = consumer

    def remove(self, consumer: QueueConsumer) -> None:
        self.consumers.remove(consumer)
        del self.by_id[consumer.consumer_id]
        if self.next_consumer >= len(self.consumers):
            self.next_consumer = 0

    def mark_ready(self) -> None:
        self.maybe_ready = True
        self.ready_generation += 1


@dataclass(eq=False, slots=True)
class TopicState:
    """What the core knows of one topic."""

    name: str
    prefix: bytes
    """Pre-encoded start of plain subscribers' delivery frames."""
    subscribers: dict[int, Session] = field(default_factory=dict)
    """Plain subscribers by session id, in subscription order."""
    durables: dict[str, DurableSub] = field(default_factory=dict)
    """Attached durable subscriptions by name."""
    end: int = 0
    """The position the next stored message will get, as far as the core knows."""
    published: int = 0
    delivered: int = 0
