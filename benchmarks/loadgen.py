"""The load generator: one process that drives one workload and prints one JSON line.

``benchmarks/throughput.py`` starts it (pinned to its own core) once per workload;
it can also be run by hand against any broker speaking msg's protocol::

    python benchmarks/loadgen.py --workload pubsub --port 8888 --messages 100000

Method
------
The generator must never be what limits the figure, so it does as little Python work
per message as it can:

- Raw non-blocking sockets and one ``selectors`` loop (epoll on Linux); no asyncio,
  no msg client.
- Every publish request is encoded before the clock starts, into one ``bytes`` of
  ``N`` requests of identical length (the sequence number is zero-padded and the
  payload fixed-size), so sending is ``sock.send(view[a:b])`` on a memoryview slice.
- Publishing is pipelined with a bounded window: at most ``--window`` publishes are
  unacked at any time (the publisher sends whatever the window allows whenever an
  ack arrives or the socket is writable).
- Publisher acks are counted with ``bytes.count(b"\\n")``: nothing is parsed.
- Receivers cut each read at its last newline and run one C-level regular expression
  over the complete lines: it pulls out the 10-digit sequence number (and, for
  manual-ack consumers, the ``message_id``). A consumer's acks for a whole read are
  built with one ``bytes.join`` and sent with one ``send``.
- Sequence numbers are only collected (10 bytes per message) while the clock runs;
  the loss/duplicate check over them happens after it stops.

Workloads
---------
``pubsub``: 1 publisher -> 1 subscriber on a topic. Progress = deliveries received.
``queue``: 1 producer -> ``--consumers`` consumers on a queue, manual acks with
``--prefetch`` credit each; every consumer acks every message it gets. Progress = ack
replies received by the consumers (a message counts once the broker confirmed its
ack).

Timing: the clock for the reported rate starts when progress passes ``--warmup``
(a fraction of N, default 10%) and stops when progress reaches N, so connection set-up
and the pipeline filling are excluded. CPU time is sampled at the same two moments:
this process's from ``time.process_time()``, the broker's from ``/proc/<pid>/stat``
(``utime + stime``), so "broker CPU %" and "generator CPU %" are busy-ness over the
same wall-clock window (100% = one core).

Bounds: the run ends when progress reaches N, or when the publisher is fully acked and
nothing arrives for ``--idle`` seconds (loss), or at ``--timeout`` seconds of wall
time, whichever comes first; the JSON says which (``status``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

SEQ_DIGITS: Final = 10
RECV_BYTES: Final = 1 << 18
PUBSUB_TOPIC: Final = "bench.pubsub"
QUEUE_NAME: Final = "bench.queue"

# In a delivery frame the payload is a JSON string: 10 digits, then padding 'x's.
_SEQ_RE: Final = re.compile(rb'"message":"(\d{10})')
_DELIVERY_RE: Final = re.compile(rb'"message":"(\d{10})x*","message_id":"([^"]+)"')
_ACK_HEAD: Final = b'{"action":"ack","message_id":"'
_ACK_SEP: Final = b'"}\n{"action":"ack","message_id":"'
_ACK_TAIL: Final = b'"}\n'
_ACK_REPLY: Final = b'{"type":"ack","message_id"'
_ERROR: Final = b'{"type":"error"'
_REDELIVERED: Final = b'"redelivered":true'


# ----------------------------------------------------------------------
# CPU accounting


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all threads), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it are plain.
    fields = raw[raw.rfind(b")") + 2 :].split()
    # Fields 14 and 15 (utime, stime) are at index 11 and 12 after the name.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------
# Requests


def encode_publishes(topic: str, mode: str, count: int, payload_bytes: int) -> tuple[bytes, int]:
    """``count`` publish requests, all the same length; return (bytes, length of one).

    The message is a JSON string of ``payload_bytes`` characters: the zero-padded
    sequence number, then ``x`` padding.
    """
    if payload_bytes < SEQ_DIGITS:
        raise ValueError(f"payload must be at least {SEQ_DIGITS} bytes")
    head = b'{"action":"publish","topic":%s,"mode":"%s","message":"' % (
        json.dumps(topic).encode(),
        mode.encode(),
    )
    tail = b"x" * (payload_bytes - SEQ_DIGITS) + b'"}\n'
    width = b"%0" + str(SEQ_DIGITS).encode() + b"d"
    data = b"".join([head + width % i + tail for i in range(count)])
    return data, len(head) + SEQ_DIGITS + len(tail)


def subscribe_request(topic: str, mode: str, manual: bool, prefetch: int) -> bytes:
    request: dict[str, Any] = {"action": "subscribe", "topic": topic, "mode": mode}
    if manual:
        request["ack"] = "manual"
        request["prefetch"] = prefetch
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"


# ----------------------------------------------------------------------
# Connections


def connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request_reply(sock: socket.socket, request: bytes, deadline: float) -> tuple[bytes, bytes]:
    """Send one request and block for one reply line; return (line, bytes after it)."""
    sock.sendall(request)
    buffer = b""
    while b"\n" not in buffer:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(RECV_BYTES)
        if not chunk:
            raise ConnectionError("the broker closed the connection during set-up")
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    return line, rest


class Publisher:
    """Sends the pre-encoded publishes, keeping at most ``window`` unacked."""

    def __init__(self, sock: socket.socket, data: bytes, frame_len: int, window: int) -> None:
        self.sock = sock
        self.view = memoryview(data)
        self.frame_len = frame_len
        self.total = len(data) // frame_len
        self.window = window
        self.sent_bytes = 0
        self.answered = 0  # acks + errors
        self.errors = 0
        self.first_error: bytes | None = None
        self.closed = False
        self.want_write = False

    @property
    def done(self) -> bool:
        return self.answered >= self.total

    def pump(self) -> None:
        """Send as much as the window allows without blocking."""
        limit = min(self.total, self.answered + self.window) * self.frame_len
        sent = self.sent_bytes
        while sent < limit:
            try:
                n = self.sock.send(self.view[sent:limit])
            except BlockingIOError:
                break
            except OSError:
                self.closed = True
                break
            sent += n
        self.sent_bytes = sent
        self.want_write = sent < limit and not self.closed

    def readable(self) -> int:
        """Read acks; return how many replies arrived."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return 0
        replies = data.count(b"\n")
        self.answered += replies
        if _ERROR in data:
            self.errors += data.count(_ERROR)
            if self.first_error is None:
                start = data.find(_ERROR)
                self.first_error = data[start : data.find(b"\n", start)]
        self.pump()
        return replies


class Receiver:
    """A subscriber (pub/sub) or a manual-ack consumer (queue)."""

    def __init__(self, sock: socket.socket, manual: bool, leftover: bytes) -> None:
        self.sock = sock
        self.manual = manual
        self.tail = leftover
        self.deliveries = 0
        self.acked = 0  # ack replies from the broker (manual mode)
        self.redelivered = 0
        self.errors = 0
        self.first_error: bytes | None = None
        self.seqs: list[bytes] = []
        self.out = b""
        self.closed = False
        self.want_write = False

    def readable(self) -> int:
        """Read deliveries (and ack replies); return the progress made."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return 0
        return self.feed(data)

    def feed(self, data: bytes) -> int:
        if self.tail:
            data = self.tail + data
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.tail = data[end:]
            data = data[:end]
        else:
            self.tail = b""
        if not data:
            return 0
        if _ERROR in data:
            self.errors += data.count(_ERROR)
            if self.first_error is None:
                start = data.find(_ERROR)
                self.first_error = data[start : data.find(b"\n", start)]
        if not self.manual:
            seqs = _SEQ_RE.findall(data)
            self.deliveries += len(seqs)
            self.seqs.append(b"".join(seqs))
            return len(seqs)
        pairs = _DELIVERY_RE.findall(data)
        acked = data.count(_ACK_REPLY)
        self.acked += acked
        if pairs:
            numbers, ids = zip(*pairs, strict=True)
            self.deliveries += len(ids)
            self.seqs.append(b"".join(numbers))
            if _REDELIVERED in data:
                self.redelivered += data.count(_REDELIVERED)
            self.out += _ACK_HEAD + _ACK_SEP.join(ids) + _ACK_TAIL
            self.flush()
        return acked

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


# ----------------------------------------------------------------------
# The run


@dataclass
class Result:
    """What one generator run measured; printed as one JSON object."""

    workload: str
    messages: int
    payload: int
    window: int
    status: str = "ok"
    published_acked: int = 0
    publish_errors: int = 0
    progress: int = 0
    """Deliveries (pubsub) or confirmed acks (queue)."""
    deliveries: int = 0
    unique: int = 0
    lost: int = 0
    duplicated: int = 0
    redelivered: int = 0
    receive_errors: int = 0
    first_error: str | None = None
    connections_closed: int = 0
    rate: float = 0.0
    """Progress per second over the timed window."""
    window_messages: int = 0
    window_seconds: float = 0.0
    total_seconds: float = 0.0
    """From the first publish until the run ended."""
    generator_cpu_seconds: float = 0.0
    broker_cpu_seconds: float | None = None
    generator_cpu_percent: float = 0.0
    broker_cpu_percent: float | None = None
    consumer_share: list[int] = field(default_factory=list)
    """Deliveries per consumer (queue), to see how evenly the broker spread them."""
    publish_seconds: float | None = None
    """When the last publish was answered (seconds from the first publish)."""
    progress_when_published: int = 0
    """Progress at that moment: low for queues means consumers were starved."""
    max_stall_seconds: float = 0.0
    """Longest time without progress between the first and the last message."""
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds since start, publishes answered, progress) every ``--sample`` s."""


def run(options: argparse.Namespace) -> Result:
    workload: str = options.workload
    total: int = options.messages
    result = Result(workload, total, options.payload, options.window)
    deadline = time.monotonic() + options.timeout
    manual = workload == "queue"
    topic, mode = (QUEUE_NAME, "queue") if manual else (PUBSUB_TOPIC, "pubsub")
    data, frame_len = encode_publishes(topic, mode, total, options.payload)

    receivers: list[Receiver] = []
    for _ in range(options.consumers if manual else 1):
        sock = connect(options.host, options.port)
        request = subscribe_request(topic, mode, manual, options.prefetch)
        line, rest = request_reply(sock, request, deadline)
        if not line.startswith(b'{"type":"ack"'):
            raise ConnectionError(f"subscribe refused: {line[:200]!r}")
        sock.setblocking(False)
        receivers.append(Receiver(sock, manual, rest))
    pub_sock = connect(options.host, options.port)
    pub_sock.setblocking(False)
    publisher = Publisher(pub_sock, data, frame_len, options.window)

    selector = selectors.DefaultSelector()
    selector.register(pub_sock, selectors.EVENT_READ, publisher)
    for receiver in receivers:
        selector.register(receiver.sock, selectors.EVENT_READ, receiver)
    writing: dict[socket.socket, bool] = {}

    def want_write(sock: socket.socket, wanted: bool, owner: Publisher | Receiver) -> None:
        if writing.get(sock, False) != wanted:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
            selector.modify(sock, events, owner)
            writing[sock] = wanted

    broker_pid: int | None = options.broker_pid
    warm_at = int(total * options.warmup)
    progress = 0
    warm_time = warm_cpu = 0.0
    warm_broker: float | None = None
    warm_progress = 0
    end_time = end_cpu = 0.0
    end_broker: float | None = None
    last_progress_time = start = time.monotonic()
    if warm_at == 0:
        warm_time, warm_cpu = start, time.process_time()
        warm_broker = proc_cpu_seconds(broker_pid) if broker_pid else None
    for receiver in receivers:
        progress += receiver.feed(b"")  # set-up leftovers (an empty queue has none)
    publisher.pump()
    want_write(pub_sock, publisher.want_write, publisher)
    select = selector.select
    timeline: list[tuple[float, int, int]] = []
    next_sample = start
    max_stall = 0.0
    seen_progress = False
    published_at: float | None = None
    progress_when_published = 0
    status = "ok"
    while True:
        now = time.monotonic()
        if progress >= total and publisher.done:
            break
        if now >= deadline:
            status = "timeout"
            break
        if publisher.done and now - last_progress_time >= options.idle:
            status = "incomplete"
            break
        if publisher.closed or any(r.closed for r in receivers):
            status = "disconnected"
            break
        events = select(0.05)
        before = progress
        for key, mask in events:
            owner: Publisher | Receiver = key.data
            if mask & selectors.EVENT_READ:
                got = owner.readable()
                if owner is not publisher:
                    progress += got
            if mask & selectors.EVENT_WRITE:
                if isinstance(owner, Publisher):
                    owner.pump()
                else:
                    owner.flush()
            want_write(owner.sock, owner.want_write, owner)
        if progress != before:
            now = time.monotonic()
            if seen_progress and now - last_progress_time > max_stall:
                max_stall = now - last_progress_time
            seen_progress = True
            last_progress_time = now
            if warm_progress == 0 and progress >= warm_at and warm_at > 0:
                warm_time, warm_cpu, warm_progress = now, time.process_time(), progress
                warm_broker = proc_cpu_seconds(broker_pid) if broker_pid else None
            if end_broker is None:
                end_time, end_cpu = now, time.process_time()
                if progress >= total:
                    end_broker = proc_cpu_seconds(broker_pid) if broker_pid else None
        if publisher.done and published_at is None:
            published_at, progress_when_published = time.monotonic(), progress
        if now >= next_sample:
            timeline.append((round(now - start, 3), publisher.answered, progress))
            next_sample = now + options.sample
    if end_broker is None and broker_pid:
        end_broker = proc_cpu_seconds(broker_pid)
    finished = time.monotonic()
    result.status = status
    result.total_seconds = round(finished - start, 4)
    result.published_acked = publisher.answered - publisher.errors
    result.publish_errors = publisher.errors
    result.progress = progress
    seen = bytearray(total)
    duplicated = 0
    for receiver in receivers:
        result.deliveries += receiver.deliveries
        result.redelivered += receiver.redelivered
        result.receive_errors += receiver.errors
        result.consumer_share.append(receiver.deliveries)
        for blob in receiver.seqs:
            for offset in range(0, len(blob), SEQ_DIGITS):
                seq = int(blob[offset : offset + SEQ_DIGITS])
                if seen[seq]:
                    duplicated += 1
                else:
                    seen[seq] = 1
    first_error = publisher.first_error or next(
        (r.first_error for r in receivers if r.first_error), None
    )
    result.first_error = first_error.decode(errors="replace")[:300] if first_error else None
    result.unique = seen.count(1)
    result.lost = total - result.unique
    result.duplicated = duplicated
    result.max_stall_seconds = round(max_stall, 3)
    if published_at is not None:
        result.publish_seconds = round(published_at - start, 4)
        result.progress_when_published = progress_when_published
    result.timeline = timeline
    result.connections_closed = sum(1 for r in receivers if r.closed) + int(publisher.closed)
    window_seconds = end_time - warm_time if warm_time else 0.0
    if window_seconds > 0:
        window_messages = progress - warm_progress
        result.window_messages = window_messages
        result.window_seconds = round(window_seconds, 4)
        result.rate = round(window_messages / window_seconds, 1)
        result.generator_cpu_seconds = round(end_cpu - warm_cpu, 3)
        result.generator_cpu_percent = round(100 * (end_cpu - warm_cpu) / window_seconds, 1)
        if warm_broker is not None and end_broker is not None:
            result.broker_cpu_seconds = round(end_broker - warm_broker, 3)
            result.broker_cpu_percent = round(100 * (end_broker - warm_broker) / window_seconds, 1)
    selector.close()
    for receiver in receivers:
        receiver.sock.close()
    pub_sock.close()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["pubsub", "queue"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=100, help="message size in bytes")
    parser.add_argument("--window", type=int, default=10_000, help="max unacked publishes")
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--warmup", type=float, default=0.0, help="fraction of N untimed")
    parser.add_argument("--timeout", type=float, default=60.0, help="wall-time bound, seconds")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds without progress")
    parser.add_argument("--sample", type=float, default=0.5, help="timeline interval, s")
    parser.add_argument("--broker-pid", type=int, help="sample this process's CPU time")
    options = parser.parse_args(argv)
    if options.messages < 1 or options.window < 1 or not 0 <= options.warmup < 1:
        parser.error("--messages and --window must be positive, --warmup in [0, 1)")
    if options.payload < SEQ_DIGITS:
        parser.error(f"--payload must be at least {SEQ_DIGITS}")
    return options


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    options = parse_args(argv)
    try:
        result = run(options)
    except (OSError, ConnectionError) as exc:
        emit(json.dumps({"workload": options.workload, "status": "error", "error": str(exc)}))
        return 1
    emit(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
