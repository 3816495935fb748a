"""The broker core: routing, credit, acks, without sockets, files or clocks.

Theory of operation
-------------------
The server feeds the router everything that happens, and the router answers with
effects:

- ``connect``/``disconnect`` when a connection comes and goes;
- ``handle(session_id, requests, now)`` with every request one read produced;
- the results of the store calls it asked for (each :class:`StoreCall` carries the
  method that takes its result);
- ``drained(session_id)`` when a connection's socket has taken what was written, and
  ``tick(now)`` about once a second.

In return the router leaves frames in each session's outbound buffer (the server
writes every dirty session once per loop iteration, see :meth:`take_dirty`), store
calls in :meth:`take_calls`, and connections to close in :meth:`take_closes`. All of it
is synchronous: one call runs to completion before the next, so no other connection
can observe a half-done update.

Paths of a message
~~~~~~~~~~~~~~~~~~
Pub/sub: a publish is sent at once to every plain subscriber (encoded once, the same
bytes for all), and appended to the topic's log; the publisher's ack waits for the
append to be durable. Durable subscribers read the log through their cursor: live
when they are caught up, by ``read`` calls when they are behind.

Queues: a publish is appended; when the append is durable the publisher is acked and
the queue is marked *maybe ready*. Once per loop iteration every queue that may have
work is *dispatched*: the consumers' credit becomes a ``claim`` of slots in round-robin
order, and the store fills the slots with ready messages. Acks and nacks become one
``settle`` call per iteration; their replies wait for it to be durable.

Errors the peer caused are answered with an error frame and a stable code, here,
once. Anything else raised while handling a request is a bug; the server logs it and
closes that one connection.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Final, cast

from msg.core.batches import (
    STORE_TEXT,
    AppendBatch,
    AppendGroup,
    ReplyRun,
    SettleBatch,
    fail_all,
)
from msg.core.effects import AnyStoreCall, Close, StoreCall
from msg.core.ids import IdSource
from msg.core.model import (
    AckedPositions,
    DurableSub,
    PlainSub,
    QueueConsumer,
    QueueState,
    Session,
    Subscription,
    TopicState,
)
from msg.core.outbound import Outbound, Slot
from msg.core.stats import Counters, Rates
from msg.persistence import (
    Appended,
    Claim,
    Cursor,
    CursorCommit,
    Delivery,
    Kind,
    Outcome,
    Reclaimed,
    Recovery,
    Settled,
    Store,
    StoreFailure,
    StoreStats,
    TopicRead,
)
from msg.protocol.codec import (
    delivery_prefix,
    encode_ack,
    encode_delivery,
    encode_error,
    encode_reply,
)
from msg.protocol.codes import ErrorCode
from msg.protocol.frames import (
    Ack,
    AckMode,
    Acks,
    Batch,
    JsonScalar,
    Mode,
    Nack,
    Ping,
    Publish,
    Publishes,
    RequestError,
    Status,
    Subscribe,
    Unsubscribe,
)
from msg.protocol.names import DEAD_LETTER_PREFIX, dead_letter_queue

__all__ = ["DEFAULT_ACK_TIMEOUT", "Router"]

log = logging.getLogger(__name__)

# RabbitMQ's consumer_timeout default: a consumer that holds a message this long
# without settling it has almost certainly hung, and the message goes to another.
DEFAULT_ACK_TIMEOUT: Final = 30 * 60.0

# The most slots one claim asks for: big enough to fill a consumer's whole default
# prefetch many times over, small enough that one claim's deliveries are one modest
# write.
_MAX_CLAIM_SLOTS: Final = 4096

# The end of a delivery frame, around the message id (see encode_delivery).
_ID_HEAD: Final = b',"message_id":"'
_ID_TAIL: Final = b'"}\n'

# Catch-up reads of a durable subscription fetch at most this many messages at once.
_MAX_READ: Final = 1024


@dataclass(slots=True)
class _ClaimBatch:
    claims: list[Claim] = field(default_factory=list)
    queues: list[tuple[QueueState, int]] = field(default_factory=list)
    """Per claim: the queue and its ready generation when the claim was made."""


@dataclass(slots=True)
class _CursorBatch:
    commits: list[CursorCommit] = field(default_factory=list)
    subs: list[DurableSub] = field(default_factory=list)
    waiters: list[list[tuple[Slot, JsonScalar, str]]] = field(default_factory=list)


_Handler = Callable[["Router", Session, Any, float], None]


class Router:
    """Routes requests between sessions, topics, queues and the store."""

    def __init__(
        self,
        *,
        ids: IdSource,
        now: float,
        ack_timeout: float | None = DEFAULT_ACK_TIMEOUT,
        max_deliveries: int = 0,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        """``max_deliveries``: a queue message claimed for a manual-ack consumer for
        the time after this many is dead-lettered instead (0: no limit)."""
        self._ids = ids
        self._started = now
        self._ack_timeout = ack_timeout
        self._max_deliveries = max_deliveries
        self._info = dict(info or {})
        self._sessions: dict[int, Session] = {}
        self._topics: dict[str, TopicState] = {}
        self._queues: dict[str, QueueState] = {}
        self._dirty: dict[int, Session] = {}
        self._calls: list[AnyStoreCall] = []
        self._closes: list[Close] = []
        self._appends: AppendBatch | None = None
        self._claims: _ClaimBatch | None = None
        self._settles: SettleBatch | None = None
        self._run: ReplyRun | None = None
        """The reply run the current request may join (see msg.core.batches)..."""
        self._run_batch: AppendBatch | SettleBatch | None = None
        """...if the request goes to this batch."""
        self._unbooked: list[tuple[Session, TopicState, Publishes, list[str], int, float]] = []
        """Publishes already sent to their subscribers, not yet booked (see handle)."""
        self._to_dispatch: dict[str, QueueState] = {}
        self._to_commit: dict[int, DurableSub] = {}
        self._to_pump: dict[int, DurableSub] = {}
        self._next_consumer = 0
        self._now_hint = now
        """The ``now`` of the latest request or tick, for claim deadlines."""
        self.read_only: StoreFailure | None = None
        """Set by the server from ``Store.writable()``: publishes are refused."""
        self.stopping = False
        """Set by the server at shutdown: no new publishes, no new deliveries."""
        self.counters = Counters()
        self.rates = Rates()

    # ------------------------------------------------------------------
    # Inputs from the server

    def recovered(self, recovery: Recovery) -> None:
        """Learn what the store holds after a restart."""
        for name in recovery.queues:
            self._queue(name)
        for name, end in recovery.topics.items():
            self._topic(name).end = end

    def connect(self, session_id: int, peer: str) -> None:
        """A connection was accepted."""
        self._sessions[session_id] = Session(session_id, peer)
        self.counters.connections += 1

    def disconnect(self, session_id: int) -> None:
        """A connection is gone: end its subscriptions, return what it held."""
        self.end_subscriptions(session_id)
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.closed = True
            self._dirty.pop(session_id, None)

    def end_subscriptions(self, session_id: int) -> None:
        """End every subscription of ``session_id`` and return what it held.

        Used when a peer half-closes: it will read no more deliveries, but the replies
        to what it already asked are still owed.
        """
        if self._unbooked:
            self.book()
        session = self._sessions.get(session_id)
        if session is None:
            return
        for sub in list(session.subs.values()):
            self._end(sub)
        session.subs.clear()
        session.outstanding.clear()

    def handle(self, session_id: int, requests: Sequence[Batch], now: float) -> None:
        """Act on every request one read of ``session_id`` produced, in order.

        ``requests`` is what :meth:`RequestReader.feed_batches` returns: runs of
        publishes and acks come as :class:`Publishes` and :class:`Acks` batches. Single
        :class:`Publish` and :class:`Ack` frames are accepted too, and gathered into
        batches here, so both take the same path.

        A run of publishes to one topic that ends the read is *sent before it is
        booked*: its deliveries are queued for the topic's live subscribers at once, and
        the rest (its append to the store, the slot for the publisher's ack) waits until
        :meth:`book` runs, which every later call into the router does first, except
        :meth:`take_dirty` and :meth:`drained`. So a server that writes the dirty
        sessions before it takes the store calls puts a lone message on the wire before
        any bookkeeping: at low rates that bookkeeping would be most of the broker's
        time between a publish and its delivery. Nothing can tell the difference,
        because nothing else happens in between.
        """
        if self._unbooked:
            self.book()
        session = self._sessions[session_id]
        self._now_hint = now
        handlers = _HANDLERS
        self._run = None
        index = 0
        count = len(requests)
        while index < count:
            request = requests[index]
            kind = type(request)
            if kind is Publishes:
                publishes = cast(Publishes, request)
                if index < count - 1 or not self._send_first(session, publishes, now):
                    self._publish_batch(session, publishes, now)
            elif kind is Acks:
                self._ack_batch(session, cast(Acks, request))
            elif kind is Publish or kind is Ack:
                end = _run_end(requests, index)
                frames = requests[index:end]
                if kind is Publish:
                    publishes = _gather_publishes(frames)
                    if end < count or not self._send_first(session, publishes, now):
                        self._publish_batch(session, publishes, now)
                else:
                    self._ack_batch(session, _gather_acks(frames))
                index = end
                continue
            else:
                # Only consecutive publishes and acks share a reply run: any other reply
                # must come after the run's replies.
                self._run = None
                handlers[kind](self, session, request, now)
            index += 1
        self._run = None
        self._dirty[session_id] = session

    def drained(self, session_id: int) -> bool:
        """The socket of ``session_id`` has room: auto-ack deliveries count as taken.

        Returns whether that gave a subscription room for more (work for the next
        flush).
        """
        session = self._sessions.get(session_id)
        if session is None:
            return False
        room = False
        for sub in session.subs.values():
            if type(sub) is QueueConsumer:
                if sub.ack is AckMode.AUTO and sub.in_flight:
                    sub.in_flight = 0
                    self._to_dispatch[sub.queue.name] = sub.queue
                    room = True
            elif type(sub) is DurableSub and sub.ack is AckMode.AUTO and sub.unflushed:
                sub.unflushed = 0
                self._to_pump[id(sub)] = sub
                room = True
        return room

    def tick(self, now: float) -> None:
        """Periodic work: rates, and taking back deliveries whose ack deadline passed."""
        if self._unbooked:
            self.book()
        self._now_hint = now
        self.rates.update(self.counters, now)
        if self._ack_timeout is not None:
            self._call("reclaim", lambda store: store.reclaim(now), self._reclaimed)

    # ------------------------------------------------------------------
    # Outputs to the server

    def take_dirty(self) -> list[Session]:
        """Sessions with frames ready to write (their ``out.take()`` has them).

        Publishes sent before they were booked (see :meth:`handle`) stay unbooked: their
        deliveries are written first.
        """
        self._flush_pending()
        if not self._dirty:
            return []
        dirty = list(self._dirty.values())
        self._dirty.clear()
        return dirty

    def take_calls(self) -> list[AnyStoreCall]:
        """Store calls to run, in order."""
        if self._unbooked:
            self.book()
        self._flush_pending()
        calls = self._calls
        self._calls = []
        return calls

    def take_closes(self) -> list[Close]:
        """Connections to close once their queued frames are written."""
        closes = self._closes
        self._closes = []
        return closes

    def pending_replies(self, session_id: int) -> int:
        """Requests of ``session_id`` still waiting on the store (publishes sent before
        being booked are booked first, so they count)."""
        if self._unbooked:
            self.book()
        session = self._sessions.get(session_id)
        return 0 if session is None else session.out.unfilled

    def book(self) -> None:
        """Book the publishes that were sent before being booked (see :meth:`handle`):
        their appends, and their places in the publishers' reply order."""
        unbooked = self._unbooked
        self._unbooked = []
        for session, topic, publishes, message_ids, delivered, now in unbooked:
            batch = self._appends or self._new_append_batch(now)
            run = ReplyRun(session)
            batch.runs.append(run)
            group = batch.topics.get(topic.name) or batch.group(Kind.TOPIC, topic.name)
            self._book_run(run, batch, topic, group, publishes, message_ids, delivered)
        self._run = None

    @property
    def sessions(self) -> int:
        """How many connections are open."""
        return len(self._sessions)

    def _flush_pending(self) -> None:
        """Turn this iteration's accumulated work into store calls."""
        while self._to_dispatch or self._to_pump:
            to_dispatch = self._to_dispatch
            self._to_dispatch = {}
            for queue in to_dispatch.values():
                self._dispatch(queue)
            to_pump = self._to_pump
            self._to_pump = {}
            for sub in to_pump.values():
                self._pump(sub)
        if self._to_commit:
            self._commit_cursors()
        self._close_batches()

    # ------------------------------------------------------------------
    # Request handlers

    def _on_error(self, session: Session, request: RequestError, now: float) -> None:
        self.counters.errors += 1
        log.debug("session %d: %s: %s", session.id, request.code, request.text)
        session.out.send(
            encode_error(request.code, request.text, request.id, request.message_id, request.reply)
        )

    def _on_ping(self, session: Session, request: Ping, now: float) -> None:
        if request.id is None:
            session.out.send(b'{"type":"pong"}\n')
        else:
            session.out.send(encode_reply({"type": "pong", "id": request.id}))

    def _publish_batch(self, session: Session, publishes: Publishes, now: float) -> None:
        """Handle a run of publishes from one read.

        This is the broker's hottest loop, so it hoists every lookup it can out of the
        per-message path: ids are made for the whole run at once, and the destination
        (its state, its append group, its live subscribers) is looked up again only when
        it changes from one message to the next.
        """
        if self.stopping or self.read_only is not None:
            self._run = None
            if self.stopping:
                code, text = ErrorCode.SHUTTING_DOWN, "the broker is shutting down"
            else:
                assert self.read_only is not None
                code, text = ErrorCode(self.read_only.value), STORE_TEXT[self.read_only]
            for rid in publishes.ids:
                self._reject(session, code, text, rid, reply=publishes.reply)
            return
        topics = publishes.topics
        modes = publishes.modes
        payloads = publishes.payloads
        total = len(topics)
        message_ids = self._ids.next_ids(total)
        batch = self._appends or self._new_append_batch(now)
        run = ReplyRun(session)
        batch.runs.append(run)
        segments = run.segments
        delivered = 0
        # A segment is a stretch of consecutive messages for one destination.
        name = topics[0]
        mode = modes[0]
        state, group, outs, prefix = self._destination(batch, name, mode)
        if topics.count(name) == total and modes.count(mode) == total:
            # The usual read: every publish to one destination. No bytecode per message.
            if outs:
                _deliver_all(outs, prefix, payloads, message_ids)
            self._book_run(run, batch, state, group, publishes, message_ids, total * len(outs))
            return
        group_ids = group.message_ids
        group_payloads = group.payloads
        first = len(group_ids)
        count = 0
        for topic, topic_mode, message_id, payload in zip(
            topics, modes, message_ids, payloads, strict=True
        ):
            if topic != name or topic_mode is not mode:
                segments.append((group, first, count))
                state.published += count
                state.delivered += count * len(outs)
                delivered += count * len(outs)
                name = topic
                mode = topic_mode
                state, group, outs, prefix = self._destination(batch, name, mode)
                group_ids = group.message_ids
                group_payloads = group.payloads
                first = len(group_ids)
                count = 0
            if outs:
                frame = b"".join((prefix, payload, _ID_HEAD, message_id.encode(), _ID_TAIL))
                for out in outs:
                    if out.held:
                        out.held.append(frame)
                    else:
                        out.ready.append(frame)
            group_ids.append(message_id)
            group_payloads.append(payload)
            count += 1
        segments.append((group, first, count))
        state.published += count
        state.delivered += count * len(outs)
        delivered += count * len(outs)
        self._finish_publish_batch(run, batch, publishes, total, delivered)

    def _send_first(self, session: Session, publishes: Publishes, now: float) -> bool:
        """Send a run of publishes to one topic to its live subscribers now and leave
        the run to :meth:`book` (see :meth:`handle`); False, having done nothing, where
        that could change what anyone sees: no live subscriber, publishes refused,
        another destination or mode in the run, or the publisher subscribed to the
        topic itself (its own deliveries must follow its ack's slot)."""
        if self.stopping or self.read_only is not None:
            return False
        topics = publishes.topics
        total = len(topics)
        name = topics[0]
        topic = self._topics.get(name)
        if (
            topic is None
            or not topic.subscribers
            or session.id in topic.subscribers
            or topics.count(name) != total
            or publishes.modes.count(Mode.PUBSUB) != total
        ):
            return False
        message_ids = self._ids.next_ids(total)
        outs = self._live_outs(topic)
        _deliver_all(outs, topic.prefix, publishes.payloads, message_ids)
        self._unbooked.append((session, topic, publishes, message_ids, total * len(outs), now))
        return True

    def _book_run(
        self,
        run: ReplyRun,
        batch: AppendBatch,
        state: TopicState | QueueState,
        group: AppendGroup,
        publishes: Publishes,
        message_ids: list[str],
        delivered: int,
    ) -> None:
        """Book a whole run of publishes, all to ``group``'s destination, as one
        segment of ``run`` (its deliveries, ``delivered`` of them, are already queued)."""
        total = len(message_ids)
        first = len(group.message_ids)
        group.message_ids += message_ids
        group.payloads += publishes.payloads
        run.segments.append((group, first, total))
        state.published += total
        state.delivered += delivered
        self._finish_publish_batch(run, batch, publishes, total, delivered)

    def _finish_publish_batch(
        self, run: ReplyRun, batch: AppendBatch, publishes: Publishes, total: int, delivered: int
    ) -> None:
        rids = run.rids = publishes.ids
        run.has_ids = rids.count(None) != len(rids)
        run.reply = publishes.reply
        self._run = run
        self._run_batch = batch
        self.counters.published += total
        self.counters.delivered += delivered

    def _destination(
        self, batch: AppendBatch, name: str, mode: Mode
    ) -> tuple[TopicState | QueueState, AppendGroup, list[Outbound], bytes]:
        """Where a publish to ``name`` goes: its state, its append group, and (topics)
        its live subscribers' outbound buffers (marked dirty) and delivery prefix."""
        if mode is Mode.PUBSUB:
            topic = self._topics.get(name) or self._topic(name)
            group = batch.topics.get(name) or batch.group(Kind.TOPIC, name)
            return topic, group, self._live_outs(topic), topic.prefix
        queue = self._queues.get(name) or self._queue(name)
        return queue, batch.queues.get(name) or batch.group(Kind.QUEUE, name), [], b""

    def _live_outs(self, topic: TopicState) -> list[Outbound]:
        """The outbound buffers of ``topic``'s plain subscribers, marked dirty."""
        dirty = self._dirty
        outs = []
        for subscriber in topic.subscribers.values():
            outs.append(subscriber.out)
            dirty[subscriber.id] = subscriber
        return outs

    def _on_subscribe(self, session: Session, request: Subscribe, now: float) -> None:
        key = (request.mode, request.topic)
        if key in session.subs:
            what = "queue" if request.mode is Mode.QUEUE else "topic"
            self._reject(
                session,
                ErrorCode.ALREADY_SUBSCRIBED,
                f"this connection is already subscribed to {what} {request.topic!r}",
                request.id,
            )
            return
        if request.mode is Mode.QUEUE:
            queue = self._queue(request.topic)
            self._next_consumer += 1
            consumer = QueueConsumer(
                session,
                queue,
                f"{session.id}.{self._next_consumer}",
                request.ack,
                request.prefetch,
                delivery_prefix(request.topic, Mode.QUEUE),
            )
            queue.add(consumer)
            session.subs[key] = consumer
            session.out.send(_subscribed(request))
            self._to_dispatch[queue.name] = queue
            return
        topic = self._topic(request.topic)
        if request.durable is None:
            session.subs[key] = PlainSub(session, topic)
            topic.subscribers[session.id] = session
            session.out.send(_subscribed(request))
            return
        if request.durable in topic.durables:
            self._reject(
                session,
                ErrorCode.DURABLE_IN_USE,
                f"durable subscription {request.durable!r} on topic {request.topic!r} is "
                "attached to another connection",
                request.id,
            )
            return
        sub = DurableSub(
            session,
            topic,
            request.durable,
            request.ack,
            request.prefetch,
            delivery_prefix(request.topic, Mode.PUBSUB, request.durable),
        )
        topic.durables[request.durable] = sub
        session.subs[key] = sub
        slot = session.out.reserve()
        if self._to_commit:
            # A subscription of this name that just ended (its connection dropped in
            # this same iteration) has its last commit pending: the store must take it
            # before the open, or the returning subscriber would be handed messages
            # acked on the old connection.
            self._commit_cursors()
        self._call(
            "open_cursor",
            lambda store: store.open_cursor(topic.name, sub.name),
            lambda cursor: self._cursor_opened(sub, slot, request, cursor),
            lambda exc: self._cursor_failed(sub, slot, request),
        )

    def _on_unsubscribe(self, session: Session, request: Unsubscribe, now: float) -> None:
        key = (request.mode, request.topic)
        sub = session.subs.get(key)
        if request.durable is not None:
            self._forget_durable(session, request, sub)
            return
        if sub is None:
            what = "queue" if request.mode is Mode.QUEUE else "topic"
            self._reject(
                session,
                ErrorCode.NOT_SUBSCRIBED,
                f"this connection is not subscribed to {what} {request.topic!r}",
                request.id,
            )
            return
        del session.subs[key]
        self._end(sub)
        session.out.send(_unsubscribed(request))

    def _forget_durable(
        self, session: Session, request: Unsubscribe, sub: Subscription | None
    ) -> None:
        assert request.durable is not None
        name = request.durable
        topic = self._topic(request.topic)
        attached = topic.durables.get(name)
        if attached is not None:
            if attached.session is not session:
                self._reject(
                    session,
                    ErrorCode.DURABLE_IN_USE,
                    f"durable subscription {name!r} is attached to another connection",
                    request.id,
                )
                return
            del session.subs[(Mode.PUBSUB, request.topic)]
            self._end(attached, commit=False)
        elif sub is not None:
            # A plain subscription on this topic: end it too, as asked.
            del session.subs[(Mode.PUBSUB, request.topic)]
            self._end(sub)
        slot = session.out.reserve()

        def deleted(found: bool) -> None:
            if found or attached is not None or sub is not None:
                self._fill(session, slot, _unsubscribed(request))
            else:
                self._fill(
                    session,
                    slot,
                    encode_error(
                        ErrorCode.NOT_SUBSCRIBED,
                        f"there is no durable subscription {name!r} on topic {request.topic!r}",
                        request.id,
                    ),
                )

        self._call(
            "delete_cursor",
            lambda store: store.delete_cursor(request.topic, name),
            deleted,
            lambda exc: self._fill(
                session, slot, _storage_error(request.id, "the durable cursor was not deleted")
            ),
        )

    def _on_ack(self, session: Session, request: Ack, now: float) -> None:
        self._settle(session, request.message_id, Outcome.ACK, request.id)

    def _ack_batch(self, session: Session, acks: Acks) -> None:
        """Handle a run of acks from one read.

        Consumers ack in long runs too. Plain acks (no request id) of one queue consumer
        are gathered into one segment of the settle batch and the reply run, and the
        consumer's counters are updated once per segment. Anything else goes through
        :meth:`_settle` one at a time.
        """
        outstanding = session.outstanding
        if self._ack_all_at_once(session, acks):
            return
        holder: QueueConsumer | DurableSub | None
        last: QueueConsumer | None = None
        ids: list[str] = []
        first = taken = 0
        for message_id, rid in zip(acks.message_ids, acks.ids, strict=True):
            holder = outstanding.pop(message_id, None)
            if holder is None or holder is not last or rid is not None:
                if taken:
                    self._acked_segment(session, last, first, taken)
                    taken = 0
                if holder is None or type(holder) is not QueueConsumer or rid is not None:
                    last = None
                    if holder is not None:
                        outstanding[message_id] = holder
                    self._settle(session, message_id, Outcome.ACK, rid)
                    continue
                last = holder
                batch = self._settles or self._new_settle_batch()
                group = batch.group(holder.queue.name, holder.consumer_id, Outcome.ACK)
                ids = group.message_ids
                first = len(ids)
            ids.append(message_id)
            taken += 1
        if taken:
            self._acked_segment(session, last, first, taken)

    def _ack_all_at_once(self, session: Session, acks: Acks) -> bool:
        """The usual run: plain acks, each of a message one queue consumer of this
        session holds. Booked as one segment without bytecode per message; False (and
        nothing changed) for any other run."""
        message_ids = acks.message_ids
        count = len(message_ids)
        if acks.ids.count(None) != count:
            return False
        outstanding = session.outstanding
        holders = list(map(outstanding.pop, message_ids, repeat(None)))
        holder = holders[0]
        if type(holder) is not QueueConsumer or holders.count(holder) != count:
            # Someone else's message, an unknown or repeated id: put back what was
            # taken, for the one-by-one path to answer each.
            for message_id, taken in zip(message_ids, holders, strict=True):
                if taken is not None:
                    outstanding[message_id] = taken
            return False
        batch = self._settles or self._new_settle_batch()
        group = batch.group(holder.queue.name, holder.consumer_id, Outcome.ACK)
        first = len(group.message_ids)
        group.message_ids += message_ids
        self._acked_segment(session, holder, first, count)
        return True

    def _acked_segment(
        self, session: Session, consumer: QueueConsumer | None, first: int, taken: int
    ) -> None:
        """Book ``taken`` plain acks of ``consumer``, just added to its settle group."""
        assert consumer is not None
        batch = self._settles
        assert batch is not None
        group = batch.group(consumer.queue.name, consumer.consumer_id, Outcome.ACK)
        run = self._run
        if run is None or self._run_batch is not batch:
            run = self._run = ReplyRun(session)
            self._run_batch = batch
            batch.runs.append(run)
        run.add_segment(group, first, taken)
        consumer.in_flight -= taken
        queue = consumer.queue
        queue.acked += taken
        self.counters.acked += taken
        self._to_dispatch[queue.name] = queue

    def _on_nack(self, session: Session, request: Nack, now: float) -> None:
        self.counters.nacked += 1
        outcome = Outcome.REQUEUE if request.requeue else Outcome.DEAD
        self._settle(session, request.message_id, outcome, request.id, request.reason)

    def _settle(
        self,
        session: Session,
        message_id: str,
        outcome: Outcome,
        rid: JsonScalar,
        reason: str | None = None,
    ) -> None:
        holder = session.outstanding.pop(message_id, None)
        if holder is None:
            self._run = None
            self._reject(
                session,
                ErrorCode.UNKNOWN_MESSAGE,
                f"message {message_id!r} is not awaiting an ack on this connection "
                "(unknown, already settled, or taken back after its ack deadline)",
                rid,
                message_id,
            )
            return
        if type(holder) is QueueConsumer:
            holder.in_flight -= 1
            queue = holder.queue
            if outcome is Outcome.ACK:
                queue.acked += 1
                self.counters.acked += 1
            elif outcome is Outcome.DEAD:
                queue.dead_lettered += 1
                self.counters.dead_lettered += 1
            self._to_dispatch[queue.name] = queue
            batch = self._settles or self._new_settle_batch()
            group = batch.group(
                queue.name, holder.consumer_id, outcome, reason if outcome is Outcome.DEAD else None
            )
            ids = group.message_ids
            ids.append(message_id)
            run = self._run
            if run is None or self._run_batch is not batch:
                run = self._run = ReplyRun(session)
                self._run_batch = batch
                batch.runs.append(run)
            run.add(group, len(ids) - 1, rid)
            return
        self._run = None
        assert type(holder) is DurableSub
        position = holder.unacked.pop(message_id)
        if outcome is Outcome.REQUEUE:
            holder.unacked[message_id] = position
            holder.redeliver.append(position)
            holder.attempts[position] = holder.attempts.get(position, 1) + 1
            self._to_pump[id(holder)] = holder
        else:
            # Done (acked, or dropped by a nack without requeue): remembered above the
            # floor until every earlier position is done too, so that it is not
            # delivered again after a reconnect or a restart.
            holder.acked.add(position)
            holder.attempts.pop(position, None)
            if outcome is Outcome.ACK:
                self.counters.acked += 1
            self._to_pump[id(holder)] = holder
        holder.ack_waiters.append((session.out.reserve(), rid, message_id))
        self._to_commit[id(holder)] = holder

    def _on_status(self, session: Session, request: Status, now: float) -> None:
        slot = session.out.reserve()
        self._call(
            "stats",
            lambda store: store.stats(),
            lambda stats: self._fill(session, slot, self._status(stats, request.id, now)),
            lambda exc: self._fill(
                session, slot, _storage_error(request.id, "the store could not report its state")
            ),
        )

    # ------------------------------------------------------------------
    # Queues

    def _queue(self, name: str) -> QueueState:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = QueueState(name)
        return queue

    def _dispatch(self, queue: QueueState) -> None:
        """Claim ready messages for every consumer of ``queue`` that has credit."""
        consumers = queue.consumers
        if not queue.maybe_ready or not consumers or self.stopping:
            return
        if len(consumers) == 1:
            consumer = consumers[0]
            credit = min(consumer.credit, _MAX_CLAIM_SLOTS)
            if credit <= 0:
                return
            consumer.reserved += credit
            self._claim(queue, consumer.ack, (consumer.consumer_id,) * credit)
            return
        start = queue.next_consumer % len(consumers)
        ordered = consumers[start:] + consumers[:start]
        for ack in (AckMode.AUTO, AckMode.MANUAL):
            group = [c for c in ordered if c.ack is ack and c.credit > 0]
            if group:
                slots = _round_robin(group, _MAX_CLAIM_SLOTS)
                for consumer_id, taken in Counter(slots).items():
                    queue.by_id[consumer_id].reserved += taken
                self._claim(queue, ack, slots)

    def _claim(self, queue: QueueState, ack: AckMode, slots: tuple[str, ...]) -> None:
        batch = self._claims or self._new_claim_batch()
        auto = ack is AckMode.AUTO
        deadline = None
        if not auto and self._ack_timeout is not None:
            # The store compares deadlines with the ``now`` of reclaim(); both come
            # from the server's wall clock.
            deadline = self._now_hint + self._ack_timeout
        batch.claims.append(Claim(queue.name, slots, auto, deadline))
        batch.queues.append((queue, queue.ready_generation))

    def _claimed(self, batch: _ClaimBatch, results: list[list[Delivery]]) -> None:
        dirty = self._dirty
        counters = self.counters
        for claim, (queue, generation), deliveries in zip(
            batch.claims, batch.queues, results, strict=True
        ):
            if (
                self._max_deliveries
                and not claim.auto_ack
                and not queue.name.startswith(DEAD_LETTER_PREFIX)
            ):
                deliveries = self._over_the_limit(queue, deliveries)
            by_id = queue.by_id
            for consumer_id, slots in Counter(claim.consumers).items():
                consumer = by_id.get(consumer_id)
                if consumer is not None:
                    consumer.reserved -= slots
            # Deliveries come in runs for one consumer: look it up when it changes.
            current = ""
            consumer = None
            for delivery in deliveries:
                if delivery.consumer != current:
                    current = delivery.consumer
                    consumer = by_id.get(current)
                    if consumer is not None:
                        session = consumer.session
                        out = session.out
                        outstanding = session.outstanding
                        prefix = consumer.prefix
                        dirty[session.id] = session
                if consumer is None:
                    # Its consumer left after the claim was made; the release that
                    # followed the claim has already made the message ready again.
                    continue
                message_id = delivery.message_id
                if delivery.attempt == 1 and delivery.reason is None:
                    frame = b"".join(
                        (prefix, delivery.payload, _ID_HEAD, message_id.encode(), _ID_TAIL)
                    )
                else:
                    frame = encode_delivery(
                        prefix, delivery.payload, message_id, delivery.attempt, delivery.reason
                    )
                if out.held:
                    out.held.append(frame)
                else:
                    out.ready.append(frame)
                consumer.in_flight += 1
                if not claim.auto_ack:
                    outstanding[message_id] = consumer
            if deliveries and len(queue.consumers) > 1:
                # Round-robin resumes after the consumer that got the last message, not
                # after the last slot offered (most slots of a claim go unfilled).
                last = by_id.get(deliveries[-1].consumer)
                if last is not None:
                    queue.next_consumer = (queue.consumers.index(last) + 1) % len(queue.consumers)
            queue.delivered += len(deliveries)
            counters.delivered += len(deliveries)
            if len(deliveries) < len(claim.consumers) and generation == queue.ready_generation:
                queue.maybe_ready = False
            self._to_dispatch[queue.name] = queue

    def _over_the_limit(self, queue: QueueState, deliveries: list[Delivery]) -> list[Delivery]:
        """Dead-letter the claimed messages past the delivery limit (a poison message
        would otherwise go round the consumers forever); return the others."""
        limit = self._max_deliveries
        if all(delivery.attempt <= limit for delivery in deliveries):
            return deliveries
        kept: list[Delivery] = []
        reason = f"delivered {limit} times without an ack (max_deliveries)"
        for delivery in deliveries:
            if delivery.attempt <= limit:
                kept.append(delivery)
                continue
            log.warning(
                "queue %r: message %s was delivered %d times without an ack; moved to %r",
                queue.name,
                delivery.message_id,
                limit,
                dead_letter_queue(queue.name),
            )
            batch = self._settles or self._new_settle_batch()
            batch.group(queue.name, delivery.consumer, Outcome.DEAD, reason).message_ids.append(
                delivery.message_id
            )
            queue.dead_lettered += 1
            self.counters.dead_lettered += 1
        return kept

    def _claim_failed(self, batch: _ClaimBatch) -> None:
        for claim, (queue, _generation) in zip(batch.claims, batch.queues, strict=True):
            for consumer_id in claim.consumers:
                consumer = queue.by_id.get(consumer_id)
                if consumer is not None:
                    consumer.reserved -= 1

    def _settled(self, batch: SettleBatch, results: list[Settled]) -> None:
        for group, result in zip(batch.groups, results, strict=True):
            group.settle(result)
            if group.outcome is not Outcome.ACK and group.succeeded:
                if group.outcome is Outcome.REQUEUE:
                    self._mark_ready(group.queue)
                else:
                    self._mark_ready(dead_letter_queue(group.queue))
        self._answer(batch.runs)

    def _settle_failed(self, batch: SettleBatch) -> None:
        fail_all(batch.groups, StoreFailure.STORAGE_ERROR, "not recorded: the store failed")
        self._answer(batch.runs)

    def _answer(self, runs: list[ReplyRun]) -> None:
        """Fill each run's slot with its replies, now that its groups are settled."""
        dirty = self._dirty
        for run in runs:
            session = run.session
            if not session.closed:
                session.out.fill(run.slot, run.replies())
                dirty[session.id] = session

    def _mark_ready(self, name: str) -> None:
        queue = self._queue(name)
        queue.mark_ready()
        self._to_dispatch[name] = queue

    def _released(self, queue: QueueState, count: int) -> None:
        if count:
            self._mark_ready(queue.name)

    def _reclaimed(self, reclaimed: list[Reclaimed]) -> None:
        for item in reclaimed:
            queue = self._queues.get(item.queue)
            if queue is None:
                continue
            consumer = queue.by_id.get(item.consumer)
            if consumer is not None:
                session = consumer.session
                if session.outstanding.get(item.message_id) is consumer:
                    del session.outstanding[item.message_id]
                    consumer.in_flight -= 1
                log.warning(
                    "session %d (%s): message %s on queue %r was not settled within %.0f s; "
                    "delivering it again",
                    session.id,
                    session.peer,
                    item.message_id,
                    item.queue,
                    self._ack_timeout,
                )
            self._mark_ready(item.queue)

    # ------------------------------------------------------------------
    # Topics and durable subscriptions

    def _topic(self, name: str) -> TopicState:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = TopicState(name, delivery_prefix(name, Mode.PUBSUB))
        return topic

    def _appended(self, batch: AppendBatch, results: list[Appended]) -> None:
        for group, result in zip(batch.groups, results, strict=True):
            group.settle(result)
            stored = len(result.positions)
            if stored < len(group.message_ids):
                rejected = len(group.message_ids) - stored
                self.counters.rejected += rejected
                self.counters.errors += rejected
            if not stored:
                continue
            if group.kind is Kind.QUEUE:
                queue = self._queues.get(group.name) or self._queue(group.name)
                queue.mark_ready()
                self._to_dispatch[group.name] = queue
                continue
            topic = self._topics.get(group.name) or self._topic(group.name)
            positions = result.positions
            last = positions[-1]
            if last >= topic.end:
                topic.end = last + 1
            if topic.durables:
                ids = group.message_ids
                payloads = group.payloads
                for index in range(stored):
                    self._deliver_live(topic, ids[index], payloads[index], positions[index])
        self._answer(batch.runs)

    def _append_failed(self, batch: AppendBatch) -> None:
        fail_all(batch.groups, StoreFailure.STORAGE_ERROR, "not stored: the store failed")
        self._answer(batch.runs)

    def _deliver_live(
        self, topic: TopicState, message_id: str, payload: bytes, position: int
    ) -> None:
        for sub in topic.durables.values():
            if not sub.attached or sub.reading:
                continue
            if sub.next_position == position and sub.credit > 0:
                self._deliver_durable(sub, position, message_id, payload)
                sub.advance(position + 1)
            elif sub.next_position < position:
                self._to_pump[id(sub)] = sub

    def _deliver_durable(
        self, sub: DurableSub, position: int, message_id: str, payload: bytes
    ) -> None:
        session = sub.session
        attempt = sub.attempts.get(position, 1)
        session.out.send(encode_delivery(sub.prefix, payload, message_id, attempt))
        self._dirty[session.id] = session
        sub.topic.delivered += 1
        self.counters.delivered += 1
        if sub.ack is AckMode.MANUAL:
            sub.unacked[message_id] = position
            session.outstanding[message_id] = sub
        else:
            sub.unflushed += 1
        self._to_commit[id(sub)] = sub

    def _cursor_opened(
        self, sub: DurableSub, slot: Slot, request: Subscribe, cursor: Cursor
    ) -> None:
        # The subscribe succeeded even if the subscription has ended since (the peer
        # half-closed, or unsubscribed in the same batch): its reply is owed either way.
        self._fill(sub.session, slot, _subscribed(request))
        if not sub.active:
            return
        sub.attached = True
        sub.acked = AckedPositions(cursor.acked)
        sub.committed = cursor.position
        sub.committed_acked = cursor.acked
        # The floor is never acked, so delivery resumes there and then skips the
        # positions acked in an earlier session.
        sub.next_position = cursor.position
        self._to_pump[id(sub)] = sub

    def _cursor_failed(self, sub: DurableSub, slot: Slot, request: Subscribe) -> None:
        if sub.active:
            del sub.session.subs[(Mode.PUBSUB, request.topic)]
            self._end(sub, commit=False)
        self._fill(
            sub.session, slot, _storage_error(request.id, "the durable cursor could not be opened")
        )

    def _pump(self, sub: DurableSub) -> None:
        """Deliver what a durable subscriber is owed, reading the log if it is behind."""
        if not sub.active or not sub.attached or sub.reading:
            return
        if sub.redeliver:
            # A nacked message still counts against the prefetch: no credit needed.
            sub.redeliver.sort()
            self._read(sub, sub.redeliver.pop(0), 1, redelivery=True)
            return
        credit = sub.credit
        if credit > 0 and sub.next_position < sub.topic.end:
            self._read(sub, sub.next_position, min(credit, _MAX_READ), redelivery=False)

    def _read(self, sub: DurableSub, position: int, limit: int, *, redelivery: bool) -> None:
        sub.reading = True
        self._call(
            "read",
            lambda store: store.read(sub.topic.name, position, limit),
            lambda result: self._read_done(sub, position, result, redelivery),
            lambda exc: self._read_failed(sub),
        )

    def _read_done(
        self, sub: DurableSub, position: int, result: TopicRead, redelivery: bool
    ) -> None:
        sub.reading = False
        if not sub.active:
            return
        topic = sub.topic
        if result.end > topic.end:
            topic.end = result.end
        if redelivery:
            message = result.messages[0] if result.messages else None
            if message is None or message.position != position:
                # Trimmed by retention before it could be delivered again.
                for message_id, held in list(sub.unacked.items()):
                    if held == position:
                        del sub.unacked[message_id]
                        sub.session.outstanding.pop(message_id, None)
                sub.acked.add(position)
                sub.attempts.pop(position, None)
                self._to_commit[id(sub)] = sub
            else:
                sub.unacked.pop(message.message_id, None)
                self._deliver_durable(sub, position, message.message_id, message.payload)
            self._to_pump[id(sub)] = sub
            return
        if result.first > sub.next_position:
            log.warning(
                "durable subscription %r on topic %r skipped %d messages that retention "
                "removed before it read them",
                sub.name,
                topic.name,
                result.first - sub.next_position,
            )
            # Gone, so done: no gap for them in the acked ranges.
            sub.acked.add_range(sub.next_position, result.first - 1)
            sub.advance(result.first)
            self._to_commit[id(sub)] = sub
        for message in result.messages:
            # Positions acked in an earlier session were skipped by advance().
            if message.position < sub.next_position:
                continue
            if message.position > sub.next_position or sub.credit <= 0:
                break
            self._deliver_durable(sub, message.position, message.message_id, message.payload)
            sub.advance(message.position + 1)
        self._to_pump[id(sub)] = sub

    def _read_failed(self, sub: DurableSub) -> None:
        sub.reading = False
        log.error(
            "durable subscription %r on topic %r: reading the log failed", sub.name, sub.topic.name
        )

    def _commit_cursors(self) -> None:
        subs = self._to_commit
        self._to_commit = {}
        batch = _CursorBatch()
        for sub in subs.values():
            # One commit per subscription per loop iteration, however many acks it
            # got: the floor and the acked ranges above it, pruned to the floor.
            floor = sub.floor
            acked = sub.acked
            if acked:
                floor = acked.skip(floor)
                acked.drop_below(floor)
                ranges = acked.ranges()
            else:
                ranges = ()
            if floor == sub.committed and ranges == sub.committed_acked and not sub.ack_waiters:
                continue
            batch.commits.append(CursorCommit(sub.topic.name, sub.name, floor, ranges))
            batch.subs.append(sub)
            batch.waiters.append(sub.ack_waiters)
            sub.ack_waiters = []
            sub.committed = floor
            sub.committed_acked = ranges
        if batch.commits:
            self._call(
                "commit_cursors",
                lambda store: store.commit_cursors(batch.commits),
                lambda results: self._cursors_committed(batch, results),
                lambda exc: self._cursors_committed(
                    batch, [StoreFailure.STORAGE_ERROR] * len(batch.commits)
                ),
            )

    def _cursors_committed(self, batch: _CursorBatch, results: list[StoreFailure | None]) -> None:
        for sub, waiters, failure in zip(batch.subs, batch.waiters, results, strict=True):
            session = sub.session
            if failure is not None:
                # The store kept its earlier state: the next commit must be written
                # even if nothing changes before it.
                sub.committed = -1
            for slot, rid, message_id in waiters:
                if failure is None:
                    frame = encode_ack(rid, message_id)
                else:
                    frame = encode_error(
                        ErrorCode(failure.value),
                        f"the ack was not recorded: {STORE_TEXT[failure]}",
                        rid,
                        message_id,
                    )
                self._fill(session, slot, frame)

    # ------------------------------------------------------------------
    # Ending subscriptions

    def _end(self, sub: Subscription, *, commit: bool = True) -> None:
        """Tear down ``sub`` (already removed from its session's ``subs``)."""
        session = sub.session
        if type(sub) is PlainSub:
            sub.topic.subscribers.pop(session.id, None)
        elif type(sub) is QueueConsumer:
            sub.active = False
            queue = sub.queue
            queue.remove(sub)
            for message_id, holder in list(session.outstanding.items()):
                if holder is sub:
                    del session.outstanding[message_id]
            self._call(
                "release",
                lambda store: store.release(queue.name, sub.consumer_id),
                lambda count: self._released(queue, count),
                lambda exc: self._released(queue, 1),
            )
        else:
            assert type(sub) is DurableSub
            sub.active = False
            sub.topic.durables.pop(sub.name, None)
            for message_id in sub.unacked:
                session.outstanding.pop(message_id, None)
            if commit and sub.attached:
                self._to_commit[id(sub)] = sub
            else:
                # The cursor is being deleted (or never opened): acks waiting for its
                # next commit are answered now, there is nothing left to record.
                self._to_commit.pop(id(sub), None)
                for slot, rid, message_id in sub.ack_waiters:
                    self._fill(session, slot, encode_ack(rid, message_id))
                sub.ack_waiters = []

    # ------------------------------------------------------------------
    # Status

    def _status(self, stats: StoreStats, rid: JsonScalar, now: float) -> bytes:
        queues: dict[str, dict[str, Any]] = {}
        # A queue the store has never held a message of still shows while it has
        # consumers: someone is waiting on it.
        queue_names = set(stats.queues) | {n for n, q in self._queues.items() if q.consumers}
        for name in sorted(queue_names):
            queue_stats = stats.queues.get(name)
            queue = self._queues.get(name)
            queues[name] = {
                "depth": queue_stats.ready if queue_stats else 0,
                "unacked": queue_stats.in_flight if queue_stats else 0,
                "consumers": len(queue.consumers) if queue else 0,
                "bytes": queue_stats.bytes if queue_stats else 0,
                "published": queue.published if queue else 0,
                "delivered": queue.delivered if queue else 0,
                "acked": queue.acked if queue else 0,
                "dead_lettered": queue.dead_lettered if queue else 0,
            }
        topics: dict[str, dict[str, Any]] = {}
        names = sorted(set(stats.topics) | {n for n, t in self._topics.items() if t.subscribers})
        for name in names:
            topic_stats = stats.topics.get(name)
            topic = self._topics.get(name)
            durable: dict[str, dict[str, Any]] = {}
            end = topic_stats.end if topic_stats else 0
            if topic_stats is not None:
                for cursor, position in sorted(topic_stats.cursors.items()):
                    attached = topic.durables.get(cursor) if topic else None
                    acked = topic_stats.cursors_acked.get(cursor, 0)
                    durable[cursor] = {
                        "online": attached is not None,
                        "position": position,
                        "acked_ahead": acked,
                        "pending": max(0, end - position - acked),
                    }
            topics[name] = {
                "subscribers": len(topic.subscribers) if topic else 0,
                "durable": durable,
                "retained": topic_stats.retained if topic_stats else 0,
                "bytes": topic_stats.bytes if topic_stats else 0,
                "published": topic.published if topic else 0,
                "delivered": topic.delivered if topic else 0,
            }
        reply: dict[str, Any] = {"type": "status"}
        if rid is not None:
            reply["id"] = rid
        counters = self.counters
        reply.update(
            {
                **self._info,
                "uptime": round(now - self._started, 3),
                "connections": len(self._sessions),
                "read_only": stats.read_only.value if stats.read_only else None,
                "rates": self.rates.as_dict(),
                "totals": {
                    "published": counters.published,
                    "delivered": counters.delivered,
                    "acked": counters.acked,
                    "nacked": counters.nacked,
                    "dead_lettered": counters.dead_lettered,
                    "rejected": counters.rejected,
                    "errors": counters.errors,
                    "connections": counters.connections,
                },
                "queues": queues,
                "topics": topics,
            }
        )
        return encode_reply(reply)

    # ------------------------------------------------------------------
    # Helpers

    def _reject(
        self,
        session: Session,
        code: ErrorCode,
        text: str,
        rid: JsonScalar,
        message_id: str | None = None,
        *,
        reply: bool = True,
    ) -> None:
        self.counters.errors += 1
        session.out.send(encode_error(code, text, rid, message_id, reply))

    def _fill(self, session: Session, slot: Slot, frame: bytes) -> None:
        if not session.closed:
            session.out.fill(slot, frame)
            self._dirty[session.id] = session

    def _call(
        self,
        name: str,
        run: Callable[[Store], Any],
        done: Callable[[Any], None],
        failed: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Queue a single (unbatched) store call.

        The store applies calls in order, so a batch opened before this call is closed:
        an item that arrives later must take effect after this call, not before it (a
        publish after a durable subscribe must land after the cursor is opened).
        """
        self._close_batches()
        self._calls.append(StoreCall(name, run, done, failed or _log_failure(name)))

    def _close_batches(self) -> None:
        self._appends = None
        self._claims = None
        self._settles = None

    # Each batch becomes one store call when its first item arrives; later items join
    # it until a single call or the end of the loop iteration closes it.

    def _new_append_batch(self, now: float) -> AppendBatch:
        batch = self._appends = AppendBatch(now)
        self._calls.append(
            StoreCall(
                "append",
                lambda store: store.append(batch.items()),
                lambda results: self._appended(batch, results),
                lambda exc: self._append_failed(batch),
            )
        )
        return batch

    def _new_claim_batch(self) -> _ClaimBatch:
        batch = self._claims = _ClaimBatch()
        self._calls.append(
            StoreCall(
                "claim",
                lambda store: store.claim(batch.claims),
                lambda results: self._claimed(batch, results),
                lambda exc: self._claim_failed(batch),
            )
        )
        return batch

    def _new_settle_batch(self) -> SettleBatch:
        batch = self._settles = SettleBatch()
        self._calls.append(
            StoreCall(
                "settle",
                lambda store: store.settle(batch.items()),
                lambda results: self._settled(batch, results),
                lambda exc: self._settle_failed(batch),
            )
        )
        return batch


def _deliver_all(
    outs: list[Outbound], prefix: bytes, payloads: list[bytes], message_ids: list[str]
) -> None:
    """Queue one delivery frame per message for each of ``outs``, built in C.

    The frames are made once and shared by every subscriber (bytes are immutable).
    """
    if len(message_ids) == 1:
        # A lone publish: one join is a tenth of the cost of the machinery below.
        frame = b"".join((prefix, payloads[0], _ID_HEAD, message_ids[0].encode(), _ID_TAIL))
        for out in outs:
            out.send(frame)
        return
    encoded = "\n".join(message_ids).encode().split(b"\n")
    if len(encoded) != len(message_ids):  # an IdSource that puts newlines in ids
        encoded = [message_id.encode() for message_id in message_ids]
    frames = list(
        map(b"".join, zip(repeat(prefix), payloads, repeat(_ID_HEAD), encoded, repeat(_ID_TAIL)))
    )
    for out in outs:
        if out.held:
            out.held.extend(frames)
        else:
            out.ready += frames


def _run_end(requests: Sequence[Batch], index: int) -> int:
    """Where the run of single :class:`Publish` (or :class:`Ack`) frames that starts at
    ``index`` ends: frames of one kind, and for publishes, all asking for a reply or
    all not (as in a :class:`Publishes` batch)."""
    first = requests[index]
    kind = type(first)
    end = index + 1
    count = len(requests)
    if kind is Publish:
        reply = cast(Publish, first).reply
        while (
            end < count
            and type(requests[end]) is Publish
            and cast(Publish, requests[end]).reply is reply
        ):
            end += 1
    else:
        while end < count and type(requests[end]) is kind:
            end += 1
    return end


def _gather_publishes(frames: Sequence[Batch]) -> Publishes:
    """Single publish frames as one batch."""
    publishes = cast(Sequence[Publish], frames)
    return Publishes(
        [p.topic for p in publishes],
        [p.payload for p in publishes],
        [p.mode for p in publishes],
        [p.id for p in publishes],
        publishes[0].reply,
    )


def _gather_acks(frames: Sequence[Batch]) -> Acks:
    """Single ack frames as one batch."""
    acks = cast(Sequence[Ack], frames)
    return Acks([a.message_id for a in acks], [a.id for a in acks])


def _round_robin(consumers: list[QueueConsumer], limit: int) -> tuple[str, ...]:
    """Claim slots in round-robin order: one per consumer per round, while it has credit.

    Built round by round with list repetition rather than slot by slot: with equal
    credits it is ``ids * credit``, and in general one repetition per distinct credit.
    """
    slots: list[str] = []
    level = 0
    for threshold in sorted({c.credit for c in consumers}):
        ids = [c.consumer_id for c in consumers if c.credit >= threshold]
        slots.extend(ids * (threshold - level))
        level = threshold
        if len(slots) >= limit:
            break
    return tuple(slots[:limit])


def _log_failure(name: str) -> Callable[[BaseException], None]:
    def failed(exc: BaseException) -> None:
        log.error("store call %s failed: %r", name, exc)

    return failed


def _subscribed(request: Subscribe) -> bytes:
    reply: dict[str, Any] = {"type": "ack"}
    if request.id is not None:
        reply["id"] = request.id
    reply["topic"] = request.topic
    reply["mode"] = request.mode.value
    if request.durable is not None:
        reply["durable"] = request.durable
    return encode_reply(reply)


def _unsubscribed(request: Unsubscribe) -> bytes:
    return _subscribed(
        Subscribe(request.topic, request.mode, durable=request.durable, id=request.id)
    )


def _storage_error(rid: JsonScalar, what: str) -> bytes:
    return encode_error(ErrorCode.STORAGE_ERROR, f"{what}: the store failed", rid)


# One handler per request type: adding an action to the protocol means one entry here
# (and a frame and a parser in msg.protocol).
_HANDLERS: Final[Mapping[type, _Handler]] = {
    # Publish is handled by Router._publish_many, many at a time (see Router.handle).
    Subscribe: Router._on_subscribe,
    Unsubscribe: Router._on_unsubscribe,
    Ack: Router._on_ack,
    Nack: Router._on_nack,
    Ping: Router._on_ping,
    Status: Router._on_status,
    RequestError: Router._on_error,
}
