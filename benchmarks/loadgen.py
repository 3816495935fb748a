"""The load generator: one process drives one workload against one broker, prints JSON.

``benchmarks/suite.py`` starts it (pinned to its own core) once per measurement; it
can also be run by hand against any broker it has a driver for::

    python -m benchmarks.loadgen --driver msg --port 8888 --workload pubsub
    python -m benchmarks.loadgen --driver redis --port 6379 --workload pubsub --subscribers 10

Method
------
The generator must never be what limits the figure, so it does as little Python work
per message as it can:

- Raw non-blocking sockets and one ``selectors`` loop (epoll on Linux); no asyncio,
  no client library, for any protocol (drivers in :mod:`benchmarks.peers`).
- Every publish frame is encoded before the clock starts into one ``bytes`` of
  identical-length frames (fixed-width sequence numbers and topic names, fixed
  payload), so publishing is ``sock.send(view[a:b])`` on a memoryview slice.
- Publishing is pipelined with a bounded window: at most ``--window`` messages (and
  at most ``--window-bytes`` bytes) are in flight, i.e. sent and not yet both
  answered (where the protocol answers publishes) and delivered to the slowest
  subscriber (pub/sub) or settled by a consumer (queues). The same rule holds for
  every broker, so none is fed faster than it drains.
- Receivers count messages with one C-level ``findall`` per read (see
  :mod:`benchmarks.peers.base`); queue consumers build all the acks of a read with
  one ``bytes.join`` (or one multiple-ack frame, for AMQP) and send them at once.
- Sequence numbers are only collected while the clock runs; loss and duplicates are
  counted after it stops.

Workloads (``--workload``)
--------------------------
``pubsub``: 1 publisher -> ``--subscribers`` subscribers, each subscribed to all
``--topics`` topics (the publisher round-robins over them). Progress = deliveries.
``queue``: 1 producer -> ``--consumers`` manual-ack consumers with ``--prefetch``
credit. Progress = acks the broker confirmed (or acks sent, where the protocol has no
ack reply: AMQP).
``latency``: 1 publisher at a fixed ``--rate`` for ``--duration`` seconds, each body
carrying its send time; the subscriber (same process, same clock) records one-way
latency per message. The generator sleeps in epoll between messages, so its own
wake-up time is in the figures, the same for every broker (``--spin`` polls instead:
on a shared VM that pushes other processes onto the broker's core, which is worse).
Send times come from a kernel timer (``--pacing timer``, Linux's timerfd, nanosecond
resolution). An epoll timeout has millisecond resolution (``--pacing selector``): at
1,000 msgs/s the generator then wakes up to a millisecond late, and catches up by
sending two messages back to back, for about one message in five, in a pattern that
depends on when the broker's replies wake it. The result records how late each send
was against its schedule (``send_late_us``).
``backlog``: publish ``--messages`` to a queue with no consumer, then start the
consumers and drain it: publish rate and drain rate.
``idle``: open ``--connections`` connections (steps of ``--levels``), each completing
the protocol handshake and one round trip, and read the broker's RSS at each step.

Bounds: publishing stops after ``--messages`` messages or ``--duration`` seconds,
whichever comes first; then the run waits for what was published to arrive. It ends
when everything arrived, or when nothing arrived for ``--idle`` seconds (status
``incomplete``), or at ``--timeout`` seconds (``timeout``), or if a connection drops
(``disconnected``).

Timing and CPU: the rate is progress per second from ``--warmup`` seconds after the
first publish to the last progress (see :class:`Clock`), so connection set-up and
filling the pipeline are excluded. CPU time is sampled at the same two
moments: this process's from ``time.process_time()``, the broker's from
``/proc/<pid>/stat`` (``utime + stime``, all threads), so "broker CPU %" and
"generator CPU %" are busy-ness over the same wall-clock window (100% = one core).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import secrets
import selectors
import socket
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.peers import DRIVERS, get_driver
from benchmarks.peers.base import (
    MIN_PAYLOAD,
    MIN_STAMPED_PAYLOAD,
    SEQ_DIGITS,
    Driver,
    Receiver,
    ReplyCounter,
    payload,
    stamped_payload,
)

MAX_ENCODED_BYTES = 1 << 30
"""Pre-encoded publishes are capped at this many bytes (fewer messages, not bigger)."""


# ----------------------------------------------------------------------
# Process accounting


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all threads), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it are plain.
    fields = raw[raw.rfind(b")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def system_busy_seconds(cpus: frozenset[int] | None = None) -> float | None:
    """CPU seconds that processes ran since boot (``/proc/stat``): on ``cpus``, or all.

    user + nice + system only: interrupt and softirq time (where loopback packets are
    processed) belongs to no process, on either side of the subtraction.
    """
    wanted = {"cpu"} if cpus is None else {f"cpu{n}" for n in cpus}
    total = 0
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                if not line.startswith("cpu"):
                    break
                fields = line.split()
                if fields[0] in wanted:
                    total += sum(int(x) for x in fields[1:4])
    except OSError:
        return None
    return total / os.sysconf("SC_CLK_TCK")


def broker_cores(pid: int | None) -> frozenset[int] | None:
    """The CPUs the broker is pinned to, if they are not ours; None for all CPUs."""
    if pid is None or not hasattr(os, "sched_getaffinity"):
        return None
    try:
        cores = frozenset(os.sched_getaffinity(pid))
    except OSError:
        return None
    if cores & os.sched_getaffinity(0) or len(cores) == os.cpu_count():
        return None
    return cores


def proc_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in KiB; empty if unknown."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


# ----------------------------------------------------------------------
# Publishing


class Publisher:
    """Sends pre-encoded frames, keeping the in-flight window bounded."""

    def __init__(
        self,
        sock: socket.socket,
        counter: ReplyCounter,
        data: bytes,
        frame_len: int,
        window: int,
        acked: bool,
    ) -> None:
        self.sock = sock
        self.counter = counter
        self.view = memoryview(data)
        self.frame_len = frame_len
        self.limit = len(data) // frame_len
        self.window = window
        self.acked = acked
        self.sent_bytes = 0
        self.answered = 0
        self.closed = False
        self.want_write = False
        self.first_send: float | None = None

    @property
    def sent(self) -> int:
        """Frames completely sent."""
        return self.sent_bytes // self.frame_len

    @property
    def done(self) -> bool:
        all_sent = self.sent_bytes >= self.limit * self.frame_len
        return all_sent and (not self.acked or self.answered >= self.limit)

    def stop(self) -> None:
        """Publish no new frame (finish the one being sent)."""
        self.limit = -(-self.sent_bytes // self.frame_len)

    def pump(self, base: int) -> None:
        """Send as much as the window allows past ``base`` settled messages."""
        limit = min(self.limit, base + self.window) * self.frame_len
        sent = self.sent_bytes
        if sent < limit and self.first_send is None:
            self.first_send = time.monotonic()
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
        self._flush_control()

    def _flush_control(self) -> None:
        # Keep-alive answers (PONG) are tiny; send them whole, between frames only.
        if self.counter.out and self.sent_bytes % self.frame_len == 0:
            out, self.counter.out = self.counter.out, b""
            try:
                self.sock.sendall(out)
            except OSError:
                self.closed = True

    def readable(self) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        self.answered += self.counter.feed(data)


def encode_all(
    driver: Driver, topics: list[str], count: int, size: int, queue: bool
) -> tuple[bytes, int]:
    """``count`` publish frames (fewer if they would pass MAX_ENCODED_BYTES)."""
    first = driver.encode_publish(topics[0], payload(0, size), 0, queue)
    count = max(1, min(count, MAX_ENCODED_BYTES // len(first)))
    encode = driver.encode_publish
    many = len(topics)
    frames = [encode(topics[i % many], payload(i, size), i, queue) for i in range(count)]
    frame_len = len(first)
    if any(len(f) != frame_len for f in (frames[-1], frames[len(frames) // 2])):
        raise ValueError("publish frames differ in length")
    return b"".join(frames), frame_len


# ----------------------------------------------------------------------
# Results


def loss_and_duplicates(receivers: list[Receiver], total: int, shared: bool) -> dict[str, int]:
    """Lost and duplicated messages: per receiver (pub/sub) or across all (queue)."""
    lost = duplicated = unique_total = 0
    groups = [receivers] if shared else [[r] for r in receivers]
    for group in groups:
        seen = bytearray(total)
        unique = 0
        for receiver in group:
            for blob in receiver.seqs:
                for offset in range(0, len(blob), SEQ_DIGITS):
                    seq = int(blob[offset : offset + SEQ_DIGITS])
                    if seq >= total:
                        continue  # not published in this run's count: ignore
                    if seen[seq]:
                        duplicated += 1
                    else:
                        seen[seq] = 1
                        unique += 1
        lost += total - unique
        unique_total += unique
    return {"unique": unique_total, "lost": lost, "duplicated": duplicated}


def first_error(publisher: Publisher | None, receivers: list[Receiver]) -> str | None:
    raw = publisher.counter.first_error if publisher else None
    raw = raw or next((r.first_error for r in receivers if r.first_error), None)
    return raw.decode(errors="replace")[:300] if raw else None


class Clock:
    """Rate and CPU over the timed window, from samples taken during the run.

    A sample (time, own CPU, broker CPU, progress) is taken when publishing starts and
    every ``--sample`` seconds. The window starts at the first sample at least
    ``warmup`` seconds after publishing started, unless less than half of the progress
    came after it (a short run: then it starts with publishing), and ends at the last
    progress. Timing from the first publish, not the first delivery, keeps a broker
    that delivers in a few late bursts from looking fast. The broker's CPU is read
    once more right after the run and divided by the wall time up to that read.
    """

    def __init__(self, broker_pid: int | None, warmup: float) -> None:
        self.broker_pid = broker_pid
        self.warmup = warmup
        self.start = time.monotonic()
        self.cores = broker_cores(broker_pid)
        """Other load is measured on the broker's cores (the whole machine if unpinned)."""
        # Timed from the first publish, not the first delivery: a broker that delivers
        # in a few late bursts must not look fast because its bursts are dense.
        self.first = self.start
        self.samples = [(self.start, time.process_time(), self.broker_cpu(), 0)]
        self.system = [(self.start, system_busy_seconds(self.cores))]
        self.end = (self.start, time.process_time(), 0)

    def broker_cpu(self) -> float | None:
        return proc_cpu_seconds(self.broker_pid) if self.broker_pid else None

    def progressed(self, progress: int) -> None:
        self.end = (time.monotonic(), time.process_time(), progress)

    def sample(self) -> None:
        now = time.monotonic()
        self.system.append((now, system_busy_seconds(self.cores)))
        self.samples.append((now, time.process_time(), self.broker_cpu(), self.end[2]))

    def report(self) -> dict[str, Any]:
        read_at, end_broker = time.monotonic(), self.broker_cpu()
        system_end = system_busy_seconds(self.cores)
        out: dict[str, Any] = {}
        if self.end[2] == 0:
            return out
        t1, cpu1, progress1 = self.end
        chosen = self.samples[0]
        for candidate in self.samples:
            if candidate[0] - self.first >= self.warmup:
                if 2 * (progress1 - candidate[3]) >= progress1 - self.samples[0][3]:
                    chosen = candidate
                break
        t0, cpu0, broker0, progress0 = chosen
        seconds = t1 - t0
        out["window_seconds"] = round(seconds, 4)
        if seconds > 0 and progress1 > progress0:
            out["rate"] = round((progress1 - progress0) / seconds, 1)
            out["window_messages"] = progress1 - progress0
            out["generator_cpu_percent"] = round(100 * (cpu1 - cpu0) / seconds, 1)
            if broker0 is not None and end_broker is not None and read_at > t0:
                busy = 100 * (end_broker - broker0) / (read_at - t0)
                out["broker_cpu_percent"] = round(busy, 1)
                # What else ran on the broker's core meanwhile (other users of a shared
                # VM): that core's busy time minus the broker's (and ours, if shared).
                system0 = next((b for t, b in self.system if t >= t0), None)
                if system0 is not None and system_end is not None:
                    own = end_broker - broker0
                    if self.cores is None:
                        own += time.process_time() - cpu0
                    other = 100 * (system_end - system0 - own) / (read_at - t0)
                    out["other_cpu_percent"] = round(max(0.0, other), 1)
        return out


# ----------------------------------------------------------------------
# Workloads


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timespec(seconds: float) -> _Timespec:
    # Rounded up: a tick must never come before the send time it is for, or the sender
    # would find nothing due and wait for the next tick.
    nanoseconds = math.ceil(seconds * 1e9)
    return _Timespec(nanoseconds // 1_000_000_000, nanoseconds % 1_000_000_000)


class Ticker:
    """A periodic kernel timer (Linux ``timerfd``) that the selector waits on.

    It fires at ``start + k * interval`` on the monotonic clock (``time.monotonic``'s),
    with the kernel's nanosecond resolution, so a paced sender wakes on time instead of
    at the next whole millisecond of an epoll timeout.
    """

    _CLOCK_MONOTONIC = 1
    _TFD_TIMER_ABSTIME = 1

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def start(cls, start: float, interval: float) -> Ticker | None:
        """A ticker firing from ``start + interval`` on; None where there is no timerfd."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            create, settime = libc.timerfd_create, libc.timerfd_settime
        except (OSError, AttributeError):
            return None
        fd = create(cls._CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return None
        spec = _Itimerspec(_timespec(interval), _timespec(start + interval))
        if settime(fd, cls._TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            os.close(fd)
            return None
        return cls(fd)

    def fileno(self) -> int:
        return self.fd

    def fired(self) -> None:
        """Consume the expirations (the sender works out what is due from the clock)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)


class Loop:
    """The selector loop shared by the workloads."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.writing: dict[int, bool] = {}

    def add(self, sock: socket.socket, owner: Publisher | Receiver) -> None:
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, owner)

    def add_ticker(self, ticker: Ticker) -> None:
        self.selector.register(ticker, selectors.EVENT_READ, ticker)

    def want_write(self, owner: Publisher | Receiver) -> None:
        fd = owner.sock.fileno()
        if fd < 0:
            return
        wanted = owner.want_write
        if self.writing.get(fd, False) != wanted:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
            self.selector.modify(owner.sock, events, owner)
            self.writing[fd] = wanted

    def step(self, timeout: float) -> bool:
        """One select; True if any receiver read something."""
        received = False
        for key, mask in self.selector.select(timeout):
            owner: Publisher | Receiver | Ticker = key.data
            if isinstance(owner, Ticker):
                owner.fired()
                continue
            if mask & selectors.EVENT_READ:
                owner.readable()
                received = received or isinstance(owner, Receiver)
            if mask & selectors.EVENT_WRITE and isinstance(owner, Receiver):
                owner.flush()
            self.want_write(owner)
        return received

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            sock = key.fileobj
            if isinstance(sock, socket.socket | Ticker):
                sock.close()
        self.selector.close()


def run_flow(options: argparse.Namespace, driver: Driver) -> dict[str, Any]:
    """Workloads ``pubsub`` and ``queue``."""
    queue = options.workload == "queue"
    topics = [driver.topic(i) for i in range(options.topics)]
    data, frame_len = encode_all(driver, topics, options.messages, options.payload, queue)
    window = max(1, min(options.window, options.window_bytes // frame_len))
    deadline = time.monotonic() + options.timeout
    result: dict[str, Any] = {"frame_bytes": frame_len, "effective_window": window}
    if queue:
        driver.setup_queue(options.durable, options.consumers, options.prefetch)
    if not queue and options.topics > 1 and driver.pubsub_acks:
        result.update(touch_topics(driver, topics, options.payload, deadline))
    loop = Loop()
    try:
        if queue:
            receivers = [
                driver.open_consumer(i, options.prefetch, options.durable)
                for i in range(options.consumers)
            ]
        else:
            receivers = [
                driver.open_subscriber(topics, latency=False) for _ in range(options.subscribers)
            ]
        pub_sock, counter = driver.open_publisher(queue, options.durable)
        acked = driver.queue_acks if queue else driver.pubsub_acks
        publisher = Publisher(pub_sock, counter, data, frame_len, window, acked)
        for receiver in receivers:
            loop.add(receiver.sock, receiver)
        loop.add(pub_sock, publisher)
        result.update(drive(options, publisher, receivers, loop, queue, deadline))
    finally:
        loop.close()
        if queue:
            driver.teardown_queue()
    return result


def touch_topics(driver: Driver, topics: list[str], size: int, deadline: float) -> dict[str, Any]:
    """Publish once to every topic before anyone subscribes, so the timed run measures
    steady state, not the first use of each topic (reported as ``first_touch_rate``).
    These messages carry sequence numbers past the run's, and nobody receives them."""
    base = 9_000_000_000
    frames = [
        driver.encode_publish(t, payload(base + i, size), base + i, False)
        for i, t in enumerate(topics)
    ]
    sock, counter = driver.open_publisher(False, False)
    started = time.monotonic()
    answered = sent = 0
    step = 2_000  # send a slice, then read its answers: never both sides blocked
    try:
        sock.settimeout(max(1.0, deadline - started))
        while answered < len(frames) and time.monotonic() < deadline:
            if sent < len(frames) and sent - answered < step:
                sock.sendall(b"".join(frames[sent : sent + step]))
                sent = min(len(frames), sent + step)
                continue
            chunk = sock.recv(1 << 18)
            if not chunk:
                break
            answered += counter.feed(chunk)
    finally:
        sock.close()
    seconds = time.monotonic() - started
    return {
        "first_touch_rate": round(answered / seconds, 1) if seconds > 0 else None,
        "first_touch_errors": counter.errors,
    }


def drive(
    options: argparse.Namespace,
    publisher: Publisher,
    receivers: list[Receiver],
    loop: Loop,
    queue: bool,
    deadline: float,
) -> dict[str, Any]:
    fan = 1 if queue else len(receivers)
    clock = Clock(options.broker_pid, options.warmup)
    progress_seen = False
    publish_until = time.monotonic() + options.duration
    polling = any(type(r).poll is not Receiver.poll for r in receivers)
    status = "ok"
    progress = 0
    last_change = time.monotonic()
    published_at: float | None = None
    max_stall = 0.0
    timeline: list[tuple[float, int, int]] = []
    next_sample = clock.start
    stopped = False
    for receiver in receivers:
        receiver.flush()  # set-up requests (reads, pulls) queued by the driver
        loop.want_write(receiver)
    publisher.pump(0)
    loop.want_write(publisher)
    while True:
        now = time.monotonic()
        if not stopped and now >= publish_until:
            publisher.stop()
            stopped = True
        if publisher.done and progress >= publisher.limit * fan:
            break
        if now >= deadline:
            status = "timeout"
            break
        if publisher.done and now - last_change >= options.idle:
            status = "incomplete"
            break
        if publisher.closed or any(r.closed for r in receivers):
            status = "disconnected"
            break
        if loop.step(0.05):
            new = sum(r.progress for r in receivers)
            if new != progress:
                progress = new
                now = time.monotonic()
                if progress_seen:
                    max_stall = max(max_stall, now - last_change)
                progress_seen = True
                last_change = now
                clock.progressed(progress)
        if polling:
            for receiver in receivers:
                receiver.poll()
                if receiver.out:
                    receiver.flush()
                loop.want_write(receiver)
        base = progress if queue else min(r.progress for r in receivers)
        if publisher.acked:
            base = min(base, publisher.answered)
        publisher.pump(base)
        loop.want_write(publisher)
        if published_at is None and publisher.done:
            published_at = time.monotonic()
        if now >= next_sample:
            timeline.append((round(now - clock.start, 3), publisher.answered, progress))
            clock.sample()
            next_sample = now + options.sample
    out = clock.report()
    total = publisher.limit
    out.update(loss_and_duplicates(receivers, total, shared=queue))
    out.update(
        status=status,
        published=total,
        published_acked=publisher.answered if publisher.acked else None,
        publish_errors=publisher.counter.errors,
        deliveries=sum(r.deliveries for r in receivers),
        progress=progress,
        redelivered=sum(r.redelivered for r in receivers),
        receive_errors=sum(r.errors for r in receivers),
        first_error=first_error(publisher, receivers),
        consumer_share=[r.deliveries for r in receivers] if queue else None,
        total_seconds=round(time.monotonic() - clock.start, 3),
        publish_seconds=round(published_at - clock.start, 3) if published_at else None,
        max_stall_seconds=round(max_stall, 3),
        timeline=timeline,
        connections_closed=sum(r.closed for r in receivers) + int(publisher.closed),
    )
    return out


def percentiles(values: list[int]) -> dict[str, Any]:
    """p50/p90/p99/p99.9/max in microseconds, and a downsampled CDF for the chart."""
    if not values:
        return {}
    ordered = sorted(values)
    count = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(count - 1, int(q * count))] / 1000, 1)

    cdf_points = 200
    cdf = [
        (round(ordered[min(count - 1, int(i * count / cdf_points))] / 1000, 1), i / cdf_points)
        for i in range(cdf_points)
    ]
    cdf.append((round(ordered[-1] / 1000, 1), 1.0))
    return {
        "samples": count,
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": round(ordered[-1] / 1000, 1),
        "mean_us": round(sum(ordered) / count / 1000, 1),
        "cdf_us": cdf,
    }


def run_latency(options: argparse.Namespace, driver: Driver) -> dict[str, Any]:
    """Fixed-rate publishing with send times in the bodies; one-way latency."""
    topic = driver.topic(0)
    total = max(1, int(options.rate * options.duration))
    size = max(options.payload, MIN_STAMPED_PAYLOAD)
    deadline = time.monotonic() + options.duration + options.timeout
    loop = Loop()
    try:
        receivers = [
            driver.open_subscriber([topic], latency=True) for _ in range(options.subscribers)
        ]
        pub_sock, counter = driver.open_publisher(False, False)
        publisher = Publisher(pub_sock, counter, b"", 1, 1, False)
        for receiver in receivers:
            loop.add(receiver.sock, receiver)
        loop.add(pub_sock, publisher)
        pending = b""
        interval = 1.0 / options.rate
        cores = broker_cores(options.broker_pid)
        system0, cpu0 = system_busy_seconds(cores), time.process_time()
        broker0 = proc_cpu_seconds(options.broker_pid) if options.broker_pid else None
        start = time.monotonic()
        ticker = Ticker.start(start, interval) if options.pacing == "timer" else None
        if ticker is not None:
            loop.add_ticker(ticker)
        sent = 0
        status = "ok"
        last_change = start
        progress = 0
        encode = driver.encode_publish
        clock = time.monotonic_ns
        start_ns = int(start * 1e9)
        interval_ns = int(interval * 1e9)
        late_ns: list[int] = []
        while True:
            now = time.monotonic()
            while sent < total and now >= start + sent * interval:
                stamp = clock()
                late_ns.append(stamp - start_ns - sent * interval_ns)
                pending += encode(topic, stamped_payload(sent, stamp, size), sent, False)
                sent += 1
            if pending:
                try:
                    n = pub_sock.send(pending)
                    pending = pending[n:]
                except BlockingIOError:
                    pass
            if publisher.counter.out:
                pending += publisher.counter.out
                publisher.counter.out = b""
            if sent >= total and not pending and progress >= total * len(receivers):
                break
            if now >= deadline:
                status = "timeout"
                break
            if sent >= total and now - last_change >= options.idle:
                status = "incomplete"
                break
            if publisher.closed or any(r.closed for r in receivers):
                status = "disconnected"
                break
            if options.spin:
                wait = 0.0  # poll: no wake-up latency of our own in the figures
            elif ticker is not None:
                wait = 0.05  # the ticker wakes the loop at each send time
            else:
                wait = start + sent * interval - time.monotonic() if sent < total else 0.05
            if loop.step(max(0.0, min(wait, 0.05))):
                new = sum(r.progress for r in receivers)
                if new != progress:
                    progress, last_change = new, time.monotonic()
        elapsed = time.monotonic() - start
        system1, cpu1 = system_busy_seconds(cores), time.process_time()
        broker1 = proc_cpu_seconds(options.broker_pid) if options.broker_pid else None
        skip = int(options.rate * options.warmup)
        samples = [ns for r in receivers for ns in r.latencies_ns[skip:]]
        out: dict[str, Any] = {
            "status": status,
            "published": sent,
            "deliveries": progress,
            "rate_sent": round(sent / elapsed, 1) if elapsed > 0 else None,
            "warmup_skipped": skip,
            # Error frames, as in the other workloads: a publish that asks for no reply
            # (msg-noreply) is still answered when it fails.
            "publish_errors": publisher.counter.errors,
            "receive_errors": sum(r.errors for r in receivers),
            "first_error": first_error(publisher, receivers),
            "latency": percentiles(samples),
            "pacing": "timer" if ticker is not None else "selector",
            "send_late_us": {
                key: value for key, value in percentiles(late_ns[skip:]).items() if key != "cdf_us"
            },
        }
        out.update(loss_and_duplicates(receivers, sent, shared=False))
        if options.samples_out:
            # Every timed latency and send lateness, for a suite that merges several
            # short runs into one distribution (see benchmarks/suite.py, D slices).
            Path(options.samples_out).write_text(
                json.dumps({"latency_ns": samples, "send_late_ns": late_ns[skip:]})
            )
        if (
            system0 is not None
            and system1 is not None
            and broker0 is not None
            and broker1 is not None
            and elapsed > 0
        ):
            out["broker_cpu_percent"] = round(100 * (broker1 - broker0) / elapsed, 1)
            out["generator_cpu_percent"] = round(100 * (cpu1 - cpu0) / elapsed, 1)
            other = system1 - system0 - (broker1 - broker0)
            if cores is None:
                other -= cpu1 - cpu0
            out["other_cpu_percent"] = round(max(0.0, 100 * other / elapsed), 1)
        return out
    finally:
        loop.close()


def run_backlog(options: argparse.Namespace, driver: Driver) -> dict[str, Any]:
    """Fill a queue with no consumer, then drain it with the consumers."""
    topics = [driver.topic(0)]
    data, frame_len = encode_all(driver, topics, options.messages, options.payload, True)
    window = max(1, min(options.window, options.window_bytes // frame_len))
    deadline = time.monotonic() + options.timeout
    driver.setup_queue(options.durable, options.consumers, options.prefetch)
    loop = Loop()
    out: dict[str, Any] = {}
    try:
        pub_sock, counter = driver.open_publisher(True, options.durable)
        publisher = Publisher(pub_sock, counter, data, frame_len, window, driver.queue_acks)
        loop.add(pub_sock, publisher)
        start = time.monotonic()
        status = "ok"
        while not publisher.done:
            if time.monotonic() >= deadline or publisher.closed:
                status = "timeout" if not publisher.closed else "disconnected"
                break
            publisher.pump(publisher.answered if publisher.acked else publisher.sent)
            loop.want_write(publisher)
            loop.step(0.05)
        filled = time.monotonic()
        total = publisher.limit
        out["publish_rate"] = round(total / (filled - start), 1)
        out["depth"] = total
        receivers: list[Receiver] = []
        if status == "ok":
            receivers = [
                driver.open_consumer(i, options.prefetch, options.durable)
                for i in range(options.consumers)
            ]
            for receiver in receivers:
                loop.add(receiver.sock, receiver)
            drain_start = time.monotonic()
            progress = 0
            last_change = drain_start
            polling = any(type(r).poll is not Receiver.poll for r in receivers)
            for receiver in receivers:
                receiver.flush()
            while progress < total:
                now = time.monotonic()
                if now >= deadline:
                    status = "timeout"
                    break
                if now - last_change >= options.idle:
                    status = "incomplete"
                    break
                if any(r.closed for r in receivers):
                    status = "disconnected"
                    break
                if loop.step(0.05):
                    new = sum(r.progress for r in receivers)
                    if new != progress:
                        progress, last_change = new, time.monotonic()
                if polling:
                    for receiver in receivers:
                        receiver.poll()
                        if receiver.out:
                            receiver.flush()
                for receiver in receivers:
                    loop.want_write(receiver)
            drained = last_change - drain_start
            out["drain_rate"] = round(progress / drained, 1) if drained > 0 else None
            out["drained"] = progress
        out.update(loss_and_duplicates(receivers, total, shared=True))
        out["status"] = status
        out["first_error"] = first_error(publisher, receivers)
        return out
    finally:
        loop.close()
        driver.teardown_queue()


def run_idle(options: argparse.Namespace, driver: Driver) -> dict[str, Any]:
    """Idle connections vs the broker's RSS."""
    levels = sorted({int(x) for x in options.levels.split(",")} | {0})
    sockets: list[socket.socket] = []
    points: list[dict[str, Any]] = []
    deadline = time.monotonic() + options.timeout
    status = "ok"
    error = None
    try:
        for level in levels:
            began = time.monotonic()
            try:
                while len(sockets) < level:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"timeout after {len(sockets)} connections")
                    sockets.append(driver.open_idle())
            except (OSError, TimeoutError) as exc:
                status, error = "error", f"{type(exc).__name__}: {exc}"
            opened = time.monotonic() - began
            time.sleep(1.0)  # let the broker settle (allocations, GC)
            memory = proc_memory_kib(options.broker_pid) if options.broker_pid else {}
            points.append(
                {
                    "connections": len(sockets),
                    "rss_kib": memory.get("VmRSS"),
                    "open_seconds": round(opened, 3),
                }
            )
            if status != "ok":
                break
    finally:
        for sock in sockets:
            sock.close()
    return {"status": status, "error": error, "points": points}


# ----------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--driver", choices=sorted(DRIVERS), default="msg")
    parser.add_argument(
        "--workload", choices=["pubsub", "queue", "latency", "backlog", "idle"], required=True
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=200_000, help="most messages published")
    parser.add_argument("--duration", type=float, default=5.0, help="most seconds publishing")
    parser.add_argument("--payload", type=int, default=100, help="message body bytes")
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--topics", type=int, default=1)
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--durable", action="store_true", help="durable queue / confirms")
    parser.add_argument("--window", type=int, default=10_000, help="most messages in flight")
    parser.add_argument("--window-bytes", type=int, default=8 << 20, help="most bytes in flight")
    parser.add_argument("--rate", type=float, default=1000.0, help="latency: msgs/s")
    parser.add_argument(
        "--spin",
        action="store_true",
        help="latency: poll sockets without sleeping (removes our wake-up time, but on a "
        "shared machine pushes other processes onto the broker's core)",
    )
    parser.add_argument(
        "--pacing",
        choices=["timer", "selector"],
        default="timer",
        help="latency: wake for each send by a kernel timer (timerfd, where there is one) "
        "or by the selector's millisecond timeout",
    )
    parser.add_argument("--levels", default="1000,5000,10000", help="idle: connection counts")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds not timed")
    parser.add_argument("--timeout", type=float, default=60.0, help="wall-time bound, s")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds without progress")
    parser.add_argument("--sample", type=float, default=0.5, help="timeline interval, s")
    parser.add_argument("--broker-pid", type=int, help="sample this process's CPU and RSS")
    parser.add_argument("--run-id", default="", help="suffix for queue/stream names")
    parser.add_argument(
        "--samples-out", help="latency: also write every timed sample (ns, JSON) to this file"
    )
    options = parser.parse_args(argv)
    if options.messages < 1 or options.window < 1 or options.duration <= 0:
        parser.error("--messages, --window and --duration must be positive")
    if options.payload < MIN_PAYLOAD:
        parser.error(f"--payload must be at least {MIN_PAYLOAD}")
    return options


WORKLOADS = {
    "pubsub": run_flow,
    "queue": run_flow,
    "latency": run_latency,
    "backlog": run_backlog,
    "idle": run_idle,
}


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    # No collector pauses in the timed loop (latency!); the run's garbage is tiny.
    gc.collect()
    gc.freeze()
    gc.disable()
    run_id = options.run_id or secrets.token_hex(3)
    driver = get_driver(options.driver, options.host, options.port, run_id)
    driver.durable = options.durable
    base: dict[str, Any] = {"workload": options.workload, "driver": options.driver}
    try:
        result = WORKLOADS[options.workload](options, driver)
    except (OSError, ConnectionError, TimeoutError, ValueError, NotImplementedError) as exc:
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    if options.broker_pid:
        result["broker_memory_kib"] = proc_memory_kib(options.broker_pid)
    print(json.dumps(base | result))
    return 0 if result.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
