"""A store that keeps everything in memory: for tests and throwaway brokers.

Theory of operation
-------------------
All delivery state lives in the shared :class:`~msg.storage.index.Index`, exactly as
in the file store, so both behave the same; what the file store adds (a log, group
commit, recovery) is simply absent. Every operation completes before its coroutine
first yields, so operations take effect in call order and an appended message can be
claimed as soon as ``append`` returns.

Topic messages are kept as (position, id, payload, published_at) tuples in a list
per topic with a moving head: an append extends the list in one C-level pass (no
object per message beyond the tuple), reading from a position is one index
computation, and trimming the oldest (retention, applied exactly per message in
:meth:`MemoryStore.maintain`) is amortised O(1).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import Final

from msg.persistence import (
    Append,
    Appended,
    Capabilities,
    Claim,
    Cursor,
    CursorCommit,
    Delivery,
    Kind,
    Outcome,
    Reclaimed,
    Recovery,
    Retention,
    Settle,
    Settled,
    StoreFailure,
    StoreStats,
    TopicMessage,
    TopicRead,
)
from msg.storage.index import (
    DEAD_LETTER_PREFIX,
    Index,
    QueueFull,
    TopicIndex,
    check_columns,
    unknown_ids,
)

__all__ = ["MemoryStore"]

# Drop trimmed topic messages from the list once they are this many and at least half
# of it: trimming stays O(1) amortised without slicing on every message.
_COMPACT_AT: Final = 1024


# Retention is frozen, so one shared default is safe.
_DEFAULT_RETENTION: Final = Retention()


_Stored = tuple[int, str, bytes, float]
"""(position, message id, payload, published_at) of a topic message."""


class _MemoryTopic:
    __slots__ = ("head", "index", "messages")

    def __init__(self, index: TopicIndex) -> None:
        self.index = index
        self.messages: list[_Stored] = []
        self.head = 0
        """messages[head] is at position index.first."""

    def drop_oldest(self) -> None:
        message = self.messages[self.head]
        self.head += 1
        self.index.first += 1
        self.index.bytes -= len(message[2])
        if self.head >= _COMPACT_AT and self.head * 2 >= len(self.messages):
            del self.messages[: self.head]
            self.head = 0


class MemoryStore:
    """Every :class:`~msg.persistence.Store` operation, in memory; nothing survives a restart."""

    def __init__(
        self, retention: Retention = _DEFAULT_RETENTION, max_queue_messages: int | None = None
    ) -> None:
        self._retention = retention
        self._index = Index(max_queue_messages)
        self._topics: dict[str, _MemoryTopic] = {}

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(durable=False)

    async def open(self) -> Recovery:
        return Recovery(queues={}, topics={})

    async def close(self) -> None:
        return None

    def writable(self) -> StoreFailure | None:
        return None

    def _topic(self, name: str) -> _MemoryTopic:
        found = self._topics.get(name)
        if found is None:
            found = self._topics[name] = _MemoryTopic(self._index.topic(name))
        return found

    async def append(self, items: Sequence[Append]) -> list[Appended]:
        check_columns(items)
        return [
            self._append_queue(item) if item.kind is Kind.QUEUE else self._append_topic(item)
            for item in items
        ]

    def _append_queue(self, item: Append) -> Appended:
        queue = self._index.queue(item.name)
        offer, run = queue.offer(
            item.message_ids, item.payloads, item.published_at, fresh=item.fresh
        )
        if run is not None:
            queue.commit(run)
        if offer.full:
            return Appended(offer.positions, StoreFailure.QUEUE_FULL, _full(item.name))
        return Appended(offer.positions)

    def _append_topic(self, item: Append) -> Appended:
        topic = self._topic(item.name)
        tindex = topic.index
        offer = tindex.offer(item.message_ids, item.payloads, fresh=item.fresh)
        seqs = offer.seqs
        if seqs:
            tindex.end = seqs.stop
            tindex.bytes += sum(map(len, offer.new_payloads))
            topic.messages.extend(
                zip(
                    seqs, offer.new_ids, offer.new_payloads, repeat(item.published_at), strict=False
                )
            )
        return Appended(offer.positions)

    async def claim(self, claims: Sequence[Claim]) -> list[list[Delivery]]:
        index = self._index
        return [index.claim(c) for c in claims]

    async def settle(self, items: Sequence[Settle]) -> list[Settled]:
        return [self._settle(item) for item in items]

    def _settle(self, item: Settle) -> Settled:
        index = self._index
        queue = index.queues.get(item.queue)
        if queue is None:
            return Settled(frozenset(item.message_ids))
        begun, unknown = queue.begin_settle(item.consumer, item.message_ids)
        missing = unknown_ids(unknown, begun)
        if item.outcome is Outcome.DEAD and begun:
            dead = index.queue(DEAD_LETTER_PREFIX + item.queue)
            try:
                run = dead.stage_dead_letters(begun, item.reason)
            except QueueFull:
                # All or nothing: the group fails as a whole.
                index.abort_settle(queue, begun)
                return Settled(missing, StoreFailure.QUEUE_FULL)
            if run is not None:
                dead.commit(run)
        queue.finish_settle(item.consumer, begun, item.outcome)
        return Settled(missing)

    async def release(self, queue: str, consumer: str) -> int:
        return self._index.release(queue, consumer)

    async def reclaim(self, now: float) -> list[Reclaimed]:
        return self._index.reclaim(now)

    async def read(self, topic: str, position: int, limit: int) -> TopicRead:
        found = self._topics.get(topic)
        if found is None:
            return TopicRead((), 0, 0)
        tindex = found.index
        start = max(position, tindex.first)
        stop = min(tindex.end, start + max(limit, 0))
        base = found.head - tindex.first
        messages = (
            tuple(TopicMessage(*m) for m in found.messages[base + start : base + stop])
            if stop > start
            else ()
        )
        return TopicRead(messages, tindex.first, tindex.end)

    async def open_cursor(self, topic: str, name: str) -> Cursor:
        tindex = self._topic(topic).index
        cursor = tindex.cursors.get(name)
        if cursor is None:
            cursor = tindex.cursors[name] = Cursor(tindex.end)
        return cursor

    async def commit_cursors(self, items: Sequence[CursorCommit]) -> list[StoreFailure | None]:
        for item in items:
            self._topic(item.topic).index.cursors[item.name] = Cursor(item.position, item.acked)
        return [None] * len(items)

    async def delete_cursor(self, topic: str, name: str) -> bool:
        found = self._topics.get(topic)
        return found is not None and found.index.cursors.pop(name, None) is not None

    async def stats(self) -> StoreStats:
        index = self._index
        return StoreStats(queues=index.queue_stats(), topics=index.topic_stats())

    async def maintain(self, now: float) -> None:
        """Apply topic retention, message by message."""
        retention = self._retention
        oldest_kept = None if retention.max_age is None else now - retention.max_age
        for topic in self._topics.values():
            tindex = topic.index
            while tindex.end > tindex.first:
                oldest = topic.messages[topic.head]
                if not (
                    (
                        retention.max_messages is not None
                        and tindex.end - tindex.first > retention.max_messages
                    )
                    or (retention.max_bytes is not None and tindex.bytes > retention.max_bytes)
                    or (oldest_kept is not None and oldest[3] < oldest_kept)
                ):
                    break
                topic.drop_oldest()


def _full(queue: str) -> str:
    return f"queue {queue!r} holds its maximum number of messages"
