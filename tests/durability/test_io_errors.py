"""Write and fsync failures (EIO): never ack what failed, never "retry the fsync, then
ack"; the store turns read-only for publishers with ``storage_error``; a restart
recovers everything acked before the failure.

The random rounds fail the Nth write or the Nth fsync of the power-loss workload
(:mod:`tests.durability.powerloss`) with EIO, let the workload run on against the
read-only store, then crash, reboot and check every promise. The fake disk behaves
like Linux after a failed fsync: the pages it could not write are marked clean and
never written, so a store that retried the fsync and then acked would lose the
acked data here, and the check would catch it.
"""

from __future__ import annotations

import errno
import logging
import random
from pathlib import Path

import pytest

from msg.broker.server import Server
from msg.config import Config
from msg.persistence import Append, Claim, Kind, Outcome, Settle, StoreFailure
from msg.storage.filestore import FileStore
from tests.durability.crashfs import POWER_LOSSES, CrashFS
from tests.durability.powerloss import Clock, Ledger, Workload, observe, run_workload, verify
from tests.durability.test_power_loss import base_seed
from tests.integration.raw import Raw

log = logging.getLogger(__name__)

ROOT = "/data"
SEGMENT_BYTES = 2048
Q = "jobs"


_per_run: dict[str, int] = {}


async def per_run(what: str) -> int:
    """Writes or syncs in a run without faults (measured once)."""
    if what not in _per_run:
        fs = CrashFS()
        store = FileStore(ROOT, segment_bytes=SEGMENT_BYTES, fs=fs)
        await store.open()
        writes, syncs = fs.writes, fs.syncs
        try:
            await run_workload(
                store, random.Random(0), Clock(), Ledger(), shape=Workload(), dead=lambda: False
            )
        finally:
            await store.close()
        _per_run["write"], _per_run["sync"] = fs.writes - writes, fs.syncs - syncs
    return _per_run[what]


async def failure_round(seed: str, what: str, code: int) -> tuple[int, bool]:
    """One round; returns how many promises it checked and whether the fault fired."""
    rng = random.Random(seed)
    fs = CrashFS()
    clock = Clock()
    ledger = Ledger()
    store = FileStore(ROOT, segment_bytes=SEGMENT_BYTES, fs=fs)
    await store.open()
    # Anywhere in a typical run (runs vary: how writes group depends on timing).
    target = (fs.writes if what == "write" else fs.syncs) + rng.randint(
        1, int(await per_run(what) * 0.6)
    )
    (fs.fail_writes if what == "write" else fs.fail_syncs)[target] = code
    try:
        await run_workload(store, rng, clock, ledger, shape=Workload(), dead=lambda: False)
        fired = (fs.writes if what == "write" else fs.syncs) >= target
        if fired:
            assert store.writable() is StoreFailure.STORAGE_ERROR
            # Even once the disk works again, nothing more is accepted.
            (fs.fail_writes if what == "write" else fs.fail_syncs).clear()
            [late] = await store.append([Append(Kind.QUEUE, "q0", ["late"], [b"1"], clock.now)])
            assert late.failure is StoreFailure.STORAGE_ERROR
    finally:
        ledger.crash_time = clock.now
        fs.crash()
        await store.close()
    image = fs.reboot(POWER_LOSSES[rng.randrange(len(POWER_LOSSES))], rng, keep_metadata=True)
    again = FileStore(ROOT, segment_bytes=SEGMENT_BYTES, fs=image)
    await again.open()
    try:
        seen = await observe(again)
        assert again.writable() is None  # a restart starts afresh
    finally:
        await again.close()
    verdict = verify(ledger, seen, window=0)
    assert not verdict.errors, "\n".join(verdict.errors[:20])
    return verdict.promises, fired


@pytest.mark.slow_timeout(1800)
@pytest.mark.parametrize(
    ("what", "code"),
    [("write", errno.EIO), ("sync", errno.EIO), ("sync", errno.ENOSPC)],
    ids=["write-eio", "fsync-eio", "fsync-enospc"],
)
async def test_failed_write_or_fsync_loses_nothing_acked_before_it(
    what: str, code: int, slow: bool
) -> None:
    seed = base_seed()
    rounds = 500 if slow else 30
    promises = fired = 0
    for number in range(rounds):
        try:
            checked, hit = await failure_round(f"{seed}:{what}:{code}:{number}", what, code)
        except AssertionError as exc:
            raise AssertionError(f"MSG_CRASH_SEED={seed}, round {number}: {exc}") from exc
        promises += checked
        fired += hit
    log.info(
        "%s %s: %d rounds (the fault fired in %d), %d promises checked, none broken",
        what,
        errno.errorcode[code],
        rounds,
        fired,
        promises,
    )
    assert fired > rounds // 2  # the rest checked a run without faults


async def test_settles_fail_too_once_read_only() -> None:
    fs = CrashFS()
    store = FileStore(ROOT, fs=fs)
    await store.open()
    try:
        await store.append([Append(Kind.QUEUE, Q, ["m0", "m1"], [b"0", b"1"], 1.0)])
        await store.claim([Claim(Q, ("c", "c"))])
        fs.fail_syncs[fs.syncs + 1] = errno.EIO
        [settled] = await store.settle([Settle(Q, "c", ["m0"], Outcome.ACK)])
        assert settled.failure is StoreFailure.STORAGE_ERROR
        [settled] = await store.settle([Settle(Q, "c", ["m1"], Outcome.ACK)])
        assert settled.failure is StoreFailure.STORAGE_ERROR
        assert (await store.stats()).queues[Q].in_flight == 2
    finally:
        await store.close()


# -- a whole broker -------------------------------------------------------------------


def publish(n: int) -> dict[str, object]:
    return {"action": "publish", "topic": Q, "mode": "queue", "message": {"n": n}, "id": n}


@pytest.mark.parametrize("what", ["write", "sync"])
async def test_broker_turns_read_only_and_a_restart_recovers_what_was_acked(what: str) -> None:
    fs = CrashFS()
    config = Config(host="127.0.0.1", port=0, data_dir=Path(ROOT), min_free_bytes=0)
    server = Server(config, store=FileStore(ROOT, fs=fs))
    await server.start()
    try:
        client = await Raw.connect(server.addresses[0][1])
        try:
            await client.send(*(publish(n) for n in range(20)))
            assert all(r["type"] == "ack" for r in await client.recv_n(20))
            if what == "write":
                fs.fail_writes[fs.writes + 1] = errno.EIO
            else:
                fs.fail_syncs[fs.syncs + 1] = errno.EIO
            failed = await client.request(publish(20))
            assert failed["code"] == "storage_error", failed
            fs.fail_writes.clear()
            fs.fail_syncs.clear()
            # Read-only for publishers from now on, though the disk seems fine again.
            await client.send(*(publish(n) for n in range(21, 31)))
            replies = await client.recv_n(10)
            assert {r.get("code") for r in replies} == {"storage_error"}
            status = await client.request({"action": "status", "id": "s"})
            assert status["read_only"] == "storage_error"
        finally:
            await client.close()
    finally:
        await server.stop()
    store = FileStore(ROOT, fs=fs.reboot(POWER_LOSSES[0]))  # drop all that was not synced
    again = Server(config, store=store)
    await again.start()
    try:
        [deliveries] = await store.claim([Claim(Q, ("check",) * 100)])
        assert [d.payload for d in deliveries] == [b'{"n":%d}' % n for n in range(20)]
    finally:
        await again.stop()
