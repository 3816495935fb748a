"""Request frames: what a client can ask of the broker.

Each request is a value, already validated: the codec builds one only from a
well-formed line, so code that receives a frame can trust its fields. Frames are
slotted dataclasses but not frozen: one is built per message on the broker's hot
path, and a frozen dataclass's ``__init__`` costs three times as much (it assigns
through ``object.__setattr__``). Nothing modifies a frame after the codec builds it. ``Request`` is
the union the broker dispatches on with ``match``. A line that cannot become a request
becomes a :class:`RequestError` instead, which carries the stable code and the text
of the error reply.

Replies (broker to client) are plain JSON objects whose ``type`` is one of
:class:`ReplyType`; :mod:`msg.protocol.codec` encodes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from msg.protocol.codes import ErrorCode

__all__ = [
    "DEFAULT_PREFETCH",
    "MAX_PREFETCH",
    "Ack",
    "AckMode",
    "Acks",
    "Batch",
    "JsonScalar",
    "Mode",
    "Nack",
    "Ping",
    "Publish",
    "Publishes",
    "ReplyType",
    "Request",
    "RequestError",
    "Status",
    "Subscribe",
    "Unsubscribe",
]

JsonScalar = str | int | float | bool | None
"""A request ``id``: any JSON scalar, echoed unchanged in the reply."""

# A consumer may hold this many unacknowledged messages unless it asks otherwise.
# RabbitMQ's guidance for prefetch is 100-300; enough to keep a consumer busy across a
# network round trip and an fsync, small enough to share a backlog fairly.
DEFAULT_PREFETCH: Final = 100
# AMQP's prefetch-count is an unsigned short; the same ceiling bounds the broker's
# per-consumer bookkeeping.
MAX_PREFETCH: Final = 65_535


class Mode(StrEnum):
    """How a topic name is used: fan-out to every subscriber, or one consumer each."""

    PUBSUB = "pubsub"
    QUEUE = "queue"


class AckMode(StrEnum):
    """When a delivered message counts as done."""

    AUTO = "auto"
    """As soon as it is sent."""
    MANUAL = "manual"
    """When the consumer acks it; unacked messages are delivered again."""


class ReplyType(StrEnum):
    """The ``type`` field of everything the broker sends."""

    ACK = "ack"
    ERROR = "error"
    MESSAGE = "message"
    PONG = "pong"
    STATUS = "status"


@dataclass(slots=True)
class Publish:
    """Publish one message to a topic (fan-out) or a queue (one consumer)."""

    topic: str
    payload: bytes
    """The ``message`` value, JSON-encoded: stored and delivered without re-encoding."""
    mode: Mode = Mode.PUBSUB
    id: JsonScalar = None
    reply: bool = True
    """False: nothing is sent once the message is stored; only an error is answered."""


@dataclass(slots=True)
class Subscribe:
    """Start receiving a topic's or a queue's messages on this connection."""

    topic: str
    mode: Mode = Mode.PUBSUB
    ack: AckMode = AckMode.AUTO
    prefetch: int = DEFAULT_PREFETCH
    durable: str | None = None
    """Pub/sub only: the name of a cursor that survives disconnects and restarts."""
    id: JsonScalar = None


@dataclass(slots=True)
class Unsubscribe:
    """Stop a subscription; with ``durable``, also delete that durable cursor."""

    topic: str
    mode: Mode = Mode.PUBSUB
    durable: str | None = None
    id: JsonScalar = None


@dataclass(slots=True)
class Ack:
    """A delivered message is done."""

    message_id: str
    id: JsonScalar = None


@dataclass(slots=True)
class Nack:
    """A delivered message failed: deliver it again, or dead-letter it."""

    message_id: str
    requeue: bool = True
    id: JsonScalar = None
    reason: str | None = None
    """Why (for a dead letter: kept with it and delivered with it from ``$dead.<queue>``)."""


@dataclass(slots=True)
class Ping:
    """Liveness check; the broker answers ``{"type": "pong"}``."""

    id: JsonScalar = None


@dataclass(slots=True)
class Status:
    """Ask for the broker's queues, topics, connections and rates."""

    id: JsonScalar = None


@dataclass(slots=True)
class RequestError:
    """A line that could not become a request, and the error reply it earns."""

    code: ErrorCode
    text: str
    id: JsonScalar = None
    message_id: str | None = None
    reply: bool = True
    """False when the line was a publish that asked for no reply: the error says so."""


Request = Publish | Subscribe | Unsubscribe | Ack | Nack | Ping | Status


@dataclass(slots=True)
class Publishes:
    """Consecutive publishes of one read, as parallel lists: one entry per publish.

    Publishes arrive in long runs, one per message, and are the broker's hottest path.
    :meth:`msg.protocol.codec.RequestReader.feed_batches` returns each run as one of
    these instead of a :class:`Publish` per message, so neither the codec nor the
    router builds an object per message. Iterating yields the equivalent frames.
    Every publish of a batch asked for a reply, or none did (``reply``).
    """

    topics: list[str]
    payloads: list[bytes]
    modes: list[Mode]
    ids: list[JsonScalar]
    reply: bool = True

    def __len__(self) -> int:
        return len(self.topics)

    def __iter__(self) -> Iterator[Publish]:
        for topic, payload, mode, rid in zip(
            self.topics, self.payloads, self.modes, self.ids, strict=True
        ):
            yield Publish(topic, payload, mode, rid, self.reply)


@dataclass(slots=True)
class Acks:
    """Consecutive acks of one read, as parallel lists (see :class:`Publishes`)."""

    message_ids: list[str]
    ids: list[JsonScalar]

    def __len__(self) -> int:
        return len(self.message_ids)

    def __iter__(self) -> Iterator[Ack]:
        for message_id, rid in zip(self.message_ids, self.ids, strict=True):
            yield Ack(message_id, rid)


Batch = Request | RequestError | Publishes | Acks
"""What :meth:`msg.protocol.codec.RequestReader.feed_batches` returns a list of."""
