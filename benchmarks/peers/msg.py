"""msg's JSON-lines protocol (docs/protocol.md); also spoken by the reference relay.

- Publish: ``{"action":"publish","topic":T,"mode":M,"message":"@000..."}``, one line;
  every publish is answered with one line (an ack once stored).
- Publish without a reply (the ``msg-noreply`` driver, pub/sub only):
  ``{"action":"publish","topic":T,"mode":"pubsub","reply":false,"message":"@000..."}``;
  the broker answers nothing once it is stored and only an error (carrying
  ``"reply":false``), so the publish window is bounded by deliveries, as for NATS core
  and MQTT QoS 0, and the publisher only looks for error lines in what it reads.
- Subscribe: one line per topic, pipelined; set-up waits for one reply per topic.
- Queue consumers subscribe with ``"ack":"manual"`` and a ``prefetch``; for every read
  they send one ``bytes.join`` of ack requests. Progress counts the broker's replies
  to those acks (a message counts once msg has settled it).
"""

from __future__ import annotations

import json
import re
import socket
from typing import Final

from benchmarks.peers.base import (
    Driver,
    Handshake,
    LineReplies,
    NoReplies,
    Receiver,
    ReplyCounter,
    SeqReceiver,
)

_ERROR: Final = b'{"type":"error"'
_DELIVERY_RE: Final = re.compile(rb'"message":"@(\d{10})x*","message_id":"([^"]+)"')
_ACK_HEAD: Final = b'{"action":"ack","message_id":"'
_ACK_SEP: Final = b'"}\n{"action":"ack","message_id":"'
_ACK_TAIL: Final = b'"}\n'
_ACK_REPLY: Final = b'{"type":"ack","message_id"'
_REDELIVERED: Final = b'"redelivered":true'
# "reply" before the message and the message last: the shape the broker reads fastest.
_NO_REPLY_PUBLISH: Final = (
    b'{"action":"publish","topic":"%s","mode":"pubsub","reply":false,"message":"%s"}\n'
)


def _line(request: dict[str, object]) -> bytes:
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"


class MsgConsumer(Receiver):
    """A manual-ack queue consumer: acks every delivery of a read in one send."""

    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        super().__init__(sock)
        if leftover:
            self.feed(leftover)

    def feed(self, data: bytes) -> None:
        if self.tail:
            data = self.tail + data
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.tail = data[end:]
            data = data[:end]
        else:
            self.tail = b""
        if not data:
            return
        if _ERROR in data:
            self.note_error(data, _ERROR)
        self.progress += data.count(_ACK_REPLY)
        pairs = _DELIVERY_RE.findall(data)
        if pairs:
            numbers, ids = zip(*pairs, strict=True)
            self.deliveries += len(ids)
            self.seqs.append(b"".join(numbers))
            if _REDELIVERED in data:
                self.redelivered += data.count(_REDELIVERED)
            self.out += _ACK_HEAD + _ACK_SEP.join(ids) + _ACK_TAIL


class MsgDriver(Driver):
    name = "msg"
    pubsub_acks = True
    queue_acks = True

    def encode_publish(self, topic: str, body: bytes, seq: int, queue: bool) -> bytes:
        mode = b"queue" if queue else b"pubsub"
        name = (self.queue_name if queue else topic).encode()
        return b'{"action":"publish","topic":"%s","mode":"%s","message":"%s"}\n' % (
            name,
            mode,
            body,
        )

    def open_publisher(self, queue: bool, durable: bool) -> tuple[socket.socket, ReplyCounter]:
        return self.connect(), LineReplies(1, _ERROR)

    def _subscribe(self, requests: list[bytes]) -> tuple[socket.socket, bytes]:
        sock = self.connect()
        sock.sendall(b"".join(requests))
        hs = Handshake(sock, timeout=120.0)
        replies = hs.until(b"\n", len(requests))
        if _ERROR in replies:
            start = replies.find(_ERROR)
            raise ConnectionError(f"subscribe refused: {replies[start : start + 200]!r}")
        return sock, hs.leftover()

    def open_subscriber(self, topics: list[str], latency: bool) -> Receiver:
        requests = [_line({"action": "subscribe", "topic": t, "mode": "pubsub"}) for t in topics]
        sock, rest = self._subscribe(requests)
        return SeqReceiver(sock, rest, latency=latency, error_marker=_ERROR)

    def open_consumer(self, index: int, prefetch: int, durable: bool) -> Receiver:
        request = _line(
            {
                "action": "subscribe",
                "topic": self.queue_name,
                "mode": "queue",
                "ack": "manual",
                "prefetch": prefetch,
            }
        )
        sock, rest = self._subscribe([request])
        return MsgConsumer(sock, rest)

    def open_idle(self) -> socket.socket:
        sock = self.connect()
        sock.sendall(b'{"action":"ping"}\n')
        Handshake(sock).until(b"\n")
        return sock


class MsgNoReplyDriver(MsgDriver):
    """msg with ``"reply": false`` on every pub/sub publish: nothing comes back on success.

    The like-for-like counterpart of NATS core ``PUB`` and MQTT QoS 0 in D (neither answers
    a publish). Stored and delivered like any publish; loss and duplicates are counted at
    the subscriber as always, and an error the broker still sends (``queue_full``, or
    ``bad_request`` from a broker that predates the field) is counted from the publisher's
    reads. Not for the queue workloads: their point is acked durability.
    """

    name = "msg-noreply"
    pubsub_acks = False
    supports_queue = False

    def encode_publish(self, topic: str, body: bytes, seq: int, queue: bool) -> bytes:
        if queue:
            raise NotImplementedError("msg-noreply publishes to topics only")
        return _NO_REPLY_PUBLISH % (topic.encode(), body)

    def open_publisher(self, queue: bool, durable: bool) -> tuple[socket.socket, ReplyCounter]:
        return self.connect(), NoReplies(_ERROR)

    def open_consumer(self, index: int, prefetch: int, durable: bool) -> Receiver:
        raise NotImplementedError("msg-noreply has no queue workloads")


class RelayDriver(MsgDriver):
    """The reference relay speaks msg's pub/sub subset (no queues)."""

    name = "relay"
    supports_queue = False
