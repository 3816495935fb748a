"""Traffic for the SIGKILL tests: publishers, consumers, a kill at a random moment, a
drain, all recorded in a :class:`~tests.durability.history.History`.

Theory of operation
-------------------
A *round* runs against a broker child process (:class:`~msg.testing.BrokerProcess`)
that is already up:

1. **Traffic.** Several publisher clients, each with its own connection, publish
   pipelined streams (up to ``window`` publishes in flight each, through
   :meth:`msg.client.Client.publish`) to a mix of queues and topics, with payloads of
   assorted sizes and characters. Meanwhile live consumers take messages with
   manual acks (a queue consumer, a durable subscriber), leaving a random few unacked,
   and a new durable subscription is created mid-stream at a random moment. Every
   publish attempt, ack, delivery and consumer ack is recorded as it happens.
2. **Kill.** At a moment drawn from the round's seeded RNG, either after a random
   delay or once a random number of publishes has been acked, the broker gets
   SIGKILL. Publishes and acks in flight then fail with ``ConnectionClosedError``:
   their outcome is unknown, and they stay recorded as such.
3. **Restart and drain.** The broker restarts on the same data directory. Every
   queue and every durable subscription is drained with manual acks until the
   broker's status says nothing is left (no ready or unacked queue message; every
   durable cursor at the end of its topic). The mid-stream durable subscription is
   then deleted, so rounds do not pile up cursors.
4. **Check.** The history is classified (:meth:`History.check`); the round's
   :class:`RoundResult` carries the report, the seed and what the kill hit.

The broker is left running for the next round, so a round costs one start-up. The
durable subscriptions ``live`` and ``parked`` are created once, before the first
round (:func:`prepare`), and every round owes them all of its acked messages.

Nothing waits on a sleep: the kill is the one timed event (the experiment), and every
other wait is on a reply, a delivery or a status, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from msg.client import Client, ConnectionClosedError, RemoteError, RequestTimeoutError
from msg.client.errors import StaleMessageError
from msg.client.subscription import Message, Subscription
from msg.protocol.frames import Mode
from msg.testing import BrokerProcess
from tests.durability.history import History, Reader, Report

__all__ = [
    "FSYNC_MODES",
    "PADS",
    "QUEUES",
    "TOPICS",
    "WAIT",
    "Consumer",
    "HungError",
    "RoundResult",
    "Traffic",
    "ack",
    "check_log",
    "connect",
    "drain",
    "prepare",
    "run_round",
    "torn_records",
    "within",
]

FSYNC_MODES: Final = ("always", "everysec", "never")
QUEUES: Final = ("q0", "q1")
"""QUEUES[0] has a live consumer during the traffic; QUEUES[1] only fills up."""
TOPICS: Final = ("t0", "t1")
LIVE: Final = ("t0", "live")
"""A durable subscription (topic, name) consumed during the traffic."""
PARKED: Final = (("t0", "parked"), ("t1", "parked"))
"""Durable subscriptions never attached during the traffic: they accumulate, and catch
up after the restart."""

# A bound, not an expectation: each phase normally takes well under a second; this only
# turns a hang (a bug) into a failure that names the phase. Generous, so that a loaded
# machine does not pass for a hung broker.
WAIT: Final = 30.0
# Large enough that a drain takes a whole round's backlog in a few reads.
DRAIN_PREFETCH: Final = 1000

PADS: Final = (
    "",
    "x",
    'quote " backslash \\ newline \n tab \t',
    "é☃€𝄞 ünïcödé",
    string.printable * 3,
    "a" * 1000,
    "🙂" * 700,
    "z" * 4000,
)
"""Payload padding: empty to a few KiB, with what JSON must escape and non-ASCII text."""

_TORN: Final = re.compile(r"(\d+) torn records dropped")
_CORRUPT: Final = re.compile(r"(\d+) corrupt records skipped")


@dataclass(frozen=True, slots=True)
class Traffic:
    """The shape of one round's traffic."""

    publishers: int = 3
    per_publisher: int = 1000
    """Publishes each publisher attempts at most: more than fit before the kill."""
    window: int = 64
    """Publishes each publisher keeps in flight."""
    max_kill_delay: float = 0.2
    """The kill comes at most this long after the traffic starts..."""
    long_kill_ratio: float = 0.1
    long_kill_delay: float = 1.2
    """...but in ``long_kill_ratio`` of the rounds, at a moment up to this long after
    it, when the broker's once-a-second housekeeping (segment deletion, compaction,
    retention) may be running too."""
    max_kill_acks: int = 1200
    """An ack-count trigger is drawn below this (about what the slowest fsync mode
    acks in ``max_kill_delay`` on a small machine)."""
    kill_after_acks: int | None = None
    """If set, the kill comes once this many publishes are acked (no random moment)."""
    hold_ratio: float = 0.1
    """Share of deliveries the live consumers never ack (they must come back)."""
    prefetch: int = 64


@dataclass(frozen=True, slots=True)
class RoundResult:
    seed: str
    trigger: str
    """What set off the kill: a delay or an ack count."""
    acked_at_kill: int
    report: Report
    torn: int
    """Torn records the restarted broker dropped (a write cut short by the kill)."""
    seconds: float
    log_problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"seed={self.seed} kill={self.trigger} acked_at_kill={self.acked_at_kill} "
            f"torn={self.torn} {self.report.summary()} ({self.seconds:.2f} s)"
        )


class HungError(AssertionError):
    """A phase of a round did not finish within :data:`WAIT`."""


@contextlib.asynccontextmanager
async def within(phase: str) -> AsyncIterator[None]:
    """Bound ``phase`` by :data:`WAIT`; if it runs out, say which phase hung."""
    try:
        async with asyncio.timeout(WAIT):
            yield
    except TimeoutError as exc:
        raise HungError(f"{phase} did not finish within {WAIT} s") from exc


def connect(broker: BrokerProcess) -> Awaitable[Client]:
    """A client of ``broker`` that does not reconnect: a lost connection ends it."""
    return Client.connect(broker.host, broker.port, reconnect=False, request_timeout=WAIT)


async def prepare(broker: BrokerProcess) -> None:
    """Create the durable subscriptions every round owes its messages to."""
    for topic, name in (LIVE, *PARKED):
        async with await connect(broker) as client:
            sub = await client.subscribe(topic, durable=name, ack="manual")
            await client.unsubscribe(sub)


def check_log(lines: list[str]) -> list[str]:
    """Log lines that say the broker hit a bug or a storage fault, or found a corrupt
    record (SIGKILL can cut a write short, leaving a torn tail, but never corrupt one)."""
    return [
        line for line in lines if "Traceback" in line or " ERROR " in line or _CORRUPT.search(line)
    ]


def torn_records(lines: list[str]) -> int:
    """Torn records the broker's start-up log says it dropped."""
    return sum(int(m.group(1)) for line in lines if (m := _TORN.search(line)))


# -- one round ---------------------------------------------------------------------------


async def run_round(broker: BrokerProcess, seed: str, traffic: Traffic) -> RoundResult:
    """Traffic, SIGKILL, restart, drain, check: see the module docstring."""
    started = time.monotonic()
    rng = random.Random(seed)
    history = History()
    readers = [history.queue(name) for name in QUEUES]
    readers += [history.durable(topic, name, existing=True) for topic, name in (LIVE, *PARKED)]
    mid = (TOPICS[1], "mid-" + seed.replace(":", "-"))

    kill = asyncio.Event()
    trigger = _Trigger(rng, traffic, history, kill)
    clients = [await connect(broker) for _ in range(traffic.publishers + 3)]
    publishers, consumers = clients[: traffic.publishers], clients[traffic.publishers :]
    tasks: list[asyncio.Task[Any]] = []
    for number, client in enumerate(publishers):
        stream = _Publisher(
            client, history, random.Random(f"{seed}/p{number}"), traffic, trigger.acked
        )
        tasks.append(asyncio.create_task(stream.run(f"{seed}/p{number}")))
    # If every publish is answered before the moment drawn, the kill comes then.
    publishing = asyncio.gather(*tasks, return_exceptions=True)
    publishing.add_done_callback(lambda _: kill.set())
    queue_consumer = _live_consumer(consumers[0], history, readers[0], rng, traffic)
    tasks.append(asyncio.create_task(queue_consumer.run(queue=True)))
    durable_consumer = _live_consumer(consumers[1], history, readers[2], rng, traffic)
    tasks.append(asyncio.create_task(durable_consumer.run(durable=LIVE[1])))
    tasks.append(
        asyncio.create_task(_subscribe_later(consumers[2], history, mid, rng, traffic, kill))
    )
    async with within("waiting for the moment to kill"):
        await kill.wait()
    broker.kill()
    trigger.cancel()
    acked_at_kill = history.acked_count
    before = list(broker.log_lines)
    async with within("clients noticing the kill"):
        await asyncio.gather(*tasks)
        for client in clients:
            await client.close()

    broker.start()
    torn = torn_records(broker.log_lines)
    # The mid-stream subscription, if its subscribe was never acked, may or may not
    # exist: registered now, it is owed nothing, and deleted after the drain either way.
    late = history.durable(*mid)
    async with within("the drain"), asyncio.TaskGroup() as group:
        for reader in readers:
            group.create_task(drain(broker, history, reader))
        group.create_task(drain(broker, history, late, delete=True))
    return RoundResult(
        seed,
        trigger.description,
        acked_at_kill,
        history.check(),
        torn,
        time.monotonic() - started,
        check_log(before) + check_log(broker.log_lines),
    )


class _Trigger:
    """Sets ``kill`` at a random moment: after a random delay (short, or now and then
    long), or once a random number of publishes is acked (and after ``max_kill_delay``
    at the latest), or once ``traffic.kill_after_acks`` are."""

    def __init__(
        self, rng: random.Random, traffic: Traffic, history: History, kill: asyncio.Event
    ) -> None:
        self.history = history
        self.kill = kill
        self.target: int | None = traffic.kill_after_acks
        self.timer: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        draw = rng.random()
        if self.target is not None:
            self.description = f"acks={self.target}"
        elif draw < 0.5:
            if draw < traffic.long_kill_ratio:
                delay = rng.uniform(traffic.max_kill_delay, traffic.long_kill_delay)
            else:
                delay = rng.uniform(0.0, traffic.max_kill_delay)
            self.timer = loop.call_later(delay, kill.set)
            self.description = f"delay={delay:.3f}s"
        else:
            self.target = rng.randrange(traffic.max_kill_acks)
            self.timer = loop.call_later(traffic.max_kill_delay, kill.set)
            self.description = f"acks={self.target} (or {traffic.max_kill_delay}s)"

    def acked(self) -> None:
        """Called after each publish ack."""
        if self.target is not None and self.history.acked_count >= self.target:
            self.kill.set()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


class _Publisher:
    """One client's pipelined stream of publishes, each recorded."""

    def __init__(
        self,
        client: Client,
        history: History,
        rng: random.Random,
        traffic: Traffic,
        on_ack: Callable[[], None],
    ) -> None:
        self.client = client
        self.history = history
        self.rng = rng
        self.traffic = traffic
        self.on_ack = on_ack
        self.window = asyncio.Semaphore(traffic.window)

    async def run(self, prefix: str) -> None:
        rng = self.rng
        destinations = [(Mode.QUEUE, q) for q in QUEUES] + [(Mode.PUBSUB, t) for t in TOPICS]
        in_flight: set[asyncio.Task[None]] = set()
        for number in range(self.traffic.per_publisher):
            await self.window.acquire()
            if self.client.closed:
                self.window.release()
                break
            mode, topic = rng.choice(destinations)
            payload = {"k": f"{prefix}/{number}", "n": number, "pad": rng.choice(PADS)}
            key = self.history.invoke(mode, topic, payload)
            task = asyncio.create_task(self._one(mode, topic, payload, key))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)

    async def _one(self, mode: Mode, topic: str, payload: Any, key: str) -> None:
        try:
            message_id = await self.client.publish(topic, payload, queue=mode is Mode.QUEUE)
        except RemoteError as exc:
            self.history.refused(key, exc.code)
        except (ConnectionClosedError, RequestTimeoutError):
            pass  # unknown outcome: stays so in the history
        else:
            self.history.acked(key, message_id)
            self.on_ack()
        finally:
            self.window.release()


class Consumer:
    """A live manual-ack consumer: records every delivery, acks most of them (never
    waiting for one ack before taking the next message), holds the rest unacked."""

    def __init__(
        self,
        client: Client,
        history: History,
        reader: Reader,
        draw: Callable[[], float],
        *,
        hold_ratio: float,
        prefetch: int,
        on_consumed: Callable[[], None] = lambda: None,
    ) -> None:
        """``draw`` returns a number in [0, 1) per delivery; below ``hold_ratio``, the
        message is held. ``on_consumed`` runs after each confirmed ack."""
        self.client = client
        self.history = history
        self.reader = reader
        self.draw = draw
        self.hold_ratio = hold_ratio
        self.prefetch = prefetch
        self.on_consumed = on_consumed
        self.consumed = 0
        """Acks confirmed by the broker."""

    async def run(self, *, queue: bool = False, durable: str | None = None) -> None:
        """Subscribe, then consume until the connection is lost."""
        try:
            sub = await self.client.subscribe(
                self.reader.topic,
                queue=queue,
                durable=durable,
                ack="manual",
                prefetch=self.prefetch,
            )
        except ConnectionClosedError:
            return
        await self.consume(sub)

    async def consume(self, sub: Subscription) -> None:
        """Consume ``sub`` until the connection is lost."""
        acks: set[asyncio.Task[None]] = set()
        try:
            while True:
                message = await sub.next()
                key = self.history.delivered(self.reader, message.data, message.message_id)
                if key is not None and self.draw() >= self.hold_ratio:
                    task = asyncio.create_task(self._ack(key, message))
                    acks.add(task)
                    task.add_done_callback(acks.discard)
        except ConnectionClosedError:
            pass  # the kill
        finally:
            await asyncio.gather(*acks)

    async def _ack(self, key: str, message: Message) -> None:
        if await ack(self.history, self.reader, key, message):
            self.consumed += 1
            self.on_consumed()


def _live_consumer(
    client: Client, history: History, reader: Reader, rng: random.Random, traffic: Traffic
) -> Consumer:
    return Consumer(
        client,
        history,
        reader,
        rng.random,
        hold_ratio=traffic.hold_ratio,
        prefetch=traffic.prefetch,
    )


async def ack(history: History, reader: Reader, key: str, message: Message) -> bool:
    """Ack ``message``, recording the attempt and, if its reply comes, the consumption.
    Returns whether the broker confirmed it; an error reply is raised."""
    history.ack_sent(reader, key)
    try:
        await message.ack()
    except (ConnectionClosedError, StaleMessageError):
        return False  # no reply: unknown outcome
    except RemoteError:
        history.ack_refused(reader, key)
        raise
    history.consumed(reader, key)
    return True


async def _subscribe_later(
    client: Client,
    history: History,
    durable: tuple[str, str],
    rng: random.Random,
    traffic: Traffic,
    kill: asyncio.Event,
) -> None:
    """Create durable subscription ``durable`` at a random moment during the traffic
    (unless the kill comes first) and consume it; from its ack on, it is owed every
    acked publish to its topic."""
    topic, name = durable
    try:
        async with asyncio.timeout(rng.uniform(0.0, traffic.max_kill_delay)):
            await kill.wait()
            return
    except TimeoutError:
        pass
    try:
        sub = await client.subscribe(topic, durable=name, ack="manual", prefetch=traffic.prefetch)
    except ConnectionClosedError:
        return
    reader = history.durable(topic, name)
    await _live_consumer(client, history, reader, rng, traffic).consume(sub)


# -- the drain -----------------------------------------------------------------------------


async def drain(
    broker: BrokerProcess, history: History, reader: Reader, *, delete: bool = False
) -> None:
    """Consume and ack everything ``reader`` has until the broker's status says nothing
    is left; then, if ``delete``, delete the durable subscription."""
    async with await connect(broker) as client:
        sub = await client.subscribe(
            reader.topic,
            queue=reader.mode is Mode.QUEUE,
            durable=reader.durable,
            ack="manual",
            prefetch=DRAIN_PREFETCH,
        )
        await _drain(client, sub, history, reader)
        if delete and reader.durable is not None:
            await client.delete_durable(reader.topic, reader.durable)


async def _drain(client: Client, sub: Subscription, history: History, reader: Reader) -> None:
    """Take what has arrived, ack it all and wait for the replies, then ask the broker
    whether anything is left; if so, wait for the next delivery and go round again."""
    while True:
        acks: list[Awaitable[Any]] = []
        while sub.pending:
            acks.append(_settle(history, reader, await sub.next()))
        await asyncio.gather(*acks)
        if _empty(await client.status(), reader):
            return
        await _settle(history, reader, await sub.next(timeout=WAIT))


async def _settle(history: History, reader: Reader, message: Message) -> None:
    key = history.delivered(reader, message.data, message.message_id)
    if key is None:
        await message.ack()  # not this history's: counted as unexpected, and cleared away
    else:
        await ack(history, reader, key, message)


def _empty(status: dict[str, Any], reader: Reader) -> bool:
    """Whether ``reader``'s queue or durable subscription has nothing left to deliver
    and nothing awaiting an ack."""
    if reader.durable is None:
        queue = status["queues"].get(reader.topic)
        return queue is None or (queue["depth"] == 0 and queue["unacked"] == 0)
    topic = status["topics"].get(reader.topic, {})
    cursor = topic.get("durable", {}).get(reader.durable)
    return cursor is None or cursor["pending"] == 0
