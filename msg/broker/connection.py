"""One client connection: bytes in, frames out, nothing else.

A :class:`Connection` is an :class:`asyncio.Protocol`. Each read is decoded into
requests in one pass and handed to the router as one batch; replies are not written
here but collected by the server, which writes every connection that has output once
per loop iteration. There is no task per connection and none per request.

Flow control, in both directions:

- If the peer does not read what the broker writes and the socket's buffer passes its
  high-water mark, the broker stops reading the peer's requests until it catches up.
  Pub/sub deliveries still accumulate; past ``max_pending_bytes`` the connection is
  dropped as a slow consumer (logged with the reason), so one stuck subscriber can
  never stall others or grow the broker's memory without bound.
- If more than ``max_inflight_requests`` of the peer's requests wait on storage, the
  broker stops reading until half of them are answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

from msg.protocol.codec import RequestReader, encode_error
from msg.protocol.codes import ErrorCode

if TYPE_CHECKING:
    from msg.broker.server import Server

__all__ = ["Connection"]

log = logging.getLogger(__name__)


class Connection(asyncio.Protocol):
    """The broker's side of one client connection."""

    def __init__(self, server: Server, session_id: int) -> None:
        self.server = server
        self.id = session_id
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self.reader = RequestReader(server.config.max_message_bytes)
        self.write_paused = False
        self.read_paused = False
        self.peer_closed = False
        self.closing = False

    # asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
        self.server.connection_made(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        server = self.server
        try:
            requests = self.reader.feed_batches(data)
            if requests:
                server.router.handle(self.id, requests, time.time())
        except Exception:
            # A bug, not the peer's fault: say so, drop this connection, keep serving.
            log.exception(
                "connection %d (%s): internal error handling a request", self.id, self.peer
            )
            self.abort_with(
                encode_error(ErrorCode.INTERNAL_ERROR, "internal error in the broker; see its log")
            )
            return
        server.received(len(data))
        if server.router.pending_replies(self.id) > server.config.max_inflight_requests:
            self.pause_reading()

    def eof_received(self) -> bool:
        # The peer will send nothing more: like NATS and Redis, treat that as leaving.
        # Its subscriptions end now (so nothing more is handed to a reader that may be
        # gone), but the transport stays open until the replies it is owed are written.
        self.peer_closed = True
        self.server.peer_finished(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connection_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.server.drained(self)

    # used by the server ------------------------------------------------------

    def write(self, frames: list[bytes]) -> None:
        """Write frames; then apply the slow-consumer and flow-control policies."""
        transport = self.transport
        if transport is None or self.closing:
            return
        transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        if self.write_paused:
            pending = transport.get_write_buffer_size()
            if pending > self.server.config.max_pending_bytes:
                log.warning(
                    "connection %d (%s): slow consumer, %d bytes unsent (limit %d); disconnecting",
                    self.id,
                    self.peer,
                    pending,
                    self.server.config.max_pending_bytes,
                )
                self.abort()
        else:
            self.server.wrote(self)

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.closing:
            self.read_paused = True
            self.transport.pause_reading()
            self.server.wait_on(self)

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.closing:
            self.read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close after writing everything buffered."""
        if self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, discarding unsent bytes."""
        if self.transport is not None:
            self.closing = True
            self.transport.abort()

    def abort_with(self, frame: bytes) -> None:
        """Send one last frame (best effort) and close."""
        if self.transport is not None and not self.closing:
            self.transport.write(frame)
            self.close()
