"""A minimal asyncio JSON-lines relay: the "CPython ceiling" for pub/sub throughput.

Run: ``python benchmarks/relay.py --host 127.0.0.1 --port 0`` (it logs
``listening on HOST:PORT`` to stderr, like msg, so the benchmark starts both alike).

Why it exists
-------------
The machine the benchmark runs on is shared and noisy, so an absolute msgs/s figure
means little on its own. This relay is the reference it is divided by: the least
work a Python broker can do per message while still speaking msg's protocol for
workload A (pub/sub, 1 publisher -> 1 subscriber). msg's figure over the relay's,
measured minutes apart on the same machine, is stable where the absolute one is not,
and says how far msg's hot path is from what CPython can do at all.

What it does (and nothing more)
-------------------------------
- ``{"action":"subscribe","topic":T,...}`` -> ``{"type":"ack","topic":T,"mode":M}``
  and the connection receives every later publish to ``T``.
- ``{"action":"publish","topic":T,"message":V,...}`` -> ``{"type":"ack",
  "message_id":ID}`` to the publisher and ``{"type":"message","topic":T,
  "mode":"pubsub","message":V,"message_id":ID}`` to each subscriber of ``T``: the same
  bytes msg sends.
- Anything else -> ``{"type":"error",...}``.

Per read chunk it processes every complete line in one pass (each line is decoded
with ``loads``, the message re-encoded with ``dumps``, as any broker that validates
its input must) and writes once per chunk per connection: one write of all the acks
to the publisher, one write of all the deliveries to each subscriber. It uses orjson
and uvloop when they are installed, unless ``MSG_PURE_JSON=1`` / ``MSG_LOOP=asyncio``
are set (as for msg), which makes it the ceiling for msg without the fast extra.
There is no storage, no flow control, no validation beyond what decoding does, and no
queue mode: it is a ceiling, not a broker.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, cast

log = logging.getLogger("relay")

loads: Callable[[bytes], Any]
dumps: Callable[[Any], bytes]
_PURE = os.environ.get("MSG_PURE_JSON", "") not in ("", "0")
try:
    if _PURE:
        raise ImportError("MSG_PURE_JSON is set")
    import orjson

    loads = orjson.loads
    dumps = orjson.dumps
    JSON_LIB = "orjson"
except ImportError:  # pragma: no cover - depends on the environment
    _encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

    def _std_dumps(value: Any) -> bytes:
        return _encoder.encode(value).encode()

    loads = json.loads
    dumps = _std_dumps
    JSON_LIB = "json"

_ACK_HEAD = b'{"type":"ack","message_id":"'
_ACK_TAIL = b'"}\n'
_ID_TAIL = b'"}\n'


class Relay:
    """The shared state: subscribers per topic, message id counter."""

    def __init__(self) -> None:
        self.topics: dict[str, list[RelayConnection]] = {}
        self.prefixes: dict[str, bytes] = {}
        self.counter = itertools.count(1)

    def prefix(self, topic: str) -> bytes:
        """The delivery frame up to the message, cached per topic (msg does the same)."""
        cached = self.prefixes.get(topic)
        if cached is None:
            cached = b'{"type":"message","topic":' + dumps(topic) + b',"mode":"pubsub","message":'
            self.prefixes[topic] = cached
        return cached


class RelayConnection(asyncio.Protocol):
    """One client: requests in, replies out, one write per chunk per connection."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.partial = b""
        self.topics: list[str] = []
        self.outbox: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for topic in self.topics:
            subscribers = self.relay.topics.get(topic)
            if subscribers is not None and self in subscribers:
                subscribers.remove(self)
        self.topics.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.partial:
            data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        relay = self.relay
        replies: list[bytes] = []
        touched: list[RelayConnection] = []
        for line in lines:
            if not line:
                continue
            try:
                request = loads(line)
                action = request["action"]
                topic = request["topic"]
            except (ValueError, KeyError, TypeError):
                replies.append(b'{"type":"error","error":"bad request","code":"bad_request"}\n')
                continue
            if action == "publish":
                payload = dumps(request["message"])
                # As long as msg's ids (12-character run prefix, '-', counter).
                message_id = b"relay0000000-%d" % next(relay.counter)
                replies.append(_ACK_HEAD + message_id + _ACK_TAIL)
                subscribers = relay.topics.get(topic)
                if subscribers:
                    frame = (
                        relay.prefix(topic) + payload + b',"message_id":"' + message_id + _ID_TAIL
                    )
                    for subscriber in subscribers:
                        if not subscriber.outbox:
                            touched.append(subscriber)
                        subscriber.outbox.append(frame)
            elif action == "subscribe":
                relay.topics.setdefault(topic, []).append(self)
                self.topics.append(topic)
                replies.append(b'{"type":"ack","topic":' + dumps(topic) + b',"mode":"pubsub"}\n')
            else:
                replies.append(
                    b'{"type":"error","error":"the relay only knows publish and subscribe",'
                    b'"code":"unknown_action"}\n'
                )
        for subscriber in touched:
            # The publisher may subscribe too; its deliveries then precede its acks,
            # which is fine for a reference.
            if subscriber.transport is not None:
                subscriber.transport.write(b"".join(subscriber.outbox))
            subscriber.outbox.clear()
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))


async def serve(host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    relay = Relay()
    server = await loop.create_server(lambda: RelayConnection(relay), host, port)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    address = server.sockets[0].getsockname()
    loop_name = type(loop).__module__.split(".")[0]
    log.info(
        "relay listening on %s:%d (json %s, loop %s)", address[0], address[1], JSON_LIB, loop_name
    )
    async with server:
        await stop.wait()
    log.info("relay stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    try:
        if os.environ.get("MSG_LOOP", "").lower() == "asyncio":
            raise ImportError("MSG_LOOP=asyncio")
        import uvloop
    except ImportError:  # pragma: no cover - depends on the environment
        asyncio.run(serve(options.host, options.port))
    else:
        uvloop.run(serve(options.host, options.port))
    sys.exit(0)


if __name__ == "__main__":
    main()
