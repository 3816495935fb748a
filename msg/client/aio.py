"""The asyncio client.

Theory of operation
-------------------
A :class:`Client` talks to one broker over one TCP connection at a time (a
``_Connection``; a new one after each reconnect, numbered by ``generation``).

Requests. Every request carries an ``id`` the client has never used before (one
counter for the client's lifetime, across connections). Sending is synchronous: the
request is encoded, entered in the connection's ``pending`` table (id -> caller) and
queued for writing in one step, with no ``await`` in between, so a request is either
wholly sent and expected, or not sent at all. Writes queued during one event-loop
iteration go out as one ``write`` (so a thousand concurrent ``publish`` calls cost
one system call, not a thousand); :meth:`Client.publish_many` writes its batch at once
and waits for the socket to drain once. No caller ever waits for one reply before
sending the next request: the broker answers in request order and the client
matches replies by id.

Publishes that ask for no reply. ``publish(..., reply=False)`` and
``publish_many(..., reply=False)`` send ``"reply": false``: the broker stores the
message and sends nothing back, so the call returns once the request is queued for
writing. It still takes an id from the counter (an error names it), but enters
nothing in ``pending``: no reply will come to clear an entry, so the client keeps no
state per message. Errors are still answered, marked ``"reply": false``, and go to
the client's ``error_callback`` as a
:class:`~msg.client.errors.PublishRefusedError`, never to a waiting caller. The
broker answers in request order, so the reply to any later request means every
earlier no-reply publish has been handled: :meth:`Client.flush` is a ``ping`` for
that. With no reply to wait for, nothing else would pace a loop of them (and one
whose calls never suspend would never let the queued writes go out): so each first
waits, while the transport's write buffer is over its high-water mark, for the
socket to take it, and queued requests are written once they reach ``_FLUSH_BYTES``
rather than at the end of the loop iteration. Such a loop buffers at most about the
high-water mark plus ``_FLUSH_BYTES``.

Replies. One reader task per connection reads the socket, cuts lines with the
protocol's :class:`~msg.protocol.codec.LineBuffer`, decodes each with
:func:`~msg.protocol.codec.decode_reply`, and either routes a delivery
(``"type": "message"``) to its :class:`Subscription` by ``(mode, topic)``, or pops
the reply's id from ``pending`` and resolves that caller's future. A reply without
an id (the broker could not read the request, e.g. a line over its size limit) is
the answer to the oldest pending request, since replies come in request order. A
reply marked ``"reply": false`` is never matched with ``pending``.

Cancellation safety. A caller that is cancelled (or times out) while waiting leaves
its ``pending`` entry in place: its reply will still arrive, be matched by its own
id, and be dropped. A reply can therefore never be handed to another caller, which is
the bug redis-py's async client had to fix by dropping the connection. Any exception
in the reader itself (a malformed line, a bug) does drop the connection, since what
follows it can no longer be trusted.

Flow control
------------
Each subscription queues the messages the reader hands it until the application
takes them.

- Manual acks (queues, durable subscriptions): the broker sends at most ``prefetch``
  unacked messages, so the queue is bounded by the broker, and the reader never holds
  back for it.
- Auto acks: the broker counts a message as done once it is written, so only the
  client can bound the queue: ``max_pending`` messages (default 65,536). When a
  subscription is full, the reader stops reading the socket, and TCP pushes back on
  the broker: it stops handing out queue and durable messages (they stay stored), and
  it buffers plain pub/sub messages up to its slow-consumer limit (then it drops the
  connection, and the client reconnects).

  Holding the reader back can deadlock: a task awaiting a reply (say, the ack of a
  ``publish`` made while handling a message) or waiting on *another* subscription
  needs the reader to get past the deliveries in front of what it waits for, while
  the full subscription may only be drained after that task is done. So the reader
  holds back only while nobody waits on the connection. While someone does, it keeps
  reading, and messages for a full auto-ack subscription are dropped, counted, and
  reported by the subscription's next ``next()`` as a
  :class:`~msg.client.errors.SlowConsumerError` (as nats.py does). Dropping is within
  auto-ack's at-most-once contract; applications that must not lose messages use
  manual acks, where this never happens. The large default limit makes drops a sign
  of a consumer that is persistently slower than its producers, not of a burst.

Reconnect
---------
With ``reconnect=True`` (the default), losing the connection starts a reconnect
task: attempts are spaced by a :class:`~msg.client.backoff.Backoff`; each opens a
socket, checks with a ``ping`` that the peer is a msg broker, and re-subscribes every
live subscription in the same write (durable ones resume from their stored cursor;
``durable_in_use``, seen while the broker has not yet noticed the old connection is
gone, fails the attempt a few times before the subscription is given up). Requests
that were in flight fail with :class:`~msg.errors.ConnectionClosedError`: whether the
broker acted on them is unknown. So are no-reply publishes sent after the last reply
the lost connection brought: nobody waits on them, so nothing fails, but the next
:meth:`Client.flush` raises ``ConnectionClosedError`` to say some may be lost.
Requests made while reconnecting wait for the new connection (within their
``request_timeout``). Manual-ack messages from the old connection are gone from the
broker's point of view: those still queued are discarded (the broker delivers them
again), and acking one already taken raises
:class:`~msg.client.errors.StaleMessageError`. After ``max_reconnect_attempts``
failures in a row the client closes, and its subscriptions end with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Final, Literal, overload

from msg import jsonlib
from msg.client.backoff import Backoff
from msg.client.errors import (
    BatchPublishError,
    ConnectFailedError,
    ConnectionClosedError,
    MsgError,
    PublishRefusedError,
    RemoteError,
    RequestTimeoutError,
    StaleMessageError,
)
from msg.client.subscription import DEFAULT_MAX_PENDING, Message, Subscription
from msg.errors import ProtocolError
from msg.protocol.codec import LineBuffer, LineTooLong, decode_reply, encode_request
from msg.protocol.codes import ErrorCode
from msg.protocol.frames import AckMode, Mode

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_MAX_RECONNECT_ATTEMPTS",
    "DEFAULT_PORT",
    "DEFAULT_REQUEST_TIMEOUT",
    "Client",
]

log = logging.getLogger(__name__)

DEFAULT_HOST: Final = "localhost"
"""The broker's default interface."""
DEFAULT_PORT: Final = 8888
"""The broker's default port (the seed's examples use it)."""
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
"""Seconds for opening a connection and its handshake. nats.py allows 2 s; a bit more
covers a broker that is busy recovering its logs at start-up."""
DEFAULT_REQUEST_TIMEOUT: Final = 10.0
"""Seconds a request may wait for its reply (including a reconnect in between). An
ack waits for an fsync, which a loaded disk can stretch to seconds; nats.py and
redis-py use none or a few seconds."""
DEFAULT_MAX_RECONNECT_ATTEMPTS: Final = 60
"""nats.py's default: with the default backoff, about five minutes of trying."""

# One read's worth: the asyncio streams default; a full read carries hundreds of
# small deliveries, which the reader handles in one pass.
_READ_BYTES: Final = 64 * 1024
# The longest line accepted from the broker. Deliveries are at most the broker's
# max_message_bytes (1 MiB by default, configurable); a status reply grows with the
# number of queues. 64 MiB matches the broker's own slow-consumer limit: a single line
# longer than that means the peer is broken, not busy.
_MAX_REPLY_BYTES: Final = 64 * 1024 * 1024
# Bytes of no-reply requests queued before they are written at once rather than at the
# end of the loop iteration: a loop of them that never yields would otherwise queue
# without bound. asyncio's default write-buffer high-water mark; a write that size is
# already large enough that one more system call per chunk costs nothing noticeable.
_FLUSH_BYTES: Final = 64 * 1024
# How many consecutive reconnect attempts may fail on durable_in_use before the
# subscription is given up: the broker notices a dead connection within a round trip
# or two when the network is up; a longer conflict is another client using the name.
_MAX_IN_USE_ATTEMPTS: Final = 3

AckArg = AckMode | Literal["auto", "manual"]
Reply = dict[str, Any]
ErrorCallback = Callable[[PublishRefusedError], object]


class _Call:
    """The callers' side of one or more requests sent together: resolved when every
    reply has arrived, or failed when the connection is lost first.

    ``on_done`` runs the moment that happens, before the caller resumes: the reader
    may go on with the same chunk of input, and must already know that this caller
    no longer waits on it (see _room_for).
    """

    __slots__ = ("future", "on_done", "remaining", "replies")

    def __init__(
        self,
        future: asyncio.Future[list[Reply]] | None,
        count: int,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        # future None: fire and forget (the replies are read and dropped).
        self.future = future
        self.on_done = on_done
        self.replies: list[Reply] = [{}] * count
        self.remaining = count

    def resolve(self, index: int, reply: Reply) -> None:
        future = self.future
        if future is None or future.done():
            return  # its caller was cancelled or timed out: the reply is dropped
        self.replies[index] = reply
        self.remaining -= 1
        if self.remaining == 0:
            future.set_result(self.replies)
            if self.on_done is not None:
                self.on_done()

    def fail(self, error: BaseException) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_exception(error)
            if self.on_done is not None:
                self.on_done()


class _Connection:
    """One TCP connection: its writer, its reader task, its pending requests."""

    def __init__(
        self,
        client: Client,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        generation: int,
    ) -> None:
        self.client = client
        self.reader = reader
        self.writer = writer
        self.generation = generation
        self.alive = True
        self.pending: dict[int, tuple[_Call, int]] = {}
        """Request id -> (call, index in the call). Insertion order is request order."""
        self.farewell: Reply | None = None
        """An error the broker sent about the connection itself (before closing it)."""
        # Ids are taken and written in one step, so on one connection they rise in
        # write order; replies come in request order. So every no-reply request is
        # accounted for once a reply with an id at least ``unreplied`` has come.
        self.unreplied = 0
        """The id of the latest no-reply request written on this connection."""
        self.answered = 0
        """The highest request id that a reply has come for."""
        self._out: list[bytes] = []
        self._out_bytes = 0
        """Bytes of no-reply requests in ``_out`` (see _FLUSH_BYTES)."""
        self._flush_handle: asyncio.Handle | None = None
        self.task = asyncio.create_task(
            self._read_loop(), name=f"msg-client-reader-{client.address}-{generation}"
        )

    # -- writing ------------------------------------------------------------------

    def send(self, ids: list[int], lines: list[bytes], call: _Call, *, now: bool) -> None:
        """Expect replies to ``ids`` and queue ``lines``, all in one step (no await)."""
        if not self.alive:
            raise ConnectionClosedError(f"the connection to {self.client.address} is closed")
        pending = self.pending
        for index, rid in enumerate(ids):
            pending[rid] = (call, index)
        self._queue(lines, now=now)

    def post(self, lines: list[bytes], last_id: int, *, now: bool) -> None:
        """Queue requests that ask for no reply (nothing enters ``pending``);
        ``last_id`` is the highest of their ids."""
        if not self.alive:
            raise ConnectionClosedError(f"the connection to {self.client.address} is closed")
        self.unreplied = last_id
        self._out_bytes += len(lines[0]) if len(lines) == 1 else sum(map(len, lines))
        self._queue(lines, now=now or self._out_bytes >= _FLUSH_BYTES)

    def _queue(self, lines: list[bytes], *, now: bool) -> None:
        """Add ``lines`` to what goes out: now, or at the end of this loop iteration."""
        self._out.extend(lines)
        if now:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def congested(self) -> bool:
        """Whether the transport holds bytes the socket has not taken (then ``drain``
        may have to wait)."""
        return self.writer.transport.get_write_buffer_size() > 0

    def flush(self) -> None:
        """Write everything queued, in one write."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._out and self.alive:
            out = self._out
            self._out = []
            self._out_bytes = 0
            self.writer.write(out[0] if len(out) == 1 else b"".join(out))

    async def drain(self) -> None:
        """Wait until the socket takes more (a lost connection is the reader's news)."""
        with contextlib.suppress(OSError):
            await self.writer.drain()

    # -- reading ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        client = self.client
        routes = client._subs
        generation = self.generation
        lines = LineBuffer(_MAX_REPLY_BYTES)
        read = self.reader.read
        reason: BaseException | None = None
        try:
            while True:
                data = await read(_READ_BYTES)
                if not data:
                    break
                for line in lines.feed(data):
                    if isinstance(line, LineTooLong):
                        raise ProtocolError(
                            ErrorCode.TOO_LARGE,
                            f"the broker sent a line longer than {_MAX_REPLY_BYTES} bytes",
                        )
                    try:
                        reply = decode_reply(line)
                    except ValueError as exc:
                        raise ProtocolError(
                            ErrorCode.BAD_JSON,
                            f"the broker sent something that is not a reply: {exc}",
                        ) from exc
                    if reply["type"] != "message":
                        self._on_reply(reply)
                        continue
                    sub = routes.get((reply.get("mode", ""), reply.get("topic", "")))
                    if sub is None:
                        continue  # unsubscribed while this was on its way
                    if sub._full():
                        await client._room_for(sub)
                    try:
                        sub._put(reply, generation)
                    except (KeyError, ValueError, TypeError) as exc:
                        raise ProtocolError(
                            ErrorCode.BAD_REQUEST,
                            f"malformed delivery from the broker: {reply!r:.200}",
                        ) from exc
        except asyncio.CancelledError:
            reason = ConnectionClosedError("the client closed the connection")
            raise
        except (OSError, ProtocolError) as exc:
            reason = exc
        except Exception as exc:
            # A bug on this side. Whatever state the connection is in cannot be trusted
            # (a reply might be half-handled), so drop it; reconnecting starts clean.
            log.exception("client connection %s#%d: internal error", client.address, generation)
            reason = exc
        finally:
            self._finish(reason)

    def _on_reply(self, reply: Reply) -> None:
        pending = self.pending
        rid = reply.get("id")
        if reply.get("reply") is False:
            # The answer to a request that asked for none (an error): never a pending
            # caller's, which it would be taken for below if it had no id.
            if type(rid) is int and rid > self.answered:
                self.answered = rid
            self.client._refused(reply)
            return
        if rid is None:
            if not pending:
                # Not an answer to anything: the broker says why it is about to close
                # this connection (shutting down, too many connections).
                self.farewell = reply
                log.info("broker %s: %s", self.client.address, reply.get("error", reply))
                return
            rid = next(iter(pending))  # replies come in request order: the oldest one
        entry = pending.pop(rid, None)
        if entry is None:
            log.debug("client %s: reply to unknown request id %r", self.client.address, rid)
            return
        if rid > self.answered:
            self.answered = rid
        call, index = entry
        call.resolve(index, reply)

    def _finish(self, reason: BaseException | None) -> None:
        """The connection is over: fail what waits on it, tell the client."""
        if not self.alive:
            return
        self.alive = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._out.clear()
        self._out_bytes = 0
        detail = _describe(reason, self.farewell)
        if self.unreplied > self.answered:
            self.client._unreplied_lost(detail)
        calls = {id(call): call for call, _ in self.pending.values()}
        self.pending.clear()
        for call in calls.values():
            error = ConnectionClosedError(
                f"connection to {self.client.address} lost ({detail}) before the reply "
                "came; whether the broker acted on the request is unknown"
            )
            error.__cause__ = reason
            call.fail(error)
        self.writer.close()
        self.client._connection_lost(self, reason, detail)

    # -- closing ------------------------------------------------------------------

    async def close(self, grace: float) -> None:
        """Close politely: half-close, let the broker answer what it owes and close
        its side (at most ``grace`` seconds), then close ours."""
        try:
            if self.alive and grace > 0:
                self.flush()
                try:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                except OSError:
                    pass
                else:
                    await asyncio.wait([self.task], timeout=grace)
        finally:
            self.task.cancel()
            self.writer.close()
        await asyncio.wait([self.task])
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    def abort(self) -> None:
        """Drop the connection now (a failed handshake)."""
        self.task.cancel()
        self.writer.transport.abort()


class Client:
    """An asyncio client for a msg broker.

    ::

        async with await Client.connect("localhost", 8888) as client:
            message_id = await client.publish("news", {"title": "hello"})
            async with await client.subscribe("jobs", queue=True, ack="manual") as jobs:
                async for job in jobs:
                    ...
                    await job.ack()

    ``Client(...)`` only records the options; :meth:`connect` (or ``async with
    Client(...)``) opens the connection. All options are keyword-only:

    - ``connect_timeout`` (5 s): opening a connection and its handshake.
    - ``request_timeout`` (10 s; None: no limit): how long a request may wait for its
      reply, including any reconnect in between; then
      :class:`~msg.errors.RequestTimeoutError`.
    - ``reconnect`` (True): reconnect when the connection drops (see the module
      docstring); False: the client closes instead.
    - ``max_reconnect_attempts`` (60; None: forever): consecutive failed attempts
      before giving up.
    - ``backoff``: the delay between attempts (default :class:`Backoff`()).
    - ``error_callback`` (None: log a warning): called with a
      :class:`~msg.client.errors.PublishRefusedError` when the broker refuses a
      publish sent with ``reply=False``. It runs in the connection's reader, so it
      must return quickly and not block (start a task for anything slow); what it
      raises is logged and otherwise ignored.

    The first connection is not retried: if it fails, :meth:`connect` raises
    :class:`~msg.client.errors.ConnectFailedError`.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
        reconnect: bool = True,
        max_reconnect_attempts: int | None = DEFAULT_MAX_RECONNECT_ATTEMPTS,
        backoff: Backoff | None = None,
        error_callback: ErrorCallback | None = None,
    ) -> None:
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be positive")
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError("request_timeout must be positive or None")
        if max_reconnect_attempts is not None and max_reconnect_attempts < 0:
            raise ValueError("max_reconnect_attempts must be >= 0 or None")
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.reconnect = reconnect
        self.max_reconnect_attempts = max_reconnect_attempts
        self.backoff = backoff if backoff is not None else Backoff()
        self.error_callback = error_callback
        """Called with each refused no-reply publish (None: logged as a warning)."""
        self.reconnects = 0
        """How many times the client has reconnected."""
        self._state: Literal["new", "open", "closing", "closed"] = "new"
        self._conn: _Connection | None = None
        self._generation = 0
        self._ids = itertools.count(1)
        self._subs: dict[tuple[str, str], Subscription] = {}
        self._connected = asyncio.Event()
        """Set while there is a usable connection, or once the client is closed."""
        self._final_error: BaseException | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._in_use_failures = 0
        # Connections lost with no-reply publishes unaccounted for, since the last
        # flush() that reported them.
        self._unreplied_losses = 0
        # Flow control (see the module docstring): how many callers wait on the
        # connection, and the subscription the reader holds back for, if any.
        self._waiters = 0
        self._held_for: Subscription | None = None
        self._gate = asyncio.Event()

    @classmethod
    async def connect(
        cls,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
        reconnect: bool = True,
        max_reconnect_attempts: int | None = DEFAULT_MAX_RECONNECT_ATTEMPTS,
        backoff: Backoff | None = None,
        error_callback: ErrorCallback | None = None,
    ) -> Client:
        """Connect to the broker at ``host``:``port``; see the class for the options."""
        client = cls(
            host,
            port,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            reconnect=reconnect,
            max_reconnect_attempts=max_reconnect_attempts,
            backoff=backoff,
            error_callback=error_callback,
        )
        await client._start()
        return client

    async def __aenter__(self) -> Client:
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def address(self) -> str:
        """``host:port`` of the broker."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        """Whether a connection is open right now (False while reconnecting)."""
        return self._conn is not None and self._conn.alive

    @property
    def closed(self) -> bool:
        """Whether the client is closed (by :meth:`close`, or after giving up)."""
        return self._state == "closed"

    def __repr__(self) -> str:
        state = "connected" if self.connected else self._state
        return f"<Client {self.address} {state}>"

    # -- requests -----------------------------------------------------------------

    @overload
    async def publish(
        self, topic: str, message: Any, *, queue: bool = False, reply: Literal[True] = True
    ) -> str: ...
    @overload
    async def publish(
        self, topic: str, message: Any, *, queue: bool = False, reply: Literal[False]
    ) -> None: ...
    @overload
    async def publish(
        self, topic: str, message: Any, *, queue: bool = False, reply: bool
    ) -> str | None: ...
    async def publish(
        self, topic: str, message: Any, *, queue: bool = False, reply: bool = True
    ) -> str | None:
        """Publish ``message`` (any JSON value) to a topic, or to a queue if ``queue``.

        Returns the message id once the broker has stored the message. Concurrent
        calls share the connection without waiting for each other's acks.

        ``reply=False`` asks the broker for no reply: returns None as soon as the
        request is queued for writing (after waiting, within ``request_timeout``, for a
        connection while reconnecting, or for the socket to take what is already
        queued; a :class:`~msg.errors.RequestTimeoutError` then means nothing was
        sent). The message is stored and delivered like any other. If the broker
        refuses it, the error goes to the client's ``error_callback``; :meth:`flush`
        waits until every such publish has been handled. If the connection is lost
        first, whether the broker got it is unknown (the next :meth:`flush` says so).
        """
        if not reply:
            await self._post(lambda ids: [_publish_line(ids[0], topic, message, queue, False)], 1)
            return None
        (answer,) = await self._exchange(
            lambda ids: [_publish_line(ids[0], topic, message, queue)], 1
        )
        return _message_id(answer)

    @overload
    async def publish_many(
        self,
        topic: str,
        messages: Iterable[Any],
        *,
        queue: bool = False,
        reply: Literal[True] = True,
    ) -> list[str]: ...
    @overload
    async def publish_many(
        self, topic: str, messages: Iterable[Any], *, queue: bool = False, reply: Literal[False]
    ) -> None: ...
    @overload
    async def publish_many(
        self, topic: str, messages: Iterable[Any], *, queue: bool = False, reply: bool
    ) -> list[str] | None: ...
    async def publish_many(
        self, topic: str, messages: Iterable[Any], *, queue: bool = False, reply: bool = True
    ) -> list[str] | None:
        """Publish every message of ``messages`` in one write; return their ids in order.

        The batch is pipelined: all requests are written at once, then the client
        waits for the socket to drain once and for every ack. ``request_timeout``
        applies to the whole batch. If the broker refuses some, raises
        :class:`~msg.client.errors.BatchPublishError`, whose ``results`` say which
        were stored.

        ``reply=False``: as for :meth:`publish`, the batch is written at once and the
        call returns None; refusals go to ``error_callback``, one per message.
        """
        items = list(messages)
        if not reply:
            if items:
                await self._post(
                    lambda ids: [
                        _publish_line(rid, topic, item, queue, False)
                        for rid, item in zip(ids, items, strict=True)
                    ],
                    len(items),
                    now=True,
                )
            return None
        if not items:
            return []
        replies = await self._exchange(
            lambda ids: [
                _publish_line(rid, topic, item, queue) for rid, item in zip(ids, items, strict=True)
            ],
            len(items),
            now=True,
        )
        results: list[str | RemoteError] = []
        failed = False
        for answer in replies:
            try:
                results.append(_message_id(answer))
            except RemoteError as exc:
                results.append(exc)
                failed = True
        if failed:
            raise BatchPublishError(results)
        return [r for r in results if isinstance(r, str)]

    async def subscribe(
        self,
        topic: str,
        *,
        queue: bool = False,
        ack: AckArg = "auto",
        prefetch: int | None = None,
        durable: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Subscription:
        """Subscribe to a topic (fan-out), or to a queue if ``queue`` (one consumer
        per message).

        - ``ack``: ``"auto"`` (a message is done when sent) or ``"manual"`` (done when
          acked; needs ``queue`` or ``durable``).
        - ``prefetch``: unacked messages the broker may send at once (broker default
          100).
        - ``durable``: pub/sub only; a named cursor on the broker that survives
          disconnects, so a returning subscriber gets what it missed.
        - ``max_pending``: auto-ack only; see "Flow control" in the module docstring.

        Returns once the broker has confirmed the subscription. One connection can
        hold one subscription per topic and mode (``already_subscribed`` otherwise).
        """
        sub = Subscription(
            self,
            topic,
            Mode.QUEUE if queue else Mode.PUBSUB,
            AckMode(ack),
            prefetch,
            durable,
            max_pending,
        )
        key = sub.key
        # Routed before the request is sent: the broker may deliver right after its ack.
        # An existing subscription keeps its route (the broker refuses the duplicate).
        registered = key not in self._subs
        if registered:
            self._subs[key] = sub
        try:
            _checked(await self._request("subscribe", **_subscribe_fields(sub)))
        except BaseException as exc:
            if registered and self._subs.get(key) is sub:
                del self._subs[key]
            sub._close(exc)
            if not isinstance(exc, RemoteError | ConnectionClosedError):
                # Cancelled or timed out: the broker may have subscribed anyway, and
                # would go on delivering (or hold manual messages) for nobody. The undo
                # is answered not_subscribed if it had not; that reply is dropped.
                self._send_and_forget("unsubscribe", topic=topic, mode=_mode_field(sub.mode))
            raise
        sub._live = True
        return sub

    async def unsubscribe(self, subscription: Subscription) -> None:
        """End ``subscription`` (a durable one keeps its cursor on the broker).

        Messages it still holds are discarded; manual-ack ones go back to the broker.
        """
        if subscription.closed:
            return
        if self._subs.get(subscription.key) is subscription:
            del self._subs[subscription.key]
        subscription._close()
        if not self.connected:
            # The broker ended it with the connection, and a reconnect will not restore
            # it (one in its handshake right now undoes it; see _handshake).
            return
        # Losing the connection meanwhile ends the subscription as well; and an error
        # reply (not_subscribed: a reconnect in between did not restore it) is also
        # what was asked for, so the reply is not checked.
        with contextlib.suppress(ConnectionClosedError):
            await self._request(
                "unsubscribe", topic=subscription.topic, mode=_mode_field(subscription.mode)
            )

    async def delete_durable(self, topic: str, name: str) -> None:
        """Delete the durable subscription ``name`` on ``topic`` and its cursor.

        Ends it first if this client holds it. Raises :class:`~msg.errors.RemoteError`
        (``not_subscribed``) if there is no such durable subscription, and
        (``durable_in_use``) if another connection holds it.
        """
        sub = self._subs.get((Mode.PUBSUB.value, topic))
        if sub is not None and sub.durable == name:
            del self._subs[sub.key]
            sub._close()
        _checked(await self._request("unsubscribe", topic=topic, durable=name))

    async def ack(self, message_id: str) -> None:
        """Ack a manual-ack message by id (see also :meth:`Message.ack`)."""
        _checked(await self._request("ack", message_id=message_id))

    async def nack(self, message_id: str, requeue: bool = True, reason: str | None = None) -> None:
        """Give a message back by id: deliver it again, or (``requeue=False``) move it
        to the dead-letter queue ``$dead.<queue>``, with ``reason`` kept with it."""
        fields: dict[str, Any] = {"message_id": message_id, "requeue": requeue}
        if reason is not None:
            fields["reason"] = reason
        _checked(await self._request("nack", **fields))

    async def ping(self) -> float:
        """Round trip to the broker; returns the seconds it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = _checked(await self._request("ping"))
        if reply["type"] != "pong":
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"expected a pong, got {reply!r:.200}")
        return loop.time() - started

    async def flush(self) -> None:
        """Return once the broker has handled every request this client sent before.

        A ``ping`` round trip: the broker answers in request order, so by its reply
        every earlier publish sent with ``reply=False`` is stored (as durably as the
        broker's fsync policy makes any publish before its ack) or its error has gone
        to ``error_callback``. Raises :class:`~msg.errors.ConnectionClosedError` if,
        since the previous flush, a connection was lost while some no-reply publishes
        on it were not yet accounted for: whether those were stored is unknown.
        """
        await self.ping()
        lost, self._unreplied_losses = self._unreplied_losses, 0
        if lost:
            raise ConnectionClosedError(
                f"the connection to {self.address} was lost ({lost} times since the "
                "previous flush) with publishes sent with reply=False in flight; whether "
                "the broker stored them is unknown"
            )

    async def status(self) -> dict[str, Any]:
        """The broker's status reply: version, uptime, connections, rates, totals,
        and per queue and topic their depth, consumers and counters."""
        reply = _checked(await self._request("status"))
        if reply["type"] != "status":
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"expected a status, got {reply!r:.200}")
        return reply

    async def close(self) -> None:
        """Close the client: end subscriptions, let the broker answer requests already
        sent (up to ``connect_timeout``), close the connection. Idempotent."""
        if self._state in ("closing", "closed"):
            return
        self._state = "closing"
        task = self._reconnect_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        for sub in list(self._subs.values()):
            sub._close()
        self._subs.clear()
        conn = self._conn
        try:
            if conn is not None:
                await conn.close(self.connect_timeout)
        finally:
            self._terminate(None)

    # -- internals: settling messages ------------------------------------------------

    async def _settle(self, message: Message, action: str, **fields: Any) -> None:
        if message.subscription.ack is AckMode.AUTO:
            raise ValueError(
                f"message {message.message_id} came with ack='auto': the broker counted it "
                "as done when it sent it; there is nothing to ack or nack"
            )
        conn = self._conn
        if conn is None or not conn.alive or conn.generation != message.generation:
            raise StaleMessageError(message.message_id)
        replies = await self._exchange(
            lambda ids: [
                # The id last: a run of acks then differs only in its last values,
                # which the broker reads fastest (docs/protocol.md).
                encode_request(action, message_id=message.message_id, **fields, id=ids[0])
            ],
            1,
            settling=message,
        )
        _checked(replies[0])

    # -- internals: requests -----------------------------------------------------------

    async def _request(self, action: str, **fields: Any) -> Reply:
        replies = await self._exchange(lambda ids: [encode_request(action, id=ids[0], **fields)], 1)
        return replies[0]

    async def _exchange(
        self,
        build: Callable[[list[int]], list[bytes]],
        count: int,
        *,
        now: bool = False,
        settling: Message | None = None,
    ) -> list[Reply]:
        """Send ``count`` requests built by ``build(ids)`` and return their replies.

        ``settling``: an ack or nack of that message, which only the connection that
        delivered it may send.
        """
        scope = asyncio.timeout(self.request_timeout)
        try:
            async with scope:
                conn = await self._connection()
                if settling is not None and conn.generation != settling.generation:
                    raise StaleMessageError(settling.message_id)
                ids = list(itertools.islice(self._ids, count))
                lines = build(ids)  # may raise (a value JSON cannot hold): nothing sent yet
                future: asyncio.Future[list[Reply]] = asyncio.get_running_loop().create_future()
                conn.send(ids, lines, _Call(future, count, self._wait_ends), now=now)
                self._wait_begins()
                try:
                    if now:
                        await conn.drain()
                    return await future
                finally:
                    if not future.done():
                        # Cancelled or timed out: the reply will be dropped on arrival.
                        future.cancel()
                    if future.cancelled():
                        self._wait_ends()  # else the call did, when it completed
        except TimeoutError:
            if scope.expired():
                raise RequestTimeoutError(
                    f"no reply from {self.address} within {self.request_timeout} s"
                ) from None
            raise

    async def _post(
        self, build: Callable[[list[int]], list[bytes]], count: int, *, now: bool = False
    ) -> None:
        """Queue ``count`` requests built by ``build(ids)`` that ask for no reply.

        Waits (within ``request_timeout``) for a connection, and for the socket to
        take what is already queued when the transport's buffer is full: nothing else
        paces a loop of these (see the module docstring).
        """
        scope = asyncio.timeout(self.request_timeout)
        try:
            async with scope:
                conn = await self._connection()
                if conn.congested():
                    # Counted as a waiter, so the reader goes on reading meanwhile (see
                    # _room_for): the broker may be waiting to write to this client
                    # before it reads more.
                    self._wait_begins()
                    try:
                        await conn.drain()  # returns at once unless the buffer is full
                    finally:
                        self._wait_ends()
                    conn = await self._connection()  # lost meanwhile: the next one
                ids = list(itertools.islice(self._ids, count))
                lines = build(ids)  # may raise (a value JSON cannot hold): nothing sent yet
                conn.post(lines, ids[-1], now=now)
        except TimeoutError:
            if scope.expired():
                raise RequestTimeoutError(
                    f"could not send to {self.address} within {self.request_timeout} s "
                    "(no connection, or the broker is not reading); nothing was sent"
                ) from None
            raise

    def _refused(self, reply: Reply) -> None:
        """Reader: the broker refused a request that asked for no reply."""
        if reply.get("type") != "error":
            log.debug("client %s: unexpected reply %r", self.address, reply)
            return
        error = PublishRefusedError(
            str(reply.get("code", "unknown")), str(reply.get("error", "")), reply
        )
        callback = self.error_callback
        if callback is None:
            log.warning(
                "client %s: publish (request id %s) refused: %s",
                self.address,
                error.request_id,
                error,
            )
            return
        try:
            callback(error)
        except Exception:
            # The application's bug, not the connection's: the reader goes on.
            log.exception(
                "client %s: error_callback failed on %s (request id %s)",
                self.address,
                error,
                error.request_id,
            )

    def _unreplied_lost(self, detail: str) -> None:
        """A connection was lost with no-reply publishes not yet accounted for."""
        self._unreplied_losses += 1
        if self._state == "open":
            log.warning(
                "client: connection to %s lost (%s) with publishes sent with reply=False "
                "in flight; whether they were stored is unknown",
                self.address,
                detail,
            )

    def _send_and_forget(self, action: str, **fields: Any) -> None:
        conn = self._conn
        if conn is not None and conn.alive:
            self._forget_on(conn, action, **fields)

    def _forget_on(self, conn: _Connection, action: str, **fields: Any) -> None:
        """Send a request whose reply nobody needs (it is read and dropped)."""
        rid = next(self._ids)
        conn.send([rid], [encode_request(action, id=rid, **fields)], _Call(None, 1), now=False)

    async def _connection(self) -> _Connection:
        """The open connection; waits while reconnecting."""
        while True:
            conn = self._conn
            if conn is not None and conn.alive:
                return conn
            if self._state == "new":
                raise MsgError("the client is not connected: use Client.connect() or async with")
            if self._state in ("closing", "closed"):
                error = ConnectionClosedError(f"the client for {self.address} is closed")
                error.__cause__ = self._final_error
                raise error
            await self._connected.wait()

    # -- internals: connecting -----------------------------------------------------------

    async def _start(self) -> None:
        if self._state != "new":
            return
        try:
            conn = await self._open()
        except BaseException as exc:
            self._terminate(exc)
            raise
        self._state = "open"
        self._install(conn)

    async def _open(self) -> _Connection:
        """Open a connection, check it is a msg broker, restore the subscriptions."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:  # TimeoutError included
            what = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            raise ConnectFailedError(f"cannot connect to {self.address}: {what}") from exc
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Requests are already batched per loop iteration; Nagle would only delay them.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._generation += 1
        conn = _Connection(self, reader, writer, self._generation)
        try:
            await self._handshake(conn)
        except BaseException:
            conn.abort()
            await asyncio.wait([conn.task])
            raise
        return conn

    async def _handshake(self, conn: _Connection) -> None:
        subs = [sub for sub in self._subs.values() if sub._live]
        count = 1 + len(subs)

        def build(ids: list[int]) -> list[bytes]:
            lines = [encode_request("ping", id=ids[0])]
            lines += [
                encode_request("subscribe", id=rid, **_subscribe_fields(sub))
                for rid, sub in zip(ids[1:], subs, strict=True)
            ]
            return lines

        scope = asyncio.timeout(self.connect_timeout)
        try:
            async with scope:
                ids = list(itertools.islice(self._ids, count))
                future: asyncio.Future[list[Reply]] = asyncio.get_running_loop().create_future()
                conn.send(ids, build(ids), _Call(future, count, self._wait_ends), now=True)
                # Counted as a waiter, or a full subscription could hold the reader back
                # from the replies (see _room_for).
                self._wait_begins()
                try:
                    replies = await future
                finally:
                    if not future.done():
                        future.cancel()
                    if future.cancelled():
                        self._wait_ends()
        except TimeoutError as exc:
            if scope.expired():
                raise ConnectFailedError(
                    f"{self.address} did not answer within {self.connect_timeout} s"
                ) from exc
            raise
        except ConnectionClosedError as exc:
            raise ConnectFailedError(f"{self.address} closed the connection: {exc}") from exc
        if replies[0].get("type") == "error":
            # An error without an id, before anything else: the broker refuses the
            # connection (too many connections, shutting down).
            raise ConnectFailedError(
                f"{self.address} refused the connection: {_remote_error(replies[0])}"
            )
        if replies[0].get("type") != "pong":
            raise ConnectFailedError(
                f"{self.address} is not a msg broker (it answered a ping with {replies[0]!r:.100})"
            )
        in_use: list[RemoteError] = []
        for sub, reply in zip(subs, replies[1:], strict=True):
            if reply.get("type") == "ack":
                if sub.closed:
                    # Unsubscribed while this handshake was under way: undo it here.
                    self._forget_on(
                        conn, "unsubscribe", topic=sub.topic, mode=_mode_field(sub.mode)
                    )
                continue
            error = _remote_error(reply)
            if (
                error.code == ErrorCode.DURABLE_IN_USE
                and self._in_use_failures < _MAX_IN_USE_ATTEMPTS
            ):
                in_use.append(error)
                continue
            log.warning("client %s: could not restore %r: %s", self.address, sub, error)
            if self._subs.get(sub.key) is sub:
                del self._subs[sub.key]
            sub._close(error)
        if in_use:
            self._in_use_failures += 1
            raise ConnectFailedError(f"could not restore subscriptions: {in_use[0]}")
        self._in_use_failures = 0
        if not conn.alive:
            raise ConnectFailedError(f"{self.address} closed the connection during the handshake")

    def _install(self, conn: _Connection) -> None:
        self._conn = conn
        self._connected.set()

    def _connection_lost(
        self, conn: _Connection, reason: BaseException | None, detail: str
    ) -> None:
        """Called by a connection when it is over (once)."""
        for sub in self._subs.values():
            sub._purge_manual(conn.generation)
        if conn is not self._conn:
            return  # a connection still in its handshake: that attempt fails
        self._conn = None
        self._connected.clear()
        if self._state != "open":
            return
        if self.reconnect:
            log.warning("client: connection to %s lost (%s); reconnecting", self.address, detail)
            task = asyncio.create_task(self._reconnect_loop(), name=f"msg-reconnect-{self.address}")
            task.add_done_callback(_log_task_failure)
            self._reconnect_task = task
        else:
            log.warning("client: connection to %s lost (%s)", self.address, detail)
            error = ConnectionClosedError(f"connection to {self.address} lost ({detail})")
            error.__cause__ = reason
            self._terminate(error)

    async def _reconnect_loop(self) -> None:
        try:
            await self._reconnect()
        except Exception as exc:
            # A bug: without this the client would wait for a connection forever.
            log.exception("client: reconnecting to %s failed unexpectedly", self.address)
            self._terminate(exc)

    async def _reconnect(self) -> None:
        failures = 0
        last: BaseException | None = None
        limit = self.max_reconnect_attempts
        while limit is None or failures < limit:
            # A timer between attempts, not a poll: nothing else can signal the broker
            # is back.
            await asyncio.sleep(self.backoff.compute(failures))
            try:
                conn = await self._open()
            except (ConnectionClosedError, ProtocolError, OSError) as exc:
                failures += 1
                last = exc
                log.info(
                    "client: reconnect attempt %d to %s failed: %s", failures, self.address, exc
                )
                continue
            self.reconnects += 1
            self._install(conn)
            log.info("client: reconnected to %s after %d failed attempts", self.address, failures)
            return
        log.error("client: giving up on %s after %d reconnect attempts", self.address, failures)
        error = ConnectionClosedError(
            f"connection to {self.address} lost; {failures} reconnect attempts failed"
            + (f" (last: {last})" if last else "")
        )
        error.__cause__ = last
        self._terminate(error)

    def _terminate(self, error: BaseException | None) -> None:
        """The client is closed for good; ``error`` is why (None: close())."""
        self._state = "closed"
        self._final_error = error
        for sub in list(self._subs.values()):
            sub._close(error)
        self._subs.clear()
        self._conn = None
        self._connected.set()  # wake requests waiting for a connection: they fail now
        self._gate.set()

    # -- internals: flow control (see the module docstring) -----------------------------

    def _wait_begins(self) -> None:
        self._waiters += 1
        if self._held_for is not None:
            self._gate.set()

    def _wait_ends(self) -> None:
        self._waiters -= 1

    def _subscription_changed(self, sub: Subscription) -> None:
        if self._held_for is sub:
            self._gate.set()

    async def _room_for(self, sub: Subscription) -> None:
        """Reader: hold back while ``sub`` is full, unless someone waits on the socket."""
        self._held_for = sub
        try:
            while sub._full() and self._waiters == 0 and self._state == "open":
                self._gate.clear()
                await self._gate.wait()
        finally:
            self._held_for = None


# -- encoding and decoding helpers ---------------------------------------------------


def _publish_line(rid: int, topic: str, message: Any, queue: bool, reply: bool = True) -> bytes:
    # Not encode_request: it leaves out None-valued fields, and null is a message. The
    # message and the id last (and "reply" before them): a run of publishes then
    # differs only in its last values, which the broker reads fastest
    # (docs/protocol.md).
    request: dict[str, Any] = {"action": "publish", "topic": topic}
    if queue:
        request["mode"] = "queue"
    if not reply:
        request["reply"] = False
    request["message"] = message
    request["id"] = rid
    return jsonlib.dumps(request) + b"\n"


def _mode_field(mode: Mode) -> str | None:
    return "queue" if mode is Mode.QUEUE else None  # pubsub is the protocol's default


def _subscribe_fields(sub: Subscription) -> dict[str, Any]:
    return {
        "topic": sub.topic,
        "mode": _mode_field(sub.mode),
        "ack": "manual" if sub.ack is AckMode.MANUAL else None,
        "prefetch": sub.prefetch,
        "durable": sub.durable,
    }


def _remote_error(reply: Reply) -> RemoteError:
    return RemoteError(str(reply.get("code", "unknown")), str(reply.get("error", "")), reply)


def _checked(reply: Reply) -> Reply:
    if reply.get("type") == "error":
        raise _remote_error(reply)
    return reply


def _message_id(reply: Reply) -> str:
    message_id = _checked(reply).get("message_id")
    if reply.get("type") != "ack" or type(message_id) is not str:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"expected a publish ack, got {reply!r:.200}")
    return message_id


def _describe(reason: BaseException | None, farewell: Reply | None) -> str:
    if farewell is not None:
        return f"the broker closed it: {farewell.get('code')}: {farewell.get('error')}"
    if reason is None:
        return "the broker closed it"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("client task %s failed", task.get_name(), exc_info=task.exception())
