"""A store that keeps everything in memory: for tests and throwaway brokers.

Theory of operation
-------------------
All delivery state lives in the shared :class:`~msg.storage.index.Index`, exactly as
in the file store, so both behave the same; what the file store adds (a log, group
commit, recovery) is simply absent. Every operation completes before its coroutine
first yields, so operations take effect in call order and an appended message can be
claimed as soon as ``append`` returns.

Topic messages are kept in a list per topic with a moving head, so reading from a
position is one index computation, and trimming the oldest (retention, applied
exactly per message in :meth:`MemoryStore.maintain`) is amortised O(1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from msg.persistence import (
    Append,
    Appended,
    Capabilities,
    Claim,
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
from msg.storage.index import DEAD_LETTER_PREFIX, Index, TopicIndex, delivery

__all__ = ["MemoryStore"]

# Drop trimmed topic messages from the list once they are this many and at least half
# of it: trimming stays O(1) amortised without slicing on every message.
_COMPACT_AT: Final = 1024


# Retention is frozen, so one shared default is safe.
_DEFAULT_RETENTION: Final = Retention()


class _MemoryTopic:
    __slots__ = ("head", "index", "messages")

    def __init__(self, index: TopicIndex) -> None:
        self.index = index
        self.messages: list[TopicMessage] = []
        self.head = 0
        """messages[head] is at position index.first."""

    def drop_oldest(self) -> None:
        message = self.messages[self.head]
        self.head += 1
        self.index.first += 1
        self.index.bytes -= len(message.payload)
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
        results: list[Appended] = []
        index = self._index
        for item in items:
            message = item.message
            if item.kind is Kind.QUEUE:
                queue = index.queue(item.name)
                entry = queue.offer(message)
                if entry is None:
                    results.append(
                        Appended(failure=StoreFailure.QUEUE_FULL, detail=_full(item.name))
                    )
                elif isinstance(entry, int):
                    results.append(Appended(entry))
                else:
                    queue.commit(entry)
                    results.append(Appended(entry.seq))
            else:
                topic = self._topic(item.name)
                tindex = topic.index
                known = tindex.recent.get(message.message_id)
                if known is not None:
                    results.append(Appended(known))
                    continue
                position = tindex.end
                tindex.end = tindex.next_position = position + 1
                tindex.bytes += len(message.payload)
                tindex.recent.add(message.message_id, position)
                topic.messages.append(
                    TopicMessage(
                        position, message.message_id, message.payload, message.published_at
                    )
                )
                results.append(Appended(position))
        return results

    async def claim(self, claims: Sequence[Claim]) -> list[list[Delivery]]:
        index = self._index
        return [[delivery(c.queue, entry) for entry in index.claim(c)] for c in claims]

    async def settle(self, items: Sequence[Settle]) -> list[Settled]:
        index = self._index
        results: list[Settled] = []
        for item in items:
            queue = index.queues.get(item.queue)
            entry = None if queue is None else queue.begin_settle(item.message_id, item.consumer)
            if queue is None or entry is None:
                results.append(Settled(found=False))
                continue
            if item.outcome is Outcome.DEAD:
                dead = index.queue(DEAD_LETTER_PREFIX + item.queue)
                if entry.message_id not in dead.entries:
                    if dead.full():
                        index.abort_settle(queue, entry)
                        results.append(Settled(found=True, failure=StoreFailure.QUEUE_FULL))
                        continue
                    dead.commit(dead.stage_dead_letter(entry, item.reason))
            queue.finish_settle(entry, item.outcome)
            results.append(Settled(found=True))
        return results

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
        messages = tuple(found.messages[base + start : base + stop]) if stop > start else ()
        return TopicRead(messages, tindex.first, tindex.end)

    async def open_cursor(self, topic: str, name: str) -> int:
        tindex = self._topic(topic).index
        position = tindex.cursors.get(name)
        if position is None:
            position = tindex.cursors[name] = tindex.end
        return position

    async def commit_cursors(self, items: Sequence[CursorCommit]) -> list[StoreFailure | None]:
        for item in items:
            self._topic(item.topic).index.cursors[item.name] = item.position
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
                    or (oldest_kept is not None and oldest.published_at < oldest_kept)
                ):
                    break
                topic.drop_oldest()


def _full(queue: str) -> str:
    return f"queue {queue!r} holds its maximum number of messages"
