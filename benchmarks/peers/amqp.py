"""AMQP 0-9-1 (RabbitMQ), raw frames: just the methods the workloads use.

- Connection: protocol header, ``Start``/``StartOk`` (PLAIN guest/guest), ``Tune``/
  ``TuneOk`` (heartbeats off), ``Open``; then ``Channel.Open`` on channel 1.
- Pub/sub: each subscriber declares an exclusive, server-named queue bound to
  ``amq.topic`` with the topic as routing key and consumes it with ``no-ack`` (the
  AMQP way to get every message of a topic). Publishes are transient, unconfirmed
  (the publish window is bounded by deliveries, the same rule as for every broker).
- Queue: one queue (``durable`` and persistent messages for workload E, transient for
  C); the producer's channel is in confirm mode (``Confirm.Select``) and counts the
  broker's ``Basic.Ack`` confirms. Consumers set ``Basic.Qos`` prefetch and consume
  with manual acks; after every read a consumer sends one ``Basic.Ack`` with
  ``multiple`` set, up to the last delivery tag it got (tags are consecutive per
  channel, so the tag is its delivery count). AMQP does not answer acks, so
  progress counts acks sent.

Deliveries are counted with the shared ``@``-sequence-number scan over raw reads (no
frame parsing on the receive side).
"""

from __future__ import annotations

import re
import socket
import struct
from typing import Final

from benchmarks.peers.base import (
    MIN_PAYLOAD,
    SEQ_RE,
    Driver,
    Handshake,
    Receiver,
    ReplyCounter,
    SeqReceiver,
    split_at_mark,
)

FRAME_END: Final = b"\xce"
_HEADER: Final = struct.Struct(">BHI")
_NO_TABLE: Final = b"\x00\x00\x00\x00"
_TOPIC_EXCHANGE: Final = b"amq.topic"
_CLOSES: Final = (b"\x00\x14\x00\x28", b"\x00\x0a\x00\x32")  # Channel/Connection.Close


def shortstr(value: bytes) -> bytes:
    return bytes([len(value)]) + value


def longstr(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _HEADER.pack(kind, channel, len(payload)) + payload + FRAME_END


def method(class_id: int, method_id: int, args: bytes = b"", channel: int = 1) -> bytes:
    return frame(1, channel, struct.pack(">HH", class_id, method_id) + args)


def basic_ack(tag: int, multiple: bool) -> bytes:
    return method(60, 80, struct.pack(">QB", tag, 1 if multiple else 0))


class AmqpConnection:
    """Blocking helpers for set-up: read frames, wait for a method."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.hs = Handshake(sock)

    def read_frame(self) -> tuple[int, int, bytes]:
        kind, channel, size = _HEADER.unpack(self.hs.exactly(7))
        payload = self.hs.exactly(size + 1)
        if payload[-1:] != FRAME_END:
            raise ConnectionError("bad AMQP frame end")
        return kind, channel, payload[:-1]

    def expect(self, class_id: int, method_id: int) -> bytes:
        """Read until the method frame (class_id, method_id); return its arguments."""
        while True:
            kind, _, payload = self.read_frame()
            if kind != 1:
                continue
            got = struct.unpack(">HH", payload[:4])
            if got == (class_id, method_id):
                return payload[4:]
            if got in ((10, 50), (20, 40)):  # Connection.Close, Channel.Close
                code = struct.unpack(">H", payload[4:6])[0]
                text = payload[7 : 7 + payload[6]].decode(errors="replace")
                raise ConnectionError(f"AMQP closed: {code} {text}")

    def call(self, request: bytes, class_id: int, method_id: int) -> bytes:
        self.sock.sendall(request)
        return self.expect(class_id, method_id)


class ConfirmCounter(ReplyCounter):
    """Counts publisher confirms (``Basic.Ack``, single or multiple) by frame."""

    def __init__(self) -> None:
        self.buffer = b""
        self.confirmed = 0

    def feed(self, data: bytes) -> int:
        buffer = self.buffer + data
        before = self.confirmed
        offset = 0
        while len(buffer) - offset >= 7:
            kind, _, size = _HEADER.unpack_from(buffer, offset)
            end = offset + 7 + size + 1
            if end > len(buffer):
                break
            if kind == 1:
                class_id, method_id = struct.unpack_from(">HH", buffer, offset + 7)
                if (class_id, method_id) == (60, 80):
                    tag = struct.unpack_from(">Q", buffer, offset + 11)[0]
                    self.confirmed = max(self.confirmed, tag)
                elif (class_id, method_id) in ((60, 120), (10, 50), (20, 40)):
                    self.errors += 1
                    if self.first_error is None:
                        self.first_error = buffer[offset : offset + 300]
            offset = end
        self.buffer = buffer[offset:]
        return self.confirmed - before


class AmqpConsumer(Receiver):
    """Manual acks: one multiple-ack per read, up to the last delivery tag."""

    def feed(self, data: bytes) -> None:
        if self.tail:
            data = self.tail + data
        data, self.tail = split_at_mark(data, MIN_PAYLOAD)
        seqs = SEQ_RE.findall(data)
        if seqs:
            self.deliveries += len(seqs)
            self.seqs.append(b"".join(seqs))
            self.out += basic_ack(self.deliveries, True)
            self.progress = self.deliveries
        for marker in _CLOSES:
            if marker in data:
                self.note_error(data, marker)


class AmqpDriver(Driver):
    name = "amqp"
    pubsub_acks = False
    queue_acks = True
    confirms_consumer_acks = False

    def __init__(self, host: str, port: int, run_id: str) -> None:
        super().__init__(host, port, run_id)
        self.server_version = ""

    def _open(self) -> AmqpConnection:
        sock = self.connect()
        conn = AmqpConnection(sock)
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        start = conn.expect(10, 10)
        found = re.search(rb"\x07versionS\x00\x00\x00(.)", start, re.DOTALL)
        if found:
            at = found.end()
            self.server_version = start[at : at + found.group(1)[0]].decode(errors="replace")
        start_ok = _NO_TABLE + shortstr(b"PLAIN") + longstr(b"\x00guest\x00guest")
        sock.sendall(method(10, 11, start_ok + shortstr(b"en_US"), channel=0))
        tune = conn.expect(10, 30)
        channel_max, frame_max, _ = struct.unpack(">HIH", tune[:8])
        frame_max = min(frame_max or 131072, 131072)
        sock.sendall(method(10, 31, struct.pack(">HIH", channel_max, frame_max, 0), channel=0))
        conn.call(method(10, 40, shortstr(b"/") + shortstr(b"") + b"\x00", channel=0), 10, 41)
        conn.call(method(20, 10, shortstr(b"")), 20, 11)
        return conn

    def encode_publish(self, topic: str, body: bytes, seq: int, queue: bool) -> bytes:
        if queue:
            exchange, key = b"", self.queue_name.encode()
        else:
            exchange, key = _TOPIC_EXCHANGE, topic.encode()
        publish = method(60, 40, b"\x00\x00" + shortstr(exchange) + shortstr(key) + b"\x00")
        persistent = queue and self.durable
        flags = 0x1000 if persistent else 0
        header = struct.pack(">HHQH", 60, 0, len(body), flags) + (b"\x02" if persistent else b"")
        return publish + frame(2, 1, header) + frame(3, 1, body)

    def open_publisher(self, queue: bool, durable: bool) -> tuple[socket.socket, ReplyCounter]:
        conn = self._open()
        if queue:
            conn.call(method(85, 10, b"\x00"), 85, 11)
            return conn.sock, ConfirmCounter()
        return conn.sock, ConfirmCounter()

    def open_subscriber(self, topics: list[str], latency: bool) -> Receiver:
        conn = self._open()
        # Exclusive (bit 2) + auto-delete (bit 3), server-named.
        declared = conn.call(
            method(50, 10, b"\x00\x00" + shortstr(b"") + b"\x0c" + _NO_TABLE), 50, 11
        )
        name = declared[1 : 1 + declared[0]]
        for topic in topics:
            bind = b"\x00\x00" + shortstr(name) + shortstr(_TOPIC_EXCHANGE)
            bind += shortstr(topic.encode()) + b"\x00" + _NO_TABLE
            conn.call(method(50, 20, bind), 50, 21)
        # no-ack (bit 1)
        consume = b"\x00\x00" + shortstr(name) + shortstr(b"") + b"\x02" + _NO_TABLE
        conn.call(method(60, 20, consume), 60, 21)
        return SeqReceiver(conn.sock, conn.hs.leftover(), latency=latency)

    def setup_queue(self, durable: bool, consumers: int, prefetch: int) -> None:
        conn = self._open()
        with conn.sock:
            name = shortstr(self.queue_name.encode())
            conn.call(method(50, 40, b"\x00\x00" + name + b"\x00"), 50, 41)
            flags = b"\x02" if durable else b"\x00"
            conn.call(method(50, 10, b"\x00\x00" + name + flags + _NO_TABLE), 50, 11)

    def teardown_queue(self) -> None:
        try:
            conn = self._open()
            with conn.sock:
                name = shortstr(self.queue_name.encode())
                conn.call(method(50, 40, b"\x00\x00" + name + b"\x00"), 50, 41)
        except (OSError, ConnectionError):
            pass

    def open_consumer(self, index: int, prefetch: int, durable: bool) -> Receiver:
        conn = self._open()
        conn.call(method(60, 10, struct.pack(">IHB", 0, prefetch, 0)), 60, 11)
        name = shortstr(self.queue_name.encode())
        consume = b"\x00\x00" + name + shortstr(b"c%d" % index) + b"\x00" + _NO_TABLE
        conn.call(method(60, 20, consume), 60, 21)
        consumer = AmqpConsumer(conn.sock)
        rest = conn.hs.leftover()
        if rest:
            consumer.feed(rest)
        return consumer

    def open_idle(self) -> socket.socket:
        return self._open().sock

    def version(self) -> str:
        if not self.server_version:
            self._open().sock.close()
        return self.server_version
