"""NATS: core pub/sub, and JetStream for the work queue.

- Connect: read ``INFO``, send ``CONNECT {"verbose":false,...}`` and ``PING``, wait for
  ``PONG``. Every connection answers the server's ``PING`` with ``PONG``.
- Pub/sub: ``PUB subject len`` (no reply: NATS core has no publish acks, so the
  publish window is bounded by deliveries); subscribers ``SUB`` every topic and
  confirm with a ``PING``/``PONG`` round trip.
- Queue: a JetStream stream (``workqueue`` retention; ``file`` storage for the durable
  workload E, ``memory`` for C) and one durable pull consumer (``ack_policy``
  ``explicit``, ``max_ack_pending`` = consumers x prefetch) shared by the consumers.
  The producer publishes with a reply subject and counts the stream's PubAcks. Each
  consumer keeps about ``prefetch`` messages requested (``CONSUMER.MSG.NEXT`` with
  ``batch`` prefetch/2) and acks every delivery of a read by publishing to its
  ``$JS.ACK...`` reply subject *with a reply subject of its own*, which makes the
  server confirm the ack (nats.go's ``AckSync``); progress counts those
  confirmations. The stream is created per run and deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from typing import Any, Final

from benchmarks.peers.base import (
    Driver,
    Handshake,
    Receiver,
    ReplyCounter,
    SeqReceiver,
)

_CONNECT: Final = (
    b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,'
    b'"protocol":1,"name":"msg-bench"}\r\nPING\r\n'
)
_PONG: Final = b"PONG\r\n"
_PING: Final = b"PING\r\n"
_MSG_LINE: Final = re.compile(rb"(?m)^MSG ")
_CONSUMER_RE: Final = re.compile(
    rb"MSG \S+ 1 (\S+) \d+\r\n@(\d{10})"  # a delivery (sid 1), with its ack subject
    rb"|(MSG \S+ 2 +0\r\n)"  # an ack confirmed (sid 2)
    rb"|(HMSG [^\r]*\r\nNATS/1.0 40[89])"
)
_EXPIRES_NS: Final = 50_000_000_000


def _answer_pings(data: bytes) -> bytes:
    return _PONG * data.count(_PING)


class NatsReplies(ReplyCounter):
    """Counts ``MSG`` replies (JetStream PubAcks) and answers ``PING``s."""

    def __init__(self) -> None:
        self.tail = b""

    def feed(self, data: bytes) -> int:
        data = self.tail + data
        end = data.rfind(b"\n") + 1
        data, self.tail = data[:end], data[end:]
        if _PING in data:
            self.out += _answer_pings(data)
        for marker in (b"-ERR", b'"error"'):
            if marker in data:
                self.errors += data.count(marker)
                if self.first_error is None:
                    start = data.find(marker)
                    self.first_error = data[start : start + 300]
        return len(_MSG_LINE.findall(data))


def _incomplete_from(data: bytes) -> int:
    """Where the last, incomplete message or line of ``data`` starts (len if none)."""
    end = data.rfind(b"\n") + 1
    cut = data.rfind(b"MSG ")
    if cut < 0:
        return end
    if cut > 0 and data[cut - 1 : cut] == b"H":
        cut -= 1
    header_end = data.find(b"\r\n", cut)
    if header_end < 0:
        return cut
    try:
        size = int(data[cut:header_end].rsplit(b" ", 1)[1])
    except (ValueError, IndexError):
        return end
    if len(data) < header_end + 2 + size + 2:
        return cut
    return end


class JetStreamConsumer(Receiver):
    """A pull consumer: keeps ~prefetch messages requested, acks with confirmation."""

    def __init__(
        self, sock: socket.socket, index: int, next_subject: bytes, batch: int, leftover: bytes
    ) -> None:
        super().__init__(sock)
        self.inbox = b"_INBOX.c%d" % index
        self.ack_inbox = b"_INBOX.a%d" % index
        body = json.dumps({"batch": batch, "expires": _EXPIRES_NS}).encode()
        self.pull = b"PUB %s %s %d\r\n%s\r\n" % (next_subject, self.inbox, len(body), body)
        self.batch = batch
        self.requested = 0
        self.tail = leftover
        self.poll()

    def poll(self) -> None:
        while self.requested - self.deliveries < 2 * self.batch:
            self.out += self.pull
            self.requested += self.batch

    def feed(self, data: bytes) -> None:
        if self.tail:
            data = self.tail + data
        cut = _incomplete_from(data)
        data, self.tail = data[:cut], data[cut:]
        if not data:
            return
        if _PING in data:
            self.out += _answer_pings(data)
        if b"-ERR" in data:
            self.note_error(data, b"-ERR")
        seqs = []
        acks = []
        suffix = b" " + self.ack_inbox + b" 0\r\n\r\n"
        for reply, seq, confirmed, status in _CONSUMER_RE.findall(data):
            if seq:
                seqs.append(seq)
                acks.append(b"PUB " + reply + suffix)
            elif confirmed:
                self.progress += 1
            elif status:
                self.requested = self.deliveries  # a pull request expired or was ended
        if seqs:
            self.deliveries += len(seqs)
            self.seqs.append(b"".join(seqs))
            self.out += b"".join(acks)


class NatsDriver(Driver):
    name = "nats"
    pubsub_acks = False
    queue_acks = True
    connect_line = _CONNECT

    def __init__(self, host: str, port: int, run_id: str) -> None:
        super().__init__(host, port, run_id)
        self.info: dict[str, Any] = {}

    @property
    def stream(self) -> str:
        return self.queue_name.upper()

    @property
    def subject(self) -> bytes:
        return f"{self.queue_name}.in".encode()

    def _open(self, setup: bytes = b"") -> tuple[socket.socket, Handshake]:
        sock = self.connect()
        hs = Handshake(sock)
        info = hs.until(b"\r\n")
        if info.startswith(b"INFO "):
            self.info = json.loads(info[5:])
        sock.sendall(self.connect_line + setup + (_PING if setup else b""))
        hs.until(_PONG, 2 if setup else 1)
        return sock, hs

    def encode_publish(self, topic: str, body: bytes, seq: int, queue: bool) -> bytes:
        if queue:
            return b"PUB %s _INBOX.pub %d\r\n%s\r\n" % (self.subject, len(body), body)
        return b"PUB %s %d\r\n%s\r\n" % (topic.encode(), len(body), body)

    def open_publisher(self, queue: bool, durable: bool) -> tuple[socket.socket, ReplyCounter]:
        sock, _ = self._open(b"SUB _INBOX.pub 1\r\n" if queue else b"")
        return sock, NatsReplies()

    def open_subscriber(self, topics: list[str], latency: bool) -> Receiver:
        subs = b"".join(b"SUB %s %d\r\n" % (t.encode(), i + 1) for i, t in enumerate(topics))
        sock, hs = self._open(subs)
        return SeqReceiver(
            sock, hs.leftover(), latency=latency, error_marker=b"-ERR", control=_answer_pings
        )

    def _request(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        sock, hs = self._open(b"SUB _INBOX.ctl 1\r\n")
        with sock:
            raw = json.dumps(body).encode()
            sock.sendall(b"PUB %s _INBOX.ctl %d\r\n%s\r\n" % (subject.encode(), len(raw), raw))
            header = hs.until(b"\r\n")
            while not header.startswith((b"MSG ", b"HMSG ")):
                header = hs.until(b"\r\n")
            size = int(header.split()[-1])
            reply: dict[str, Any] = json.loads(hs.exactly(size + 2) or b"{}")
            return reply

    def setup_queue(self, durable: bool, consumers: int, prefetch: int) -> None:
        stream = self.stream
        self._request(f"$JS.API.STREAM.DELETE.{stream}", {})
        config = {
            "name": stream,
            "subjects": [self.subject.decode()],
            "storage": "file" if durable else "memory",
            "retention": "workqueue",
            "num_replicas": 1,
        }
        reply = self._request(f"$JS.API.STREAM.CREATE.{stream}", config)
        if "error" in reply:
            raise ConnectionError(f"JetStream stream create failed: {reply['error']}")
        consumer = {
            "stream_name": stream,
            "config": {
                "durable_name": "workers",
                "ack_policy": "explicit",
                "deliver_policy": "all",
                "max_ack_pending": consumers * prefetch,
                "max_waiting": 512,
            },
        }
        reply = self._request(f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.workers", consumer)
        if "error" in reply:
            raise ConnectionError(f"JetStream consumer create failed: {reply['error']}")

    def teardown_queue(self) -> None:
        with contextlib.suppress(OSError):
            self._request(f"$JS.API.STREAM.DELETE.{self.stream}", {})

    def open_consumer(self, index: int, prefetch: int, durable: bool) -> Receiver:
        subs = b"SUB _INBOX.c%d 1\r\nSUB _INBOX.a%d 2\r\n" % (index, index)
        sock, hs = self._open(subs)
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.workers".encode()
        return JetStreamConsumer(sock, index, next_subject, max(1, prefetch // 2), hs.leftover())

    def open_idle(self) -> socket.socket:
        sock, _ = self._open()
        return sock

    def version(self) -> str:
        if not self.info:
            self._open()[0].close()
        return str(self.info.get("version", ""))


class NatsVerboseDriver(NatsDriver):
    """NATS in verbose mode: the server answers every ``PUB`` with ``+OK``.

    Not a way anyone would publish for speed; it is here for D, to measure what a reply
    to every publish costs the tail on its own (msg, the relay and Redis answer every
    publish; core NATS and MQTT QoS 0 do not). The publisher reads the ``+OK`` lines
    and counts nothing from them.
    """

    name = "nats-verbose"
    connect_line = _CONNECT.replace(b'"verbose":false', b'"verbose":true')
