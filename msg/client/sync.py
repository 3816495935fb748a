"""A blocking client for scripts, driving the asyncio client.

Theory of operation
-------------------
:class:`SyncClient` owns a background thread that runs a private event loop, and an
:class:`~msg.client.aio.Client` on that loop. Every blocking method submits the
matching coroutine to the loop (``run_coroutine_threadsafe``) and waits for its
result, so there is one protocol implementation (the async one) and the sync client
inherits its pipelining, reconnects and flow control unchanged.

The async client already bounds each request with ``request_timeout``; the calling
thread waits a little longer than that, so it can never hang on a stuck loop. If the
caller is interrupted (Ctrl-C) while waiting, the coroutine is cancelled on the loop,
which the async client handles like any cancelled request: its reply is dropped.

An ``error_callback`` (refused publishes sent with ``reply=False``) is called on the
loop thread, not the thread that published: it must not block, and must guard what
it shares with the application's threads.

The thread is a daemon, so a script that forgets :meth:`SyncClient.close` still
exits; closing it (or using ``with``) ends the connection politely.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterable, Iterator
from types import TracebackType
from typing import Any, Final, Literal, TypeVar, overload

from msg.client.aio import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_MAX_RECONNECT_ATTEMPTS,
    DEFAULT_PORT,
    DEFAULT_REQUEST_TIMEOUT,
    AckArg,
    Client,
    ErrorCallback,
)
from msg.client.backoff import Backoff
from msg.client.errors import (
    ConnectionClosedError,
    MsgError,
    RequestTimeoutError,
    SubscriptionClosedError,
)
from msg.client.subscription import DEFAULT_MAX_PENDING, Message, Subscription
from msg.protocol.frames import Mode

__all__ = ["SyncClient", "SyncMessage", "SyncSubscription"]

T = TypeVar("T")

# Extra seconds the calling thread waits beyond the async client's own timeout, so the
# async side (which cleans up properly) is the one that times out.
_GRACE: Final = 2.0


class _LoopThread:
    """A daemon thread running an event loop until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        # asyncio.run closes the loop properly: remaining tasks are cancelled and
        # async generators finalised, so nothing leaks when the thread ends.
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coro`` on the loop; wait at most ``timeout`` seconds for it."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            # Since 3.11 this is the builtin TimeoutError, which the coroutine's own
            # timeouts (RequestTimeoutError, ReceiveTimeoutError) also are.
            if future.done():
                raise
            future.cancel()
            raise RequestTimeoutError(f"no result within {timeout} s") from None
        except BaseException:
            # KeyboardInterrupt and the like: stop the coroutine too.
            future.cancel()
            raise

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()


class SyncMessage:
    """A delivered message, with blocking :meth:`ack` and :meth:`nack`.

    The fields are those of :class:`~msg.client.subscription.Message`.
    """

    __slots__ = ("_client", "message")

    def __init__(self, message: Message, client: SyncClient) -> None:
        self.message = message
        """The async message this wraps."""
        self._client = client

    @property
    def topic(self) -> str:
        """The topic or queue it came from."""
        return self.message.topic

    @property
    def mode(self) -> Mode:
        """Pub/sub or queue."""
        return self.message.mode

    @property
    def data(self) -> Any:
        """The published value."""
        return self.message.data

    @property
    def message_id(self) -> str:
        """The id the broker gave it (what ack and nack name)."""
        return self.message.message_id

    @property
    def redelivered(self) -> bool:
        """Whether it was delivered before."""
        return self.message.redelivered

    @property
    def attempt(self) -> int:
        """1 for the first delivery, 2 for the first redelivery, and so on."""
        return self.message.attempt

    @property
    def durable(self) -> str | None:
        """The durable subscription it came through, if any."""
        return self.message.durable

    @property
    def raw(self) -> dict[str, Any]:
        """The delivery frame as received."""
        return self.message.raw

    def __repr__(self) -> str:
        return repr(self.message)

    def ack(self) -> None:
        """Tell the broker this message is done (manual-ack subscriptions)."""
        self._client._run(self.message.ack())

    def nack(self, *, requeue: bool = True, reason: str | None = None) -> None:
        """Give the message back: deliver it again, or dead-letter it (with ``reason``)."""
        self._client._run(self.message.nack(requeue=requeue, reason=reason))


class SyncSubscription:
    """An iterator of :class:`SyncMessage` and a context manager (unsubscribes on exit).

    Iteration blocks until a message comes and ends when the subscription does.
    """

    def __init__(self, subscription: Subscription, client: SyncClient) -> None:
        self.subscription = subscription
        """The async subscription this wraps."""
        self._client = client

    @property
    def topic(self) -> str:
        """The topic or queue subscribed to."""
        return self.subscription.topic

    def __repr__(self) -> str:
        return repr(self.subscription)

    def next(self, timeout: float | None = None) -> SyncMessage:
        """The next message; wait at most ``timeout`` seconds (None: no limit).

        Raises :class:`~msg.client.errors.ReceiveTimeoutError` when the time is up and
        :class:`~msg.client.errors.SubscriptionClosedError` once it has ended.
        """
        wait = None if timeout is None else timeout + _GRACE
        message = self._client._run(self.subscription.next(timeout), wait)
        return SyncMessage(message, self._client)

    def __iter__(self) -> Iterator[SyncMessage]:
        return self

    def __next__(self) -> SyncMessage:
        try:
            return self.next()
        except SubscriptionClosedError:
            raise StopIteration from None

    def unsubscribe(self) -> None:
        """Stop receiving (a durable subscription keeps its cursor)."""
        self._client._run(self.subscription.unsubscribe())

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._client.closed:
            self.unsubscribe()


class SyncClient:
    """A blocking msg client; the same methods and options as :class:`Client`.

    ::

        with SyncClient.connect("localhost", 8888) as client:
            client.publish("jobs", {"n": 1}, queue=True)
            with client.subscribe("jobs", queue=True, ack="manual") as jobs:
                for job in jobs:
                    ...
                    job.ack()
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
        self._options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "request_timeout": request_timeout,
            "reconnect": reconnect,
            "max_reconnect_attempts": max_reconnect_attempts,
            "backoff": backoff,
            "error_callback": error_callback,
        }
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._thread: _LoopThread | None = None
        self._client: Client | None = None
        self._lock = threading.Lock()

    @classmethod
    def connect(
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
    ) -> SyncClient:
        """Connect to the broker at ``host``:``port`` (options as for :class:`Client`;
        ``error_callback`` runs on the client's loop thread)."""
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
        client.open()
        return client

    def open(self) -> None:
        """Start the loop thread and connect (``connect`` and ``with`` call this)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = _LoopThread(f"msg-client-{self.host}:{self.port}")
        try:
            self._client = self._thread.run(
                Client.connect(self.host, self.port, **self._options),
                self.connect_timeout * 2 + _GRACE,
            )
        except BaseException:
            self._thread.stop()
            raise

    def __enter__(self) -> SyncClient:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def client(self) -> Client:
        """The async client this drives (use it only on its own loop)."""
        if self._client is None:
            raise MsgError("the client is not connected: use SyncClient.connect() or with")
        return self._client

    @property
    def closed(self) -> bool:
        """Whether the client is closed (or was never connected)."""
        return self._client is None or self._client.closed

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = -1.0) -> T:
        """Run ``coro`` on the client's loop; ``timeout`` -1 means the request timeout
        plus a grace period."""
        thread = self._thread
        if thread is None or self._client is None:
            coro.close()
            if self._client is not None:
                raise ConnectionClosedError(f"the client for {self.host}:{self.port} is closed")
            raise MsgError("the client is not connected: use SyncClient.connect() or with")
        if timeout == -1.0:
            timeout = None if self.request_timeout is None else self.request_timeout + _GRACE
        return thread.run(coro, timeout)

    @overload
    def publish(
        self, topic: str, message: Any, *, queue: bool = False, reply: Literal[True] = True
    ) -> str: ...
    @overload
    def publish(
        self, topic: str, message: Any, *, queue: bool = False, reply: Literal[False]
    ) -> None: ...
    @overload
    def publish(
        self, topic: str, message: Any, *, queue: bool = False, reply: bool
    ) -> str | None: ...
    def publish(
        self, topic: str, message: Any, *, queue: bool = False, reply: bool = True
    ) -> str | None:
        """Publish ``message``; returns its id once stored, or (``reply=False``) None
        once it is queued for writing. See :meth:`Client.publish`."""
        return self._run(self.client.publish(topic, message, queue=queue, reply=reply))

    @overload
    def publish_many(
        self,
        topic: str,
        messages: Iterable[Any],
        *,
        queue: bool = False,
        reply: Literal[True] = True,
    ) -> list[str]: ...
    @overload
    def publish_many(
        self, topic: str, messages: Iterable[Any], *, queue: bool = False, reply: Literal[False]
    ) -> None: ...
    @overload
    def publish_many(
        self, topic: str, messages: Iterable[Any], *, queue: bool = False, reply: bool
    ) -> list[str] | None: ...
    def publish_many(
        self, topic: str, messages: Iterable[Any], *, queue: bool = False, reply: bool = True
    ) -> list[str] | None:
        """Publish a batch in one write; returns the ids, or (``reply=False``) None.
        See :meth:`Client.publish_many`."""
        return self._run(self.client.publish_many(topic, list(messages), queue=queue, reply=reply))

    def flush(self) -> None:
        """Return once the broker has handled every request sent before (so every
        earlier ``reply=False`` publish is stored or its error reported). See
        :meth:`Client.flush`."""
        self._run(self.client.flush())

    def subscribe(
        self,
        topic: str,
        *,
        queue: bool = False,
        ack: AckArg = "auto",
        prefetch: int | None = None,
        durable: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> SyncSubscription:
        """Subscribe; returns an iterator of messages. See :meth:`Client.subscribe`."""
        subscription = self._run(
            self.client.subscribe(
                topic,
                queue=queue,
                ack=ack,
                prefetch=prefetch,
                durable=durable,
                max_pending=max_pending,
            )
        )
        return SyncSubscription(subscription, self)

    def unsubscribe(self, subscription: SyncSubscription) -> None:
        """End a subscription."""
        self._run(self.client.unsubscribe(subscription.subscription))

    def delete_durable(self, topic: str, name: str) -> None:
        """Delete a durable subscription and its cursor. See :meth:`Client.delete_durable`."""
        self._run(self.client.delete_durable(topic, name))

    def ack(self, message_id: str) -> None:
        """Ack a message by id."""
        self._run(self.client.ack(message_id))

    def nack(self, message_id: str, requeue: bool = True, reason: str | None = None) -> None:
        """Nack a message by id (``reason``: kept with a dead letter)."""
        self._run(self.client.nack(message_id, requeue, reason))

    def ping(self) -> float:
        """Round trip to the broker, in seconds."""
        return self._run(self.client.ping())

    def status(self) -> dict[str, Any]:
        """The broker's status reply. See :meth:`Client.status`."""
        return self._run(self.client.status())

    def close(self) -> None:
        """Close the connection and stop the loop thread. Idempotent."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            if self._client is not None:
                # close() bounds its own waiting by connect_timeout.
                thread.run(self._client.close(), self.connect_timeout + _GRACE)
        finally:
            thread.stop()
