"""The asyncio server: listening sockets, the effect executor, start-up and shutdown.

Theory of operation
-------------------
The server owns the listening sockets, the connections, the store and the router, and
does only what the router cannot: IO. Its loop is event-driven, not polled:

1. A connection's ``data_received`` hands the requests of one read to the router and
   asks for a *flush* (one ``call_soon``, however many reads arrive in the iteration).
2. The flush runs after every read of the iteration: it writes each connection that
   has output (one write each), starts the store calls the router asked for (in
   order, one task per batch), closes what the router wants closed, and then checks
   whether storage still takes writes (which decides how later publishes are met).
3. When a store call finishes, its result goes back to the router, and what it
   answered is flushed: at once if no other store call is in flight, else by one
   flush after the iteration, shared with the calls finishing in it.

So the hot path is: many reads -> one router pass each -> one flush -> one append
call (one group commit) -> one write per connection.

A tick task wakes once a second for timers: rates, ack deadlines, storage maintenance.

Shutdown, in a fixed order: stop listening; stop reading requests; stop handing out
queue messages; wait (up to ``shutdown_timeout``) for store calls in progress so every
accepted publish gets its ack; write what is queued and close every connection; close
the store, which makes everything durable.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time
from typing import Any

from msg import __version__, jsonlib
from msg.broker.connection import Connection
from msg.broker.process import tune_process
from msg.config import Config
from msg.core.effects import AnyStoreCall
from msg.core.ids import SequentialIds
from msg.core.router import Router
from msg.errors import MsgError
from msg.persistence import Store, StoreFailure
from msg.protocol.codec import encode_error
from msg.protocol.codes import ErrorCode

__all__ = ["Server", "open_store"]

log = logging.getLogger(__name__)

# Timers (rates, ack deadlines, retention, timed fsync) need no finer resolution.
_TICK_INTERVAL = 1.0

# Flush early once this much request data has been handled in one loop iteration:
# about a thousand small publishes, enough to amortise a flush, small enough that
# deliveries never wait behind seconds of work.
_FLUSH_BYTES = 256 * 1024
# A read smaller than this, with nothing else pending, is flushed at once (see received).
_SMALL_READ = 4096


def open_store(config: Config) -> Store:
    """The store ``config`` asks for (not yet opened)."""
    if config.storage == "memory":
        from msg.storage.memory import MemoryStore

        return MemoryStore(retention=config.retention, max_queue_messages=config.max_queue_messages)
    from msg.storage.filestore import FileStore

    return FileStore(
        config.data_dir,
        fsync=config.fsync,
        retention=config.retention,
        max_queue_messages=config.max_queue_messages,
        segment_bytes=config.segment_bytes,
        min_free_bytes=config.min_free_bytes,
    )


def _id_prefix() -> str:
    """A prefix no earlier run used: the start time in ms plus 20 random bits, base 36."""
    millis = int(time.time() * 1000)
    return _base36(millis) + _base36(secrets.randbits(20)).rjust(4, "0")


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


class Server:
    """A running msg broker."""

    def __init__(
        self, config: Config, store: Store | None = None, *, tune_process: bool = False
    ) -> None:
        """A broker for ``config``; ``store`` defaults to the one the config names.

        ``tune_process`` adjusts the process's garbage collector and allocator for the
        broker (see :mod:`msg.broker.process`); the command line sets it, since it owns
        the process. An application embedding a Server keeps its own settings.
        """
        self.config = config
        self._tune_process = tune_process
        self.store = store if store is not None else open_store(config)
        self.router = Router(
            ids=SequentialIds(_id_prefix()),
            now=time.time(),
            ack_timeout=config.ack_timeout,
            max_deliveries=config.max_deliveries,
            info={
                "version": __version__,
                "fsync": config.fsync.value if config.storage == "file" else None,
                "storage": config.storage,
            },
        )
        self.addresses: list[tuple[str, int]] = []
        self._data_dir = os.path.abspath(config.data_dir)
        self._servers: list[asyncio.Server] = []
        self._connections: dict[int, Connection] = {}
        self._waiting: set[Connection] = set()
        """Connections paused for reading or half-closed: checked after every flush."""
        self._session_ids = itertools.count(1)
        self._flush_scheduled = False
        self._unflushed = 0
        """Request bytes handed to the router since the last flush."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick_task: asyncio.Task[None] | None = None
        self._read_only: StoreFailure | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        """Open the store, then listen. Returns once connections are accepted."""
        self._loop = asyncio.get_running_loop()
        started = time.monotonic()
        recovery = await self.store.open()
        self.router.recovered(recovery)
        if self._tune_process:
            tune_process()
        log.info(
            "storage ready in %.2f s: %d queues (%d messages ready), %d topics%s",
            time.monotonic() - started,
            len(recovery.queues),
            sum(recovery.queues.values()),
            len(recovery.topics),
            _recovery_notes(recovery.torn_records, recovery.corrupt_records),
        )
        try:
            server = await self._listen(self.config.host)
        except OSError:
            if self.config.host != "localhost":
                await self.store.close()
                raise
            # "localhost" is IPv4 and IPv6; a machine without IPv6 still has IPv4.
            log.warning("cannot listen on every address of localhost; trying 127.0.0.1 only")
            try:
                server = await self._listen("127.0.0.1")
            except OSError:
                await self.store.close()
                raise
        self._servers.append(server)
        for sock in server.sockets:
            address = sock.getsockname()
            self.addresses.append((address[0], address[1]))
        self._tick_task = asyncio.create_task(self._tick(), name="msg-tick")
        where = ", ".join(_format_address(host, port) for host, port in self.addresses)
        data = (
            f"data dir {self._data_dir}"
            if self.config.storage == "file"
            else "in-memory storage (nothing survives a restart)"
        )
        fsync = f", fsync {self.config.fsync.value}" if self.config.storage == "file" else ""
        loop_kind = type(self._loop).__module__.split(".")[0]
        log.info(
            "msg %s listening on %s (%s%s; %s, %s)",
            __version__,
            where,
            data,
            fsync,
            "orjson" if jsonlib.IMPLEMENTATION == "orjson" else "stdlib json",
            "uvloop" if loop_kind == "uvloop" else "asyncio loop",
        )

    async def _listen(self, host: str) -> asyncio.Server:
        assert self._loop is not None
        return await self._loop.create_server(
            self._new_connection, host, self.config.port, reuse_address=True, backlog=1024
        )

    async def stop(self) -> None:
        """Shut down gracefully (see the module docstring for the order)."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down: %d connections open", len(self._connections))
        for server in self._servers:
            server.close()
        for connection in list(self._connections.values()):
            connection.pause_reading()
        self.router.stopping = True
        deadline = time.monotonic() + self.config.shutdown_timeout
        while self._tasks and time.monotonic() < deadline:
            self._flush()
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        self._flush()
        if self._tasks:
            log.warning("shutdown: %d store calls did not finish in time", len(self._tasks))
        for connection in list(self._connections.values()):
            connection.close()
        if self._tick_task is not None:
            self._tick_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(
            *self._tasks, *(t for t in [self._tick_task] if t), return_exceptions=True
        )
        for server in self._servers:
            await server.wait_closed()
        await self.store.close()
        log.info("stopped")

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Start, run until ``stop`` is set, then shut down."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    # ------------------------------------------------------------------
    # Connections

    def _new_connection(self) -> Connection:
        return Connection(self, next(self._session_ids))

    def connection_made(self, connection: Connection) -> None:
        if self._stopping or len(self._connections) >= self.config.max_connections:
            reason = (
                "the broker is shutting down"
                if self._stopping
                else (
                    f"the broker has reached its limit of {self.config.max_connections} connections"
                )
            )
            code = ErrorCode.SHUTTING_DOWN if self._stopping else ErrorCode.TOO_MANY_CONNECTIONS
            log.warning("refusing connection from %s: %s", connection.peer, reason)
            connection.abort_with(encode_error(code, reason))
            return
        self._connections[connection.id] = connection
        self.router.connect(connection.id, connection.peer)
        if connection.transport is not None:
            sock = connection.transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # Replies are written once per loop iteration already; Nagle would only
                # add latency to them.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.debug("connection %d from %s", connection.id, connection.peer)

    def connection_lost(self, connection: Connection, exc: Exception | None) -> None:
        self._waiting.discard(connection)
        if self._connections.pop(connection.id, None) is None:
            return
        self.router.disconnect(connection.id)
        if exc is not None:
            log.info("connection %d (%s) lost: %s", connection.id, connection.peer, exc)
        else:
            log.debug("connection %d (%s) closed", connection.id, connection.peer)
        self.schedule_flush()

    def peer_finished(self, connection: Connection) -> None:
        """The peer half-closed: end its subscriptions; close once its answers are out."""
        self.router.end_subscriptions(connection.id)
        self.wait_on(connection)
        self.schedule_flush()

    def drained(self, connection: Connection) -> None:
        """The socket of ``connection`` took everything it was given and has room."""
        self.router.drained(connection.id)
        self.schedule_flush()  # paused readers may resume (see _check_waiting)

    def wrote(self, connection: Connection) -> None:
        """A write to ``connection`` went into a socket that still has room."""
        if self.router.drained(connection.id):
            self.schedule_flush()

    # ------------------------------------------------------------------
    # The effect executor

    def received(self, size: int) -> None:
        """A connection handed ``size`` bytes of requests to the router.

        The flush normally runs once per loop iteration, after every read of it. But
        one iteration can bring megabytes (the event loop reads each socket until it is
        empty), and nothing would be written until all of it was handled: deliveries
        would come in bursts a fraction of a second apart. So past
        :data:`_FLUSH_BYTES` the flush runs at once.
        """
        self._unflushed += size
        if self._unflushed >= _FLUSH_BYTES or (size < _SMALL_READ and not self._flush_scheduled):
            # A lone small read (a quiet moment: nothing else handled in this loop
            # iteration yet) is answered at once rather than one iteration later: it
            # saves a trip through the event loop on every message at low rates, and
            # under load reads are large and batching takes over.
            self._flush()
        else:
            # Publishes the router sent before booking them (Router.handle) are booked
            # now: only a flush that follows at once writes them first, and nothing
            # else (a store call's answer, a timer) may run before they are booked.
            self.router.book()
            self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        # May also run early (see received): a call_soon already scheduled then finds
        # little to do, which costs less than tracking it.
        self._flush_scheduled = False
        self._unflushed = 0
        router = self.router
        # Writes first: a store call only starts running at the next loop iteration
        # anyway, and a delivery should not wait for the tasks to be made (nor for the
        # storage check below, which only concerns requests not yet read).
        connections = self._connections
        for session in router.take_dirty():
            connection = connections.get(session.id)
            frames = session.out.take()
            if connection is not None and frames:
                connection.write(frames)
        for call in router.take_calls():
            self._start(call)
        for close in router.take_closes():
            connection = connections.get(close.session_id)
            if connection is not None:
                log.info(
                    "closing connection %d (%s): %s", connection.id, connection.peer, close.reason
                )
                connection.close()
        read_only = self.store.writable()
        if read_only is not self._read_only:
            self._read_only = router.read_only = read_only
            if read_only is not None:
                log.error("storage refuses writes (%s): publishes are rejected", read_only.value)
            else:
                log.info("storage accepts writes again")
        if self._waiting:
            self._check_waiting()

    def _check_waiting(self) -> None:
        """Close half-closed connections that are owed nothing; resume paused readers."""
        for connection in list(self._waiting):
            pending = self.router.pending_replies(connection.id)
            if connection.closing:
                self._waiting.discard(connection)
            elif connection.peer_closed:
                if pending == 0:
                    connection.close()
                    self._waiting.discard(connection)
            elif not connection.read_paused:
                self._waiting.discard(connection)
            elif not connection.write_paused and pending <= self.config.max_inflight_requests // 2:
                connection.resume_reading()
                self._waiting.discard(connection)

    def wait_on(self, connection: Connection) -> None:
        """Check ``connection`` after each flush until it can be closed or read again."""
        self._waiting.add(connection)

    def _start(self, call: AnyStoreCall) -> None:
        assert self._loop is not None
        # The loop's own create_task: asyncio.create_task first looks the running loop
        # up, and that costs a getpid() system call per store call.
        task = self._loop.create_task(self._execute(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, call: AnyStoreCall) -> None:
        try:
            result = await call.run(self.store)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("store call %s raised", call.name)
            call.failed(StoreFailureError(call.name))
        else:
            try:
                call.done(result)
            except Exception:
                log.exception("internal error handling the result of store call %s", call.name)
        if len(self._tasks) == 1:
            # The only store call in flight (this one): nothing else will finish in
            # this iteration to share a flush with, so the replies go out now instead
            # of one more trip through the loop later.
            self._flush()
        else:
            self.schedule_flush()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(_TICK_INTERVAL)
            now = time.time()
            self.router.tick(now)
            self.schedule_flush()
            try:
                await self.store.maintain(now)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("storage maintenance failed")


class StoreFailureError(MsgError):
    """Passed to a store call's ``failed`` hook when the store raised instead of answering."""


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _recovery_notes(torn: int, corrupt: int) -> str:
    notes = []
    if torn:
        notes.append(f"{torn} torn records dropped")
    if corrupt:
        notes.append(f"{corrupt} corrupt records skipped")
    return f" ({'; '.join(notes)})" if notes else ""
