"""Consumer acks survive a SIGKILL: an acked queue message never comes back, and every
message not acked does.

Each round publishes a batch to a queue (all acked, before anything else happens),
then two manual-ack consumers with random prefetches take messages, acking most
(without waiting for one ack before taking the next message) and holding a random
fifth unacked. SIGKILL comes after a random number of confirmed acks, or after a
random delay. After the restart the queue is drained and the history checked:

- no message whose ack was confirmed (its reply arrived) is delivered again
  (``returned_after_ack``), whatever the fsync mode: every mode writes the ack record
  before replying, and SIGKILL does not lose written data;
- every message not acked, or acked without a reply, is delivered again or (the
  latter) was consumed: ``lost`` is 0;
- no duplicates at all: in a queue, a second consumption is a returned ack.

That the reply is sent only after the ack record's fsync in ``always`` mode is
checked at the system-call level by ``test_ordering.py``.

Seeded like test_kill.py: ``MSG_KILL_SEED`` replays a run; ``--slow`` runs 200 rounds
per mode instead of 4.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
from pathlib import Path

import pytest

from msg.protocol.frames import Mode
from msg.testing import BrokerProcess
from tests.durability.history import History, Report
from tests.durability.sigkill import (
    FSYNC_MODES,
    PADS,
    Consumer,
    check_log,
    connect,
    drain,
    torn_records,
    within,
)

log = logging.getLogger(__name__)

CI_ROUNDS = 4
SLOW_ROUNDS = 200
MESSAGES = 300
CONSUMERS = 2
HOLD_RATIO = 0.2
MAX_KILL_DELAY = 0.2


async def consumer_round(broker: BrokerProcess, seed: str) -> tuple[Report, str]:
    """One round (see the module docstring): the report and a line describing it."""
    rng = random.Random(seed)
    history = History()
    jobs = history.queue("jobs")
    payloads = [{"k": f"{seed}/{n}", "n": n, "pad": rng.choice(PADS)} for n in range(MESSAGES)]
    async with await connect(broker) as publisher:
        keys = [history.invoke(Mode.QUEUE, "jobs", payload) for payload in payloads]
        ids = await publisher.publish_many("jobs", payloads, queue=True)
    for key, message_id in zip(keys, ids, strict=True):
        history.acked(key, message_id)

    kill = asyncio.Event()
    target = rng.randrange(int(MESSAGES * (1 - HOLD_RATIO)))
    consumers: list[Consumer] = []

    def consumed() -> None:
        if sum(c.consumed for c in consumers) >= target:
            kill.set()

    clients = [await connect(broker) for _ in range(CONSUMERS)]
    for client in clients:
        prefetch = rng.randint(1, 100)
        consumers.append(
            Consumer(
                client,
                history,
                jobs,
                rng.random,
                hold_ratio=HOLD_RATIO,
                prefetch=prefetch,
                on_consumed=consumed,
            )
        )
    delay = rng.uniform(0.0, MAX_KILL_DELAY)
    timer = asyncio.get_running_loop().call_later(delay, kill.set)
    tasks = [asyncio.create_task(c.run(queue=True)) for c in consumers]
    async with within("waiting for the moment to kill"):
        await kill.wait()
    broker.kill()
    timer.cancel()
    before = list(broker.log_lines)
    async with within("clients noticing the kill"):
        await asyncio.gather(*tasks)
        for client in clients:
            await client.close()
    at_kill = history.check()

    broker.start()
    async with within("the drain"):
        await drain(broker, history, jobs)
    report = history.check()
    problems = check_log(before) + check_log(broker.log_lines)
    line = (
        f"seed={seed} kill after {target} acks or {delay:.3f}s: "
        f"consumed before kill={at_kill.consumed} held or unconfirmed="
        f"{at_kill.delivered - at_kill.consumed} torn={torn_records(broker.log_lines)} "
        f"-> {report.summary()}"
    )
    assert not problems, f"{line}\n" + "\n".join(problems)
    return report, line


@pytest.mark.slow_timeout(SLOW_ROUNDS * 10)
@pytest.mark.parametrize("fsync", FSYNC_MODES)
async def test_acked_messages_stay_acked_and_unacked_ones_return_after_sigkill(
    tmp_path: Path, fsync: str, slow: bool
) -> None:
    rounds = int(os.environ.get("MSG_KILL_ROUNDS") or (SLOW_ROUNDS if slow else CI_ROUNDS))
    seed = int(os.environ.get("MSG_KILL_SEED") or secrets.randbits(32))
    log.info("MSG_KILL_SEED=%d fsync=%s rounds=%d", seed, fsync, rounds)
    broker = BrokerProcess(tmp_path / "data", args=["--fsync", fsync])
    broker.start()
    total = Report()
    try:
        for number in range(rounds):
            try:
                report, line = await consumer_round(broker, f"{seed}:{fsync}:acks:{number}")
            except Exception as exc:
                log.exception("MSG_KILL_SEED=%d, round %d failed", seed, number)
                raise AssertionError(f"MSG_KILL_SEED={seed}, round {number}: {exc!r}") from exc
            log.info("%s", line)
            total += report
            where = f"MSG_KILL_SEED={seed}, round {number}: {line}"
            assert report.ok, f"{where}\n{report.describe()}"
            assert report.duplicated == 0, where
    finally:
        broker.kill()
    log.info("fsync=%s rounds=%d seed=%d totals: %s", fsync, rounds, seed, total.summary())
