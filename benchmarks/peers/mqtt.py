"""MQTT 3.1.1 (Mosquitto, amqtt): CONNECT, SUBSCRIBE and QoS 0 PUBLISH, raw bytes.

- CONNECT with a clean session and keep-alive 0 (no PINGREQ needed); wait for CONNACK
  with return code 0.
- Subscribers send one SUBSCRIBE (QoS 0) listing every topic and wait for its SUBACK.
- Publishes are QoS 0: no reply, so the publish window is bounded by deliveries (the
  same rule as for every broker). MQTT 3.1.1 has no work queues: workloads C and E
  are not applicable.
"""

from __future__ import annotations

import itertools
import socket
from typing import Final

from benchmarks.peers.base import Driver, Handshake, NoReplies, Receiver, ReplyCounter, SeqReceiver

_CLIENT_IDS: Final = itertools.count(1)


def remaining_length(size: int) -> bytes:
    """MQTT's variable-length integer."""
    out = bytearray()
    while True:
        digit, size = size % 128, size // 128
        out.append(digit | (0x80 if size else 0))
        if not size:
            return bytes(out)


def utf8(text: bytes) -> bytes:
    return len(text).to_bytes(2, "big") + text


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + remaining_length(len(body)) + body


class MqttDriver(Driver):
    name = "mqtt"
    pubsub_acks = False
    supports_queue = False

    def encode_publish(self, topic: str, body: bytes, seq: int, queue: bool) -> bytes:
        return packet(0x30, utf8(topic.encode()) + body)

    def _open(self) -> tuple[socket.socket, Handshake]:
        sock = self.connect()
        client_id = b"bench-%s-%d" % (self.run_id.encode(), next(_CLIENT_IDS))
        # Protocol "MQTT" level 4, flags: clean session; keep-alive 0.
        variable = utf8(b"MQTT") + b"\x04\x02\x00\x00"
        sock.sendall(packet(0x10, variable + utf8(client_id)))
        hs = Handshake(sock)
        connack = hs.exactly(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"MQTT CONNECT refused: {connack!r}")
        return sock, hs

    def open_publisher(self, queue: bool, durable: bool) -> tuple[socket.socket, ReplyCounter]:
        sock, _ = self._open()
        return sock, NoReplies()

    def open_subscriber(self, topics: list[str], latency: bool) -> Receiver:
        sock, hs = self._open()
        filters = b"".join(utf8(t.encode()) + b"\x00" for t in topics)
        sock.sendall(packet(0x82, b"\x00\x01" + filters))
        first = hs.exactly(1)
        if first[0] != 0x90:
            raise ConnectionError(f"expected SUBACK, got {first!r}")
        size = multiplier = 0
        shift = 1
        while True:
            byte = hs.exactly(1)[0]
            size += (byte & 0x7F) * shift
            shift *= 128
            multiplier += 1
            if not byte & 0x80 or multiplier > 4:
                break
        codes = hs.exactly(size)[2:]
        if any(code == 0x80 for code in codes):
            raise ConnectionError("MQTT SUBSCRIBE refused")
        return SeqReceiver(sock, hs.leftover(), latency=latency)

    def open_idle(self) -> socket.socket:
        sock, _ = self._open()
        return sock
