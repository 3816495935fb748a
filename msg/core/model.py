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

Credit is how the core bounds what it hands out: a consumer may hold ``prefetch``
messages. In manual mode a message counts until it is acked or nacked; in auto mode it
counts until the connection's socket has taken it (see ``Router.drained``), so a
consumer that stops reading stops receiving instead of piling up frames in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from msg.core.outbound import Outbound, Slot
from msg.protocol.frames import AckMode, JsonScalar, Mode

__all__ = [
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
    """The position last written to the store: where a returning subscriber resumes."""
    unacked: dict[str, int] = field(default_factory=dict)
    """Manual mode: message id -> position, for delivered and unsettled messages."""
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
        """The lowest position not yet done: what the stored cursor should say."""
        if self.unacked:
            return min(self.unacked.values())
        return self.next_position


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
