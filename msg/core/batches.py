"""Work the router hands the store once per loop iteration, and the replies that wait.

Theory of operation
-------------------
Publishes and acks arrive once per message, so the router never builds an object per
message to hand the store. It collects one loop iteration's publishes into an
:class:`AppendBatch` — one :class:`AppendGroup` per destination, holding parallel
lists of ids and payloads, which become one :class:`~msg.persistence.Append` each —
and its acks into a :class:`SettleBatch` of :class:`SettleGroup` (one per consumer and
outcome).

Their replies wait in :class:`ReplyRun`: consecutive batched requests of one session
share one outbound slot. A run records its requests as *segments* — consecutive
requests that went to the same group, as (group, first index, count) — plus each
request's id; when the batch's store call returns, each group knows how it fared, and
the run fills its slot with all its replies at once, in request order. The common
case (one destination, no request ids, everything stored) is a single string join.

A run of publishes that asked for no reply (``"reply": false``) still reserves its
slot, so that a later request's reply cannot overtake one of its errors; its slot is
filled with the errors alone, usually nothing.
"""

from __future__ import annotations

from typing import Final

from msg.core.model import Session
from msg.core.outbound import Slot
from msg.persistence import Append, Appended, Kind, Outcome, Settle, Settled, StoreFailure
from msg.protocol.codec import encode_ack, encode_error
from msg.protocol.codes import ErrorCode
from msg.protocol.frames import JsonScalar

__all__ = [
    "STORE_TEXT",
    "AppendBatch",
    "AppendGroup",
    "ReplyRun",
    "SettleBatch",
    "SettleGroup",
    "fail_all",
]

STORE_TEXT: Final = {
    StoreFailure.STORAGE_FULL: "not stored: the broker's disk is full",
    StoreFailure.STORAGE_ERROR: "not stored: the broker's storage failed; it accepts no "
    "publishes until restarted",
    StoreFailure.QUEUE_FULL: "not stored: the queue holds its maximum number of messages",
}


class AppendGroup:
    """The messages of one batch bound for one queue or topic."""

    __slots__ = ("failure", "kind", "message_ids", "name", "payloads", "positions", "text")

    def __init__(self, kind: Kind, name: str) -> None:
        self.kind = kind
        self.name = name
        self.message_ids: list[str] = []
        self.payloads: list[bytes] = []
        self.positions: tuple[int, ...] | range | list[int] = ()
        """Set from the store's answer: one position per message stored."""
        self.failure: StoreFailure | None = None
        self.text = ""

    def settle(self, result: Appended) -> None:
        """Take the store's answer."""
        self.positions = result.positions  # type: ignore[assignment]
        self.failure = result.failure
        if result.failure is not None:
            detail = f" ({result.detail})" if result.detail else ""
            self.text = STORE_TEXT[result.failure] + detail

    def fail(self, failure: StoreFailure, text: str) -> None:
        """The store call itself failed: nothing of this group was stored."""
        self.positions = ()
        self.failure = failure
        self.text = text

    def reply(self, index: int, rid: JsonScalar) -> bytes:
        if index < len(self.positions):
            return encode_ack(rid, self.message_ids[index])
        assert self.failure is not None
        return encode_error(ErrorCode(self.failure.value), self.text, rid)

    def refusal(self, index: int, rid: JsonScalar) -> bytes:
        """What a publish that asked for no reply is answered: nothing once stored."""
        if index < len(self.positions):
            return b""
        assert self.failure is not None
        return encode_error(ErrorCode(self.failure.value), self.text, rid, reply=False)

    def all_done(self, first: int, count: int) -> bool:
        """Whether messages ``first`` to ``first + count`` all succeeded."""
        return first + count <= len(self.positions)


class AppendBatch:
    """Every publish of one loop iteration, grouped by destination."""

    __slots__ = ("groups", "published_at", "queues", "runs", "topics")

    def __init__(self, published_at: float) -> None:
        self.published_at = published_at
        self.groups: list[AppendGroup] = []
        self.topics: dict[str, AppendGroup] = {}
        self.queues: dict[str, AppendGroup] = {}
        self.runs: list[ReplyRun] = []

    def group(self, kind: Kind, name: str) -> AppendGroup:
        """The group for ``name`` (created on first use)."""
        groups = self.topics if kind is Kind.TOPIC else self.queues
        group = groups.get(name)
        if group is None:
            group = groups[name] = AppendGroup(kind, name)
            self.groups.append(group)
        return group

    def items(self) -> list[Append]:
        """What the store is asked to do."""
        at = self.published_at
        # The router made the ids of these publishes itself, just now.
        return [
            Append(g.kind, g.name, g.message_ids, g.payloads, at, fresh=True) for g in self.groups
        ]


class SettleGroup:
    """The acks (or nacks) of one batch for one consumer of one queue, one outcome."""

    __slots__ = (
        "consumer",
        "failure",
        "message_ids",
        "outcome",
        "queue",
        "reason",
        "text",
        "unknown",
    )

    def __init__(
        self, queue: str, consumer: str, outcome: Outcome, reason: str | None = None
    ) -> None:
        self.queue = queue
        self.consumer = consumer
        self.outcome = outcome
        self.reason = reason
        self.message_ids: list[str] = []
        self.unknown: frozenset[str] = frozenset()
        self.failure: StoreFailure | None = None
        self.text = ""

    def settle(self, result: Settled) -> None:
        """Take the store's answer."""
        self.unknown = result.unknown
        self.failure = result.failure
        if result.failure is not None:
            self.text = f"the {self.outcome.value} was not recorded: {STORE_TEXT[result.failure]}"

    def fail(self, failure: StoreFailure, text: str) -> None:
        """The store call itself failed: nothing of this group was settled."""
        self.failure = failure
        self.text = text

    @property
    def succeeded(self) -> bool:
        """Whether at least one message of the group was settled."""
        return self.failure is None and len(self.unknown) < len(self.message_ids)

    def all_done(self, first: int, count: int) -> bool:
        """Whether messages ``first`` to ``first + count`` all succeeded."""
        return self.failure is None and not self.unknown

    def reply(self, index: int, rid: JsonScalar) -> bytes:
        message_id = self.message_ids[index]
        if self.failure is not None:
            return encode_error(ErrorCode(self.failure.value), self.text, rid, message_id)
        if message_id in self.unknown:
            return encode_error(
                ErrorCode.UNKNOWN_MESSAGE,
                f"message {message_id!r} was no longer held by this consumer",
                rid,
                message_id,
            )
        return encode_ack(rid, message_id)


class SettleBatch:
    """Every ack and nack of one loop iteration, grouped by consumer and outcome."""

    __slots__ = ("groups", "keyed", "runs")

    def __init__(self) -> None:
        self.groups: list[SettleGroup] = []
        self.keyed: dict[tuple[str, str, Outcome, str | None], SettleGroup] = {}
        self.runs: list[ReplyRun] = []

    def group(
        self, queue: str, consumer: str, outcome: Outcome, reason: str | None = None
    ) -> SettleGroup:
        """The group for that consumer, outcome and reason (created on first use)."""
        key = (queue, consumer, outcome, reason)
        group = self.keyed.get(key)
        if group is None:
            group = self.keyed[key] = SettleGroup(queue, consumer, outcome, reason)
            self.groups.append(group)
        return group

    def items(self) -> list[Settle]:
        """What the store is asked to do."""
        return [
            Settle(g.queue, g.consumer, g.message_ids, g.outcome, g.reason) for g in self.groups
        ]


class ReplyRun:
    """Consecutive batched requests of one session, answered together in one slot."""

    # A run deliberately does not point back at its batch: the batch holds its runs, and
    # a cycle would keep each batch (and every payload in it) alive until the cyclic
    # garbage collector happened to run.
    __slots__ = ("has_ids", "reply", "rids", "segments", "session", "slot")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.slot: Slot = session.out.reserve()
        self.segments: list[tuple[AppendGroup | SettleGroup, int, int]] = []
        """(group, index of the first request in the group, how many), in order."""
        self.rids: list[JsonScalar] = []
        """Each request's id, in order."""
        self.has_ids = False
        """Whether any request of the run has an id to echo."""
        self.reply = True
        """False: publishes that asked for no reply, answered only if refused."""

    def add(self, group: AppendGroup | SettleGroup, index: int, rid: JsonScalar) -> None:
        """Request number ``index`` of ``group`` is answered in this run, next."""
        self.rids.append(rid)
        if rid is not None:
            self.has_ids = True
        segments = self.segments
        if segments:
            last, first, count = segments[-1]
            if last is group and first + count == index:
                segments[-1] = (group, first, count + 1)
                return
        segments.append((group, index, 1))

    def add_segment(self, group: AppendGroup | SettleGroup, first: int, count: int) -> None:
        """Requests ``first`` to ``first + count`` of ``group``, all without an id."""
        self.rids.extend([None] * count)
        segments = self.segments
        if segments:
            last, start, length = segments[-1]
            if last is group and start + length == first:
                segments[-1] = (group, start, length + count)
                return
        segments.append((group, first, count))

    def replies(self) -> bytes:
        """Every reply of the run, in request order (once the groups are settled)."""
        if not self.reply:
            return self._refusals()
        rids = self.rids
        plain = not self.has_ids
        out: list[bytes] = []
        position = 0
        for group, first, count in self.segments:
            if plain and group.all_done(first, count):
                # Plain acks without ids: one join for the whole segment.
                out.append(
                    (
                        _ACK_HEAD
                        + _ACK_JOIN.join(group.message_ids[first : first + count])
                        + _ACK_TAIL
                    ).encode()
                )
            else:
                reply = group.reply
                out.extend(
                    [reply(first + offset, rids[position + offset]) for offset in range(count)]
                )
            position += count
        return b"".join(out)

    def _refusals(self) -> bytes:
        """The replies of a run of publishes that asked for none: their errors only."""
        rids = self.rids
        out: list[bytes] = []
        position = 0
        for group, first, count in self.segments:
            if not group.all_done(first, count):
                assert type(group) is AppendGroup  # only publishes run without replies
                refusal = group.refusal
                out.extend(
                    [refusal(first + offset, rids[position + offset]) for offset in range(count)]
                )
            position += count
        return b"".join(out)


# encode_ack's frame for a request without an id, as the pieces of a join.
_ACK_HEAD: Final = '{"type":"ack","message_id":"'
_ACK_TAIL: Final = '"}\n'
_ACK_JOIN: Final = _ACK_TAIL + _ACK_HEAD


def fail_all(
    groups: list[AppendGroup] | list[SettleGroup], failure: StoreFailure, text: str
) -> None:
    """Mark every group failed because the store call raised."""
    for group in groups:
        group.fail(failure, text)
