"""Redis (RESP2): PUBLISH/SUBSCRIBE for pub/sub, Streams for the work queue.

- Pub/sub: ``PUBLISH topic body`` (answered with ``:N``); subscribers ``SUBSCRIBE`` every
  topic and wait for one confirmation per topic.
- Queue: a stream with one consumer group. The producer sends ``XADD stream ID d body``
  with an explicit, increasing ID derived from the sequence number (``1<seq>-1``), so
  a consumer can name the IDs to ``XACK`` from the sequence numbers it already
  extracts. Consumers keep two ``XREADGROUP ... COUNT prefetch/2 BLOCK 100 ... >``
  requests outstanding (together about ``prefetch`` messages in flight, like a
  prefetch window) and, for every read, send one ``XACK`` of every entry in it plus a
  new ``XREADGROUP`` for every reply that completed. Progress counts the entries
  ``XACK`` reports acknowledged. Durability is the server's: the suite starts its own
  ``redis-server --appendonly yes --appendfsync always`` for workload E.
"""

from __future__ import annotations

import re
import socket
from typing import Final

from benchmarks.peers.base import (
    SEQ_RE,
    Driver,
    Handshake,
    LineReplies,
    Receiver,
    ReplyCounter,
    SeqReceiver,
)

_ERROR: Final = b"\r\n-ERR"
_ERROR_LINE: Final = b"\n-"
_ACKED_RE: Final = re.compile(rb"(?m)^:(\d+)\r$")
_GROUP: Final = b"workers"


def command(*args: bytes) -> bytes:
    """One RESP command."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def stream_id(seq: int) -> bytes:
    return b"1%010d-1" % seq


class StreamConsumer(Receiver):
    """One consumer of the group: reads, acks every entry read, reads again."""

    def __init__(self, sock: socket.socket, stream: bytes, name: bytes, count: int) -> None:
        super().__init__(sock)
        self.stream = stream
        self.read = command(
            b"XREADGROUP",
            b"GROUP",
            _GROUP,
            name,
            b"COUNT",
            b"%d" % count,
            b"BLOCK",
            b"100",
            b"STREAMS",
            stream,
            b">",
        )
        self.ack_head = b"$4\r\nXACK\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            len(stream),
            stream,
            len(_GROUP),
            _GROUP,
        )
        self.reply_end = re.compile(rb"(?m)^(?:" + re.escape(stream) + rb"|\*-1)\r$")
        self.out = self.read + self.read

    def feed(self, data: bytes) -> None:
        if self.tail:
            data = self.tail + data
        end = data.rfind(b"\n") + 1
        data, self.tail = data[:end], data[end:]
        if not data:
            return
        if _ERROR_LINE in data:
            self.note_error(data, _ERROR_LINE)
        acked = _ACKED_RE.findall(data)
        if acked:
            self.progress += sum(map(int, acked))
        seqs = SEQ_RE.findall(data)
        out = []
        if seqs:
            self.deliveries += len(seqs)
            self.seqs.append(b"".join(seqs))
            ids = b"$13\r\n1" + b"-1\r\n$13\r\n1".join(seqs) + b"-1\r\n"
            out.append(b"*%d\r\n" % (3 + len(seqs)) + self.ack_head + ids)
        completed = len(self.reply_end.findall(data))
        if completed:
            out.append(self.read * completed)
        if out:
            self.out += b"".join(out)


class RedisDriver(Driver):
    name = "redis"
    pubsub_acks = True
    queue_acks = True

    @property
    def stream(self) -> bytes:
        return self.queue_name.encode()

    def encode_publish(self, topic: str, body: bytes, seq: int, queue: bool) -> bytes:
        if queue:
            return command(b"XADD", self.stream, stream_id(seq), b"d", body)
        return command(b"PUBLISH", topic.encode(), body)

    def _call(self, sock: socket.socket, *args: bytes) -> bytes:
        sock.sendall(command(*args))
        reply = Handshake(sock).until(b"\r\n")
        if reply.startswith(b"-"):
            raise ConnectionError(f"redis refused {args[0]!r}: {reply!r}")
        return reply

    def open_publisher(self, queue: bool, durable: bool) -> tuple[socket.socket, ReplyCounter]:
        # PUBLISH answers ":N\r\n" (one line), XADD "$13\r\n<id>\r\n" (two).
        return self.connect(), LineReplies(2 if queue else 1, b"-ERR")

    def open_subscriber(self, topics: list[str], latency: bool) -> Receiver:
        sock = self.connect()
        sock.sendall(command(b"SUBSCRIBE", *[t.encode() for t in topics]))
        hs = Handshake(sock, timeout=120.0)
        hs.until(b"$9\r\nsubscribe\r\n", len(topics))
        hs.until(b"\r\n", 2)  # the topic and the subscription count of the last one
        return SeqReceiver(sock, hs.leftover(), latency=latency, error_marker=_ERROR)

    def setup_queue(self, durable: bool, consumers: int, prefetch: int) -> None:
        with self.connect() as sock:
            self._call(sock, b"DEL", self.stream)
            self._call(sock, b"XGROUP", b"CREATE", self.stream, _GROUP, b"$", b"MKSTREAM")

    def teardown_queue(self) -> None:
        try:
            with self.connect() as sock:
                self._call(sock, b"DEL", self.stream)
        except OSError:
            pass

    def open_consumer(self, index: int, prefetch: int, durable: bool) -> Receiver:
        sock = self.connect()
        return StreamConsumer(sock, self.stream, b"c%d" % index, max(1, prefetch // 2))

    def open_idle(self) -> socket.socket:
        sock = self.connect()
        self._call(sock, b"PING")
        return sock

    def version(self) -> str:
        with self.connect() as sock:
            sock.sendall(command(b"INFO", b"server"))
            hs = Handshake(sock)
            head = hs.until(b"\r\n")
            size = int(head[1:-2])
            info = hs.exactly(size + 2).decode(errors="replace")
        for line in info.splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1]
        return ""
