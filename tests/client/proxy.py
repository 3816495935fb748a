"""A TCP proxy for tests: put it between a client and the broker, then break things.

It runs on the test's event loop. :meth:`Proxy.cut` drops every connection at once
(both sides, as a network failure or a broker crash looks to the client);
:meth:`Proxy.hold` stops forwarding the broker's bytes to clients, so requests stay
in flight for as long as the test wants; ``target`` can be changed, so a broker that
restarts on a new port is reachable at the same proxy address. When the target does
not answer, the proxy accepts and at once closes the client's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Final

# Every wait in the tests is bounded; nothing here should take more than a moment.
WAIT_TIMEOUT: Final = 10.0


class Proxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.host = "127.0.0.1"
        self.port = 0
        self.accepted = 0
        """Connections accepted so far (including ones the target refused)."""
        self.client_bytes = 0
        """Bytes forwarded from clients to the broker so far."""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        self._flowing.set()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._server.wait_closed()

    def hold(self) -> None:
        """Stop forwarding the broker's bytes to clients (requests stay in flight)."""
        self._flowing.clear()

    def release(self) -> None:
        """Forward the broker's bytes again, including what was held."""
        self._flowing.set()

    def cut(self) -> None:
        """Drop every open connection, both sides, without a goodbye."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def wait_for_client_bytes(self, count: int) -> None:
        """Wait (up to WAIT_TIMEOUT) until clients have sent ``count`` bytes in total."""
        async with asyncio.timeout(WAIT_TIMEOUT), self._changed:
            await self._changed.wait_for(lambda: self.client_bytes >= count)

    async def wait_for_accepted(self, count: int) -> None:
        """Wait (up to WAIT_TIMEOUT) until ``count`` connections have been accepted."""
        async with asyncio.timeout(WAIT_TIMEOUT), self._changed:
            await self._changed.wait_for(lambda: self.accepted >= count)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._changed:
            self.accepted += 1
            self._changed.notify_all()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        upstream = asyncio.create_task(self._pipe(reader, up_writer, count=True))
        downstream = asyncio.create_task(self._pipe(up_reader, writer, held=True))
        # Either direction ending ends the pair, as a dropped TCP connection would.
        await asyncio.wait([upstream, downstream], return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_writer):
            w.transport.abort()
            self._writers.discard(w)
        await asyncio.wait([upstream, downstream])

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        count: bool = False,
        held: bool = False,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if held:
                    await self._flowing.wait()
                if writer.transport.is_closing():
                    return
                writer.write(data)
                if count:
                    async with self._changed:
                        self.client_bytes += len(data)
                        self._changed.notify_all()
                await writer.drain()
