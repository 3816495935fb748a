"""Simulated power loss at random write and sync points: what each fsync policy keeps.

Each round runs the random workload of :mod:`tests.durability.powerloss` against a
FileStore on a :class:`~tests.durability.crashfs.CrashFS`, pulls the plug at a random
file-system operation (a write, truncate, fsync, create, rename or delete: counted
from just after the store opened), restarts on what a reboot would find, and checks
every promise the store made. Rounds cycle through the ways unsynced data can be lost
(dropped, torn, zeros, garbage, independent pages) and, every other round, keep a
random prefix of the unsynced metadata journal. Segments are 2 KiB, so rounds roll,
delete and compact segments, and the crash lands in those too.

Figures (logged at INFO; ``pytest -o log_cli=true --log-cli-level=INFO`` shows them):

- ``always``: 0 acked operations lost (200 crashes; ``--slow``: 5,000).
- ``everysec``: only operations acked in the last 2 s before the crash are lost; the
  test logs the histogram of their ages.
- ``never``: measured, with the kernel's flusher simulated as a writeback every 30 s
  (Linux's dirty_expire_centisecs): losses stay within that interval.
- A process crash (the page cache survives) loses nothing acked in any policy.

``MSG_CRASH_SEED=<n>`` replays a run's random choices; failures name seed and round.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from msg.persistence import Cursor, Delivery, FsyncPolicy
from msg.storage.filestore import FileStore
from msg.storage.index import DEAD_LETTER_PREFIX
from tests.durability.crashfs import POWER_LOSSES, CrashFS, Loss
from tests.durability.powerloss import (
    QUEUES,
    Clock,
    Ledger,
    Observed,
    Verdict,
    Workload,
    observe,
    run_workload,
    verify,
)

log = logging.getLogger(__name__)

ROOT = "/data"
SEGMENT_BYTES = 2048
EVERYSEC_WINDOW = 2.0
"""The promise checked for everysec: only the last 2 s of acks may be lost."""
WRITEBACK = 30.0
"""Linux's dirty_expire_centisecs default: dirty pages older than 30 s are written back."""

_ops_per_run: dict[tuple[FsyncPolicy, Workload], int] = {}


def base_seed() -> int:
    return int(os.environ.get("MSG_CRASH_SEED") or secrets.randbits(32))


@dataclass
class Round:
    verdict: Verdict
    ledger: Ledger
    crash_op: int
    """How many operations after the open the crash came (0: after the workload)."""


async def crash_round(
    seed: str,
    policy: FsyncPolicy,
    loss: Loss,
    *,
    keep_metadata: bool,
    shape: Workload,
    window: float | None,
    crash: bool = True,
    keep_image: Callable[[CrashFS, Ledger], None] | None = None,
) -> Round:
    """One round: open, run, crash at a random operation, reboot, check.

    ``keep_image`` gets a copy of what the reboot found, before the store repaired it.
    """
    rng = random.Random(seed)
    fs = CrashFS()
    clock = Clock()
    ledger = Ledger()
    store = FileStore(ROOT, fsync=policy, segment_bytes=SEGMENT_BYTES, fs=fs)
    await store.open()
    opened = fs.ops
    if crash:
        # A little past the usual end, so some rounds crash once everything is done.
        fs.crash_at = opened + rng.randint(1, int(await ops_per_run(policy, shape) * 1.1))

    def crashed() -> None:
        ledger.crash_time = clock.now

    fs.on_crash = crashed
    try:
        await run_workload(
            store,
            rng,
            clock,
            ledger,
            shape=shape,
            dead=lambda: fs.crashed,
            writeback=fs.writeback,
        )
    finally:
        crash_op = fs.ops - opened if fs.crashed else 0
        fs.crash()
        await store.close()
    image = fs.reboot(loss, rng, keep_metadata=keep_metadata)
    if keep_image is not None:
        keep_image(image.clone(), ledger)
    again = FileStore(ROOT, fsync=policy, segment_bytes=SEGMENT_BYTES, fs=image)
    await again.open()
    try:
        seen = await observe(again)
    finally:
        await again.close()
    return Round(verify(ledger, seen, window=window), ledger, crash_op)


async def ops_per_run(policy: FsyncPolicy, shape: Workload) -> int:
    """File-system operations of a run that does not crash (measured once)."""
    key = (policy, shape)
    if key not in _ops_per_run:
        fs = CrashFS()
        store = FileStore(ROOT, fsync=policy, segment_bytes=SEGMENT_BYTES, fs=fs)
        await store.open()
        opened = fs.ops
        try:
            await run_workload(
                store, random.Random(0), Clock(), Ledger(), shape=shape, dead=lambda: False
            )
        finally:
            await store.close()
        _ops_per_run[key] = fs.ops - opened
    return _ops_per_run[key]


def histogram(ages: list[float], width: float) -> str:
    """``[0, 0.25) s: 12, [0.25, 0.5) s: 7, ...`` -- every bucket from 0 to the largest."""
    if not ages:
        return "none"
    counts = Counter(int(age // width) for age in ages)
    return ", ".join(
        f"[{k * width:g}, {(k + 1) * width:g}) s: {counts.get(k, 0)}"
        for k in range(max(counts) + 1)
    )


async def run_rounds(
    policy: FsyncPolicy,
    rounds: int,
    *,
    shape: Workload,
    window: float | None,
    losses: tuple[Loss, ...] = POWER_LOSSES,
) -> tuple[list[float], int, Counter[Loss]]:
    """Run ``rounds`` crash rounds; fail on the first broken promise.

    Returns the ages of the promises broken within the window, how many promises
    were checked, and how many rounds each kind of loss got.
    """
    seed = base_seed()
    log.info("MSG_CRASH_SEED=%d fsync=%s rounds=%d", seed, policy.value, rounds)
    ages: list[float] = []
    promises = 0
    kinds: Counter[Loss] = Counter()
    for number in range(rounds):
        loss = losses[number % len(losses)]
        keep_metadata = (number // len(losses)) % 2 == 1
        kinds[loss] += 1
        result = await crash_round(
            f"{seed}:{policy}:{number}",
            policy,
            loss,
            keep_metadata=keep_metadata,
            shape=shape,
            window=window,
        )
        where = (
            f"MSG_CRASH_SEED={seed}, round {number} ({loss}, keep_metadata={keep_metadata}, "
            f"crash at op {result.crash_op})"
        )
        assert not result.verdict.errors, where + ":\n" + "\n".join(result.verdict.errors[:20])
        ages += result.verdict.lost_ages
        promises += result.verdict.promises
    return ages, promises, kinds


@pytest.mark.slow_timeout(1800)
async def test_always_loses_nothing_acked(slow: bool) -> None:
    rounds = 5000 if slow else 200
    ages, promises, kinds = await run_rounds(FsyncPolicy.ALWAYS, rounds, shape=Workload(), window=0)
    log.info(
        "always: %d crashes (%s), %d promises checked, %d broken",
        rounds,
        ", ".join(f"{k}: {v}" for k, v in kinds.items()),
        promises,
        len(ages),
    )
    assert ages == []
    assert promises > rounds * 10  # the rounds did real work before their crashes


@pytest.mark.slow_timeout(1800)
async def test_everysec_loses_only_the_last_two_seconds(slow: bool) -> None:
    rounds = 2000 if slow else 100
    ages, promises, _ = await run_rounds(
        FsyncPolicy.EVERYSEC, rounds, shape=Workload(), window=EVERYSEC_WINDOW
    )
    log.info(
        "everysec: %d crashes, %d of %d promises broken, the oldest %.3f s before the crash; "
        "ages: %s",
        rounds,
        len(ages),
        promises,
        max(ages, default=0.0),
        histogram(ages, 0.25),
    )
    # The window held (run_rounds checked each promise); and the test has teeth: the
    # crashes did take acked writes that were not yet synced.
    assert ages
    assert max(ages) <= EVERYSEC_WINDOW


@pytest.mark.slow_timeout(1800)
async def test_never_loses_what_the_kernel_had_not_written_back(slow: bool) -> None:
    rounds = 1000 if slow else 40
    # Half a second a step: runs span about two minutes, several writebacks.
    shape = Workload(mean_step=0.5, writeback=WRITEBACK)
    ages, promises, _ = await run_rounds(FsyncPolicy.NEVER, rounds, shape=shape, window=None)
    log.info(
        "never (writeback every %g s): %d crashes, %d of %d promises broken (%.1f%%), the "
        "oldest %.1f s before the crash; ages: %s",
        WRITEBACK,
        rounds,
        len(ages),
        promises,
        100 * len(ages) / max(promises, 1),
        max(ages, default=0.0),
        histogram(ages, 5.0),
    )
    assert ages
    # Nothing older than the last writeback (plus the step that crossed it) is lost:
    # maintenance syncs its copies before deleting originals under every policy.
    assert max(ages) <= WRITEBACK + 5 * shape.mean_step


@pytest.mark.parametrize("policy", list(FsyncPolicy))
async def test_process_crash_loses_nothing_in_any_policy(policy: FsyncPolicy, slow: bool) -> None:
    # kill -9: the kernel keeps the page cache, so every write the store made survives.
    ages, promises, _ = await run_rounds(
        policy, 500 if slow else 30, shape=Workload(), window=0, losses=(Loss.KEEP,)
    )
    assert ages == []
    assert promises > 0


def test_the_check_holds_the_cursor_to_every_position_a_commit_declared_done() -> None:
    # The cursor check on hand-made states: a restarted store that kept the floor but
    # forgot the ranges acked above it breaks a promise; one that is further along than
    # any commit said is wrong too.
    ledger = Ledger(crash_time=100.0)
    ledger.cursor = [(Cursor(2, ((4, 5),)), 90.0), (Cursor(3, ((4, 6),)), 99.5)]
    ledger.cursor_tried = set(range(7)) | {8}
    empty: dict[str, list[Delivery]] = {
        name: [] for q in QUEUES for name in (q, DEAD_LETTER_PREFIX + q)
    }

    def check(cursor: Cursor | None) -> Verdict:
        return verify(ledger, Observed(empty, [], cursor), window=0)

    assert check(Cursor(3, ((4, 6),))).errors == []
    assert check(Cursor(7)).errors == []  # further along, as a commit that failed tried
    [forgot] = check(Cursor(3)).errors
    assert "lost positions [4, 5]" in forgot
    assert "10.000 s before the crash" in forgot  # the oldest commit that was not kept
    assert check(Cursor(2, ((4, 5),))).lost_ages == [0.5]
    [ahead] = check(Cursor(3, ((4, 6), (8, 9)))).errors
    assert "no commit had: [9]" in ahead
    assert check(None).lost_ages == [10.0]
