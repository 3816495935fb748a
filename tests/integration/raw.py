"""A raw JSON-lines connection for driving the broker exactly as a client on the wire.

Deliberately not msg.client: these tests check the protocol itself, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

# Generous: these bound waits for things that should happen in milliseconds; they only
# matter when something is broken (then the test fails instead of hanging).
TIMEOUT = 10.0


class Raw:
    """One TCP connection to the broker."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", *, limit: int = 2**26) -> Raw:
        """Connect; ``limit`` bounds what is read ahead of :meth:`recv` (asyncio pauses
        reading the socket at twice that)."""
        reader, writer = await asyncio.open_connection(host, port, limit=limit)
        return cls(reader, writer)

    async def send(self, *requests: dict[str, Any] | bytes) -> None:
        """Write requests (dicts become JSON lines; bytes go as they are)."""
        for request in requests:
            if isinstance(request, bytes):
                self.writer.write(request)
            else:
                self.writer.write(json.dumps(request).encode() + b"\n")
        await self.writer.drain()

    async def recv(self, within: float = TIMEOUT) -> dict[str, Any]:
        """The next frame from the broker."""
        async with asyncio.timeout(within):
            line = await self.reader.readline()
        if not line:
            raise ConnectionError("the broker closed the connection")
        assert line.endswith(b"\n"), line
        frame = json.loads(line)
        assert isinstance(frame, dict)
        return frame

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its reply (no deliveries may come between)."""
        await self.send(request)
        return await self.recv()

    async def recv_n(self, count: int, within: float = TIMEOUT) -> list[dict[str, Any]]:
        return [await self.recv(within) for _ in range(count)]

    async def closed_by_peer(self, within: float = TIMEOUT) -> bool:
        """Read until EOF; True if the broker closed the connection."""
        async with asyncio.timeout(within):
            while await self.reader.read(65536):
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
