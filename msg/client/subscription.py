"""Subscriptions and the messages they receive.

A :class:`Subscription` is the client-side end of one ``subscribe`` request: a queue
of :class:`Message` objects that the connection's reader task fills and the
application drains with ``async for`` or :meth:`Subscription.next`. It never touches
the socket itself; the client routes each delivery frame to it by ``(mode, topic)``
(the broker allows one subscription per mode and topic per connection).

How full a subscription may get, and what happens then, is described under "Flow
control" in :mod:`msg.client.aio`; the short version: manual-ack subscriptions are
bounded by the broker's prefetch, auto-ack ones by ``max_pending``, at which the
reader pushes back on the broker unless that would deadlock, and only then drops.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from msg.client.errors import (
    ConnectionClosedError,
    ReceiveTimeoutError,
    SlowConsumerError,
    SubscriptionClosedError,
)
from msg.protocol.frames import AckMode, Mode

if TYPE_CHECKING:
    from msg.client.aio import Client

__all__ = ["DEFAULT_MAX_PENDING", "Message", "Subscription"]

# Messages an auto-ack subscription holds before the reader stops reading the socket.
# nats.py allows 512 Ki messages per subscription; msg messages are often larger
# (JSON objects, up to 1 MiB each), so this is smaller, while still covering a burst of
# several seconds at a typical Python consumer's rate.
DEFAULT_MAX_PENDING: Final = 65_536


class Message:
    """One delivered message.

    ``data`` is the published value (any JSON value), ``raw`` the whole delivery frame
    as received. Settle a manual-ack message with :meth:`ack` or :meth:`nack`.
    """

    __slots__ = (
        "attempt",
        "data",
        "durable",
        "generation",
        "message_id",
        "mode",
        "raw",
        "reason",
        "redelivered",
        "subscription",
        "topic",
    )

    def __init__(self, raw: dict[str, Any], subscription: Subscription, generation: int) -> None:
        self.raw = raw
        self.topic: str = raw["topic"]
        self.mode = Mode(raw["mode"])
        self.data: Any = raw.get("message")
        self.message_id: str = raw["message_id"]
        self.redelivered: bool = raw.get("redelivered", False)
        self.attempt: int = raw.get("attempt", 1)
        """1 for the first delivery, 2 for the first redelivery, and so on."""
        self.reason: str | None = raw.get("reason")
        """Why it was dead-lettered (messages of a ``$dead.`` queue whose nack gave one,
        or that reached the broker's delivery limit)."""
        self.durable: str | None = raw.get("durable")
        """The durable subscription's name, for messages delivered through one."""
        self.subscription = subscription
        self.generation = generation
        """Which of the client's connections delivered it (it can be settled only there)."""

    def __repr__(self) -> str:
        return (
            f"<Message {self.message_id} {self.mode.value} {self.topic!r}"
            f"{' attempt ' + str(self.attempt) if self.redelivered else ''}>"
        )

    async def ack(self) -> None:
        """Tell the broker this message is done (manual-ack subscriptions only).

        Raises :class:`~msg.client.errors.StaleMessageError` if the connection that
        delivered it has been lost since (the broker will deliver it again), and
        :class:`~msg.errors.RemoteError` (``unknown_message``) if the broker no longer
        expects it (already settled, or taken back after its ack deadline).
        """
        await self.subscription.client._settle(self, "ack")

    async def nack(self, *, requeue: bool = True, reason: str | None = None) -> None:
        """Give the message back: deliver it again (``requeue``) or dead-letter it, with
        ``reason`` kept with the dead letter (at most 1,000 characters)."""
        fields: dict[str, Any] = {"requeue": requeue}
        if reason is not None:
            fields["reason"] = reason
        await self.subscription.client._settle(self, "nack", **fields)


class Subscription:
    """Messages of one topic or queue, as an async iterator and async context manager.

    ::

        async with await client.subscribe("jobs", queue=True, ack="manual") as sub:
            async for message in sub:
                await handle(message.data)
                await message.ack()

    Leaving the ``async with`` block unsubscribes (a durable subscription keeps its
    cursor). Iteration ends when the subscription is unsubscribed or the client is
    closed; it raises :class:`~msg.errors.ConnectionClosedError` if the connection was
    lost for good (reconnect disabled or given up) and the error reply if the broker
    refused to restore the subscription after a reconnect.
    """

    def __init__(
        self,
        client: Client,
        topic: str,
        mode: Mode,
        ack: AckMode,
        prefetch: int | None,
        durable: str | None,
        max_pending: int,
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.client = client
        self.topic = topic
        self.mode = mode
        self.ack = ack
        self.prefetch = prefetch
        self.durable = durable
        self.max_pending = max_pending
        """Auto-ack only: how many messages may wait here (see the module docstring)."""
        self._live = False
        """Whether the broker has confirmed it (re-subscribes after a reconnect need it)."""
        self.closed = False
        """Whether it has ended (unsubscribed, client closed, or lost for good)."""
        self.dropped_total = 0
        """Messages dropped because this auto-ack subscription was full, ever."""
        self._error: BaseException | None = None
        self._messages: deque[Message] = deque()
        self._dropped = 0
        self._getters: list[asyncio.Future[None]] = []
        # Manual acks: the broker's prefetch already bounds what it sends, and holding
        # back the reader could only delay the replies to the acks that raise it.
        self._bounded = ack is AckMode.AUTO

    @property
    def key(self) -> tuple[str, str]:
        """``(mode, topic)``: what delivery frames are routed by."""
        return (self.mode.value, self.topic)

    @property
    def pending(self) -> int:
        """Messages received and not yet taken by the application."""
        return len(self._messages)

    def __repr__(self) -> str:
        extra = f" durable={self.durable!r}" if self.durable else ""
        state = "closed" if self.closed else f"{len(self._messages)} pending"
        return (
            f"<Subscription {self.mode.value} {self.topic!r}{extra} ack={self.ack.value} {state}>"
        )

    # -- the application's side -------------------------------------------------

    async def next(self, timeout: float | None = None) -> Message:  # noqa: ASYNC109 (nats.py's next_msg API)
        """The next message; wait at most ``timeout`` seconds (None: no limit).

        Raises :class:`~msg.client.errors.ReceiveTimeoutError` when the time is up,
        :class:`~msg.client.errors.SubscriptionClosedError` once the subscription has
        ended normally, and :class:`~msg.client.errors.SlowConsumerError` (once) when
        messages had to be dropped.
        """
        self._report_drops()
        if not self._messages:
            try:
                async with asyncio.timeout(timeout) as scope:
                    await self._wait_for_message()
            except TimeoutError:
                if scope.expired():
                    raise ReceiveTimeoutError(
                        f"no message on {self.topic!r} within {timeout} s"
                    ) from None
                raise
            self._report_drops()
        return self._take()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.next()
        except SubscriptionClosedError:
            raise StopAsyncIteration from None

    async def unsubscribe(self) -> None:
        """Stop receiving. Messages not yet taken are discarded (the broker delivers
        unacked manual-ack ones again); a durable subscription keeps its cursor."""
        await self.client.unsubscribe(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.unsubscribe()

    # -- the client's side --------------------------------------------------------

    def _full(self) -> bool:
        """Whether the reader should hold back: an auto-ack queue at its limit."""
        return self._bounded and len(self._messages) >= self.max_pending and not self.closed

    def _put(self, raw: dict[str, Any], generation: int) -> None:
        """Add a delivery (called by the connection's reader)."""
        if self.closed:
            return
        if self._full():
            # Only reached when holding back the reader could deadlock; see aio.
            self._dropped += 1
            self.dropped_total += 1
            return
        self._messages.append(Message(raw, self, generation))
        self._wake()

    def _purge_manual(self, generation: int | None = None) -> int:
        """Forget queued manual-ack messages that came over connection ``generation``
        (None: any). That connection is gone and the broker will deliver them again.
        Auto-ack ones are kept: the broker counted them as done when it sent them."""
        if self.ack is AckMode.AUTO or not self._messages:
            return 0
        before = len(self._messages)
        if generation is None:
            self._messages.clear()
        else:
            self._messages = deque(m for m in self._messages if m.generation != generation)
        return before - len(self._messages)

    def _close(self, error: BaseException | None = None) -> None:
        """End the subscription; ``error`` is what ``next`` raises once it is drained."""
        if self.closed:
            return
        self.closed = True
        self._live = False
        self._error = error
        if error is None:
            self._messages.clear()
        else:
            self._purge_manual()
        self._wake()
        self.client._subscription_changed(self)

    # -- internals --------------------------------------------------------------

    def _take(self) -> Message:
        message = self._messages.popleft()
        if self._bounded and len(self._messages) <= self.max_pending // 2:
            # Below the low-water mark: a reader holding back for this subscription may
            # go on (hysteresis, so it is not woken for every message taken).
            self.client._subscription_changed(self)
        return message

    async def _wait_for_message(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._messages:
            if self.closed:
                if self._error is not None:
                    raise _fresh(self._error)
                raise SubscriptionClosedError(f"the subscription to {self.topic!r} has ended")
            getter: asyncio.Future[None] = loop.create_future()
            self._getters.append(getter)
            # Someone now waits on the socket: the reader must not hold back for a
            # full subscription, or this wait could never end. _wake ends the wait.
            self.client._wait_begins()
            try:
                await getter
            finally:
                if getter.cancelled():
                    self.client._wait_ends()  # cancelled or timed out: _wake did not
                    if getter in self._getters:
                        self._getters.remove(getter)

    def _wake(self) -> None:
        # Every waiter re-checks the queue; the ones that find it empty wait again.
        # They stop counting as waiting now, not when they resume: the reader may go
        # on with the rest of its input first, and must not drop messages for a full
        # subscription on behalf of a wait that is already over.
        getters = self._getters
        self._getters = []
        for getter in getters:
            if not getter.done():
                getter.set_result(None)
                self.client._wait_ends()

    def _report_drops(self) -> None:
        if self._dropped:
            dropped = self._dropped
            self._dropped = 0
            raise SlowConsumerError(self.topic, dropped, len(self._messages), self.max_pending)


def _fresh(error: BaseException) -> BaseException:
    """An exception to raise for ``error`` once more: a copy where that is plain, since
    raising one instance in many places chains all their tracebacks together."""
    if type(error) is ConnectionClosedError:
        fresh = ConnectionClosedError(*error.args)
        fresh.__cause__ = error.__cause__
        return fresh
    return error
