"""What every protocol driver shares: payloads, connections and the receive side.

Payloads
--------
Every message body, in every protocol, starts with ``@`` and a 10-digit sequence
number, padded with ``x`` to the payload size: ``@0000000042xxxx...``. The latency
workload adds ``t`` and a 19-digit send time (``time.monotonic_ns()`` of the generator,
which also receives, so no clocks need to agree). A receiver never parses a protocol
frame to count messages: one C-level ``findall`` of ``@(\\d{10})`` over each read finds
every sequence number, whatever the framing around it (JSON lines, RESP, NATS text,
MQTT or AMQP binary frames). No frame of any driver contains ``@`` followed by ten
digits anywhere but in a payload.

A message split across two reads is handled by keeping the bytes from the last ``@``
that has fewer than 10 digits after it and prepending them to the next read: every
match is counted once, in the read where it completes.

Loss and duplicates are counted after the clock stops, from the sequence numbers
collected (10 bytes per message, joined once per read).
"""

from __future__ import annotations

import re
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

SEQ_DIGITS: Final = 10
STAMP_DIGITS: Final = 19
MIN_PAYLOAD: Final = 1 + SEQ_DIGITS
MIN_STAMPED_PAYLOAD: Final = 1 + SEQ_DIGITS + 1 + STAMP_DIGITS
RECV_BYTES: Final = 1 << 18

SEQ_RE: Final = re.compile(rb"@(\d{10})")
STAMP_RE: Final = re.compile(rb"@(\d{10})t(\d{19})")


def payload(seq: int, size: int) -> bytes:
    """The body of message ``seq``: ``@`` + 10 digits, ``x``-padded to ``size`` bytes."""
    if size < MIN_PAYLOAD:
        raise ValueError(f"payload must be at least {MIN_PAYLOAD} bytes")
    return b"@%010d" % seq + b"x" * (size - MIN_PAYLOAD)


def stamped_payload(seq: int, sent_ns: int, size: int) -> bytes:
    """A latency-workload body: sequence number and send time, padded to ``size``."""
    head = b"@%010dt%019d" % (seq, sent_ns)
    return head + b"x" * max(0, size - len(head))


def connect(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A blocking TCP connection with Nagle off (set-up is blocking, runs are not)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Handshake:
    """Blocking reads for set-up: request/response exchanges before the clock starts."""

    def __init__(self, sock: socket.socket, timeout: float = 15.0) -> None:
        self.sock = sock
        self.buffer = b""
        self.deadline = time.monotonic() + timeout

    def fill(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("set-up timed out")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(RECV_BYTES)
        if not chunk:
            raise ConnectionError("the broker closed the connection during set-up")
        self.buffer += chunk

    def until(self, marker: bytes, count: int = 1) -> bytes:
        """Read until ``marker`` has been seen ``count`` times; return everything up to
        and including the last one (the rest stays buffered)."""
        seen = 0
        start = 0
        while True:
            index = self.buffer.find(marker, start)
            if index < 0:
                start = max(0, len(self.buffer) - len(marker) + 1)
                self.fill()
                continue
            seen += 1
            start = index + len(marker)
            if seen == count:
                head, self.buffer = self.buffer[:start], self.buffer[start:]
                return head

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.fill()
        head, self.buffer = self.buffer[:size], self.buffer[size:]
        return head

    def leftover(self) -> bytes:
        """What was read past the set-up (already deliveries, perhaps)."""
        rest, self.buffer = self.buffer, b""
        return rest


class ReplyCounter(ABC):
    """Counts the publisher's replies (acks, confirms) in whatever it reads."""

    errors: int = 0
    first_error: bytes | None = None

    @abstractmethod
    def feed(self, data: bytes) -> int:
        """Replies completed by ``data``; may queue bytes to send in :attr:`out`."""

    out: bytes = b""


class NoReplies(ReplyCounter):
    """Publishes that get no answer (MQTT QoS 0, NATS core, msg with ``"reply": false``).

    With an ``error_marker``, counts the errors the broker still sends; the marker's
    first bytes at the end of a read are kept for the next, so one cut in two still
    counts (once: what is kept is shorter than the marker).
    """

    def __init__(self, error_marker: bytes | None = None) -> None:
        self.error_marker = error_marker
        self.tail = b""

    def feed(self, data: bytes) -> int:
        marker = self.error_marker
        if marker:
            if self.tail:
                data = self.tail + data
            if marker in data:
                self.errors += data.count(marker)
                if self.first_error is None:
                    start = data.find(marker)
                    end = data.find(b"\n", start)
                    self.first_error = data[start : end if end >= 0 else None][:300]
            self.tail = data[1 - len(marker) :] if len(marker) > 1 else b""
        return 0


class LineReplies(ReplyCounter):
    """Replies that are ``lines`` newline-terminated lines each (msg, RESP)."""

    def __init__(self, lines: int = 1, error_marker: bytes | None = None) -> None:
        self.lines = lines
        self.newlines = 0
        self.replies = 0
        self.error_marker = error_marker

    def feed(self, data: bytes) -> int:
        self.newlines += data.count(b"\n")
        if self.error_marker and self.error_marker in data:
            self.errors += data.count(self.error_marker)
            if self.first_error is None:
                start = data.find(self.error_marker)
                self.first_error = data[start : data.find(b"\n", start)][:300]
        total = self.newlines // self.lines
        new, self.replies = total - self.replies, total
        return new


@dataclass
class Receiver:
    """One receiving connection (subscriber or queue consumer) in the generator's loop.

    ``deliveries`` counts messages received; ``progress`` what the workload counts
    (deliveries for pub/sub; for queues, acks the broker confirmed, or acks sent
    where the protocol confirms none). Subclasses implement :meth:`feed`.
    """

    sock: socket.socket
    tail: bytes = b""
    deliveries: int = 0
    progress: int = 0
    redelivered: int = 0
    errors: int = 0
    first_error: bytes | None = None
    seqs: list[bytes] = field(default_factory=list)
    latencies_ns: list[int] = field(default_factory=list)
    out: bytes = b""
    closed: bool = False
    want_write: bool = False
    clock: Callable[[], int] = time.monotonic_ns

    def readable(self) -> None:
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        self.feed(data)
        if self.out:
            self.flush()

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    def poll(self) -> None:
        """Called every loop iteration: for drivers that must ask for more (pulls)."""

    def flush(self) -> None:
        out = self.out
        while out:
            try:
                n = self.sock.send(out)
            except BlockingIOError:
                break
            except OSError:
                self.closed = True
                out = b""
                break
            out = out[n:]
        self.out = out
        self.want_write = bool(out)

    def note_error(self, data: bytes, marker: bytes) -> None:
        self.errors += data.count(marker)
        if self.first_error is None:
            start = data.find(marker)
            self.first_error = data[start : start + 300]


def split_at_mark(data: bytes, need: int) -> tuple[bytes, bytes]:
    """Cut ``data`` before a trailing ``@`` that has fewer than ``need`` bytes after it."""
    cut = data.rfind(b"@")
    if cut >= 0 and len(data) - cut <= need:
        return data[:cut], data[cut:]
    return data, b""


class SeqReceiver(Receiver):
    """A pub/sub subscriber in any protocol: counts sequence numbers (or latencies).

    ``control`` (optional) looks at each read for keep-alives to answer (NATS PING)
    and returns bytes to send. ``error_marker`` counts error frames.
    """

    def __init__(
        self,
        sock: socket.socket,
        leftover: bytes = b"",
        *,
        latency: bool = False,
        error_marker: bytes | None = None,
        control: Callable[[bytes], bytes] | None = None,
    ) -> None:
        super().__init__(sock)
        self.latency = latency
        self.error_marker = error_marker
        self.control = control
        self.need = MIN_STAMPED_PAYLOAD if latency else MIN_PAYLOAD
        if leftover:
            self.feed(leftover)

    def feed(self, data: bytes) -> None:
        if self.tail:
            data = self.tail + data
        data, self.tail = split_at_mark(data, self.need)
        if self.control is not None:
            reply = self.control(data)
            if reply:
                self.out += reply
        if self.error_marker is not None and self.error_marker in data:
            self.note_error(data, self.error_marker)
        if self.latency:
            now = self.clock()
            pairs = STAMP_RE.findall(data)
            if pairs:
                self.seqs.append(b"".join([seq for seq, _ in pairs]))
                self.latencies_ns.extend(now - int(sent) for _, sent in pairs)
                self.deliveries += len(pairs)
                self.progress += len(pairs)
            return
        seqs = SEQ_RE.findall(data)
        if seqs:
            self.seqs.append(b"".join(seqs))
            self.deliveries += len(seqs)
            self.progress += len(seqs)


class Driver(ABC):
    """One broker's protocol, as much of it as the workloads need."""

    name: str = ""
    pubsub_acks = False
    """Do pub/sub publishes get a reply (used for the publish window)?"""
    queue_acks = True
    """Do queue publishes get a reply (confirms)?"""
    supports_queue = True
    confirms_consumer_acks = True
    """Does the broker answer a consumer's ack (so progress counts confirmed acks)?"""

    def __init__(self, host: str, port: int, run_id: str) -> None:
        self.host = host
        self.port = port
        self.run_id = run_id
        self.durable = False
        """Queue workloads: durable queue and persistent messages (set before encoding)."""

    def connect(self) -> socket.socket:
        return connect(self.host, self.port)

    def topic(self, index: int) -> str:
        """Topic names of one width, so every publish frame has the same length."""
        return f"bench.t{index:06d}"

    @property
    def queue_name(self) -> str:
        return f"benchq{self.run_id}"

    @abstractmethod
    def encode_publish(self, topic: str, body: bytes, seq: int, queue: bool) -> bytes:
        """One publish frame (to a topic, or to the queue when ``queue``)."""

    @abstractmethod
    def open_publisher(self, queue: bool, durable: bool) -> tuple[socket.socket, ReplyCounter]:
        """A connected, set-up publishing connection and its reply counter."""

    @abstractmethod
    def open_subscriber(self, topics: list[str], latency: bool) -> Receiver:
        """A connection subscribed to ``topics`` (confirmed) that counts deliveries."""

    def setup_queue(self, durable: bool, consumers: int, prefetch: int) -> None:  # noqa: B027
        """Create the queue (stream, consumer group) before anything connects."""

    def teardown_queue(self) -> None:  # noqa: B027
        """Delete what :meth:`setup_queue` created."""

    def open_consumer(self, index: int, prefetch: int, durable: bool) -> Receiver:
        raise NotImplementedError(f"{self.name} has no queue driver")

    @abstractmethod
    def open_idle(self) -> socket.socket:
        """A connection that completed the protocol's handshake and one round trip."""

    def version(self) -> str:
        return ""
