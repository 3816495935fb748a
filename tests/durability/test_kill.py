"""SIGKILL at a random moment during pipelined publishes; restart; drain; nothing lost.

Each fsync mode gets its own broker and data directory, and runs rounds back to back
on it (see :mod:`tests.durability.sigkill` for what a round does): three publishers
streaming to two queues and two topics, a live queue consumer and a live durable
subscriber acking most of what they get, a durable subscription created mid-stream,
two parked durable subscriptions, and a SIGKILL after a random delay or a random
number of acks. After each restart everything is drained and the round's history is
checked: no acked message lost, nothing unexpected, no payload or id changed, no
message returned after its ack was confirmed (queue or durable subscription), no
duplicates.

SIGKILL loses nothing acked in any fsync mode: every policy writes a record before it
acks it, and a killed process's writes are already in the page cache. (Power loss is
what tells the policies apart; see tests/durability for the storage half.)

The rounds are seeded: ``MSG_KILL_SEED=<n>`` replays a run's choices (kill moments,
payloads, which messages stay unacked); a failure names its seed and round (the
timing of the kill relative to the broker's work is not reproducible, only the
choices). ``--slow`` runs 500 rounds per mode instead of 20; ``MSG_KILL_ROUNDS=<n>``
sets any number. Each round's figures are logged at INFO
(``pytest -o log_cli=true --log-cli-level=INFO`` shows them).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import pytest

from msg.testing import BrokerProcess
from tests.durability.history import Report
from tests.durability.sigkill import FSYNC_MODES, Traffic, prepare, run_round

log = logging.getLogger(__name__)

CI_ROUNDS = 20
SLOW_ROUNDS = 500
# Small segments (the default is 16 MiB), so that every round rolls segments, and the
# broker's housekeeping deletes and compacts the ones the drains emptied: a kill can
# land in any of that too.
SEGMENT_BYTES = 64 * 1024


def base_seed() -> int:
    """The run's seed: ``MSG_KILL_SEED``, or a fresh one (printed with every result)."""
    return int(os.environ.get("MSG_KILL_SEED") or secrets.randbits(32))


@pytest.mark.slow_timeout(SLOW_ROUNDS * 10)
@pytest.mark.parametrize("fsync", FSYNC_MODES)
async def test_sigkill_during_pipelined_publishes_loses_nothing(
    tmp_path: Path, fsync: str, slow: bool
) -> None:
    rounds = int(os.environ.get("MSG_KILL_ROUNDS") or (SLOW_ROUNDS if slow else CI_ROUNDS))
    seed = base_seed()
    traffic = Traffic()
    log.info("MSG_KILL_SEED=%d fsync=%s rounds=%d", seed, fsync, rounds)
    broker = BrokerProcess(
        tmp_path / "data", args=["--fsync", fsync, "--segment-bytes", str(SEGMENT_BYTES)]
    )
    broker.start()
    total = Report()
    torn = 0
    try:
        await prepare(broker)
        for number in range(rounds):
            try:
                result = await run_round(broker, f"{seed}:{fsync}:{number}", traffic)
            except Exception as exc:
                log.exception("MSG_KILL_SEED=%d, round %d failed", seed, number)
                raise AssertionError(f"MSG_KILL_SEED={seed}, round {number}: {exc!r}") from exc
            log.info("%s", result.line())
            total += result.report
            torn += result.torn
            where = f"MSG_KILL_SEED={seed}, round {number}: {result.line()}"
            assert result.report.ok, f"{where}\n{result.report.describe()}"
            assert not result.log_problems, f"{where}\n" + "\n".join(result.log_problems)
            # No duplicates: every consumer acks manually, and neither a queue nor a
            # durable cursor (which keeps acks above its floor, not just the floor)
            # delivers a message again once its ack was confirmed. What does come back
            # is what was held, or acked without a reply (unknown outcome, not counted
            # as consumed).
            assert result.report.duplicated == 0, where
    finally:
        broker.kill()
    log.info(
        "fsync=%s rounds=%d seed=%d torn=%d totals: %s", fsync, rounds, seed, torn, total.summary()
    )


async def test_the_check_sees_the_loss_when_the_broker_keeps_nothing(tmp_path: Path) -> None:
    # The same round against a broker that stores nothing (memory storage): after the
    # kill every acked message is gone, and the history must say so.
    broker = BrokerProcess(tmp_path / "data", args=["--storage", "memory"])
    broker.start()
    try:
        await prepare(broker)
        result = await run_round(broker, "memory", Traffic(kill_after_acks=200))
    finally:
        broker.kill()
    report = result.report
    assert report.acked >= 200
    assert not report.ok
    # Every message acked and not consumed before the kill is lost, on every reader it
    # was owed to, so at least those to the queue without a live consumer.
    assert report.lost >= report.acked // 8, report.describe()
    assert report.unexpected == report.mismatched == report.returned_after_ack == 0
