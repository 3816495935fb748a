"""A full disk: publishes are refused with ``storage_full`` and never acked, consumers
keep acking, publishing resumes once there is room, and a restart is clean.

Three levels: the store on a :class:`~tests.durability.crashfs.CrashFS` with a
capacity (exact and fast); a whole in-process broker on one (real sockets); and a
broker process on a real, small tmpfs (only where this machine lets the test mount
one: root with CAP_SYS_ADMIN; skipped elsewhere).

The free-space watermark (``min_free_bytes``) refuses publishes while the disk still
has room, so that acks, dead letters and compaction can still write: with it, the
disk is never actually full (no write ever meets ENOSPC). Without it, the disk fills
up: the write that does not fit is cut off (no partial record stays behind), its
publishes get ``storage_full``, and the store keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from msg.broker.server import Server
from msg.config import Config
from msg.persistence import Append, Claim, Kind, Outcome, Settle, StoreFailure
from msg.storage.filestore import FileStore
from msg.testing import BrokerProcess
from tests.durability.crashfs import CrashFS
from tests.integration.raw import Raw

ROOT = "/data"
Q = "jobs"
CAPACITY = 256 * 1024
MIN_FREE = 64 * 1024
SEGMENT_BYTES = 16 * 1024
PAYLOAD = b'"' + b"p" * 200 + b'"'


def make_store(fs: CrashFS, min_free: int = MIN_FREE) -> FileStore:
    # free_check_interval=0: every writable() reads the free space, so a test that frees
    # space sees the effect at once instead of waiting out the interval.
    return FileStore(
        ROOT, segment_bytes=SEGMENT_BYTES, min_free_bytes=min_free, free_check_interval=0, fs=fs
    )


async def fill(store: FileStore, prefix: str) -> tuple[list[str], StoreFailure]:
    """Publish batches of 20 until one is refused; the ids acked, and the refusal."""
    acked: list[str] = []
    for batch in range(10_000):
        ids = [f"{prefix}{batch}-{i}" for i in range(20)]
        [result] = await store.append([Append(Kind.QUEUE, Q, ids, [PAYLOAD] * 20, 1.0)])
        acked += ids[: len(result.positions)]
        if result.failure is not None:
            return acked, result.failure
    raise AssertionError("the disk never filled up")


async def ready_ids(store: FileStore) -> list[str]:
    [deliveries] = await store.claim([Claim(Q, ("peek",) * 100_000)])
    await store.release(Q, "peek")
    return [d.message_id for d in deliveries]


async def test_watermark_refuses_publishes_before_the_disk_is_full() -> None:
    fs = CrashFS(capacity=CAPACITY)
    store = make_store(fs)
    await store.open()
    try:
        acked, failure = await fill(store, "a")
        assert failure is StoreFailure.STORAGE_FULL
        assert store.writable() is StoreFailure.STORAGE_FULL
        assert fs.enospc == 0  # never actually full
        assert fs.free_bytes(ROOT) >= MIN_FREE - 20 * 300  # at most one batch past the mark
        assert await ready_ids(store) == acked  # refused publishes left nothing behind

        # Consumers can still ack: the room below the mark is theirs.
        [deliveries] = await store.claim([Claim(Q, ("c",) * len(acked))])
        done = [d.message_id for d in deliveries]
        results = await store.settle([Settle(Q, "c", done, Outcome.ACK)])
        assert [r.failure for r in results] == [None]
        assert fs.enospc == 0

        # The acks let maintenance delete segments: room again, with no restart.
        for tick in range(10):
            await store.maintain(1000.0 + tick)
        assert store.writable() is None
        more, failure = await fill(store, "b")
        assert len(more) > 0
        assert failure is StoreFailure.STORAGE_FULL

        # Or the operator frees space elsewhere on the disk.
        fs.capacity = CAPACITY + 128 * 1024
        assert store.writable() is None
        [result] = await store.append([Append(Kind.QUEUE, Q, ["last"], [PAYLOAD], 1.0)])
        assert result.failure is None
    finally:
        await store.close()
    again = make_store(fs)
    recovery = await again.open()
    try:
        assert (recovery.torn_records, recovery.corrupt_records) == (0, 0)
        assert await ready_ids(again) == [*more, "last"]
    finally:
        await again.close()


async def test_without_a_watermark_the_failed_write_is_cut_off() -> None:
    fs = CrashFS(capacity=CAPACITY)
    store = make_store(fs, min_free=0)
    await store.open()
    try:
        acked, failure = await fill(store, "a")
        assert failure is StoreFailure.STORAGE_FULL
        assert fs.enospc > 0  # this time the disk really was full
        assert store.writable() is None  # each write tries again
        assert await ready_ids(store) == acked
        fs.capacity = CAPACITY * 2
        [result] = await store.append([Append(Kind.QUEUE, Q, ["after"], [PAYLOAD], 1.0)])
        assert result.failure is None
    finally:
        await store.close()
    again = make_store(fs, min_free=0)
    recovery = await again.open()
    try:
        assert (recovery.torn_records, recovery.corrupt_records) == (0, 0)
        assert await ready_ids(again) == [*acked, "after"]
    finally:
        await again.close()


# -- a whole broker -------------------------------------------------------------------


def publish(n: int, pad: int = 0) -> dict[str, Any]:
    message = {"n": n, "pad": "x" * pad}
    return {"action": "publish", "topic": Q, "mode": "queue", "message": message, "id": n}


async def publish_until_refused(client: Raw, start: int, pad: int = 0) -> tuple[list[int], int]:
    """Pipelined bursts until a publish is refused; the ns acked and the first refused."""
    acked: list[int] = []
    n = start
    while True:
        await client.send(*(publish(k, pad) for k in range(n, n + 50)))
        replies = await client.recv_n(50)
        for reply in replies:
            if reply["type"] == "ack":
                acked.append(reply["id"])
            else:
                assert reply["code"] == "storage_full", reply
                assert "message_id" not in reply
                refused = reply["id"]
                # Every publish after the first refused one is refused too.
                assert all(r["type"] == "error" for r in replies if r["id"] > refused)
                return acked, refused
        n += 50


async def consume(port: int, count: int) -> list[int]:
    """Take ``count`` messages with manual acks, ack each; return their ns."""
    client = await Raw.connect(port)
    try:
        await client.send(
            {"action": "subscribe", "topic": Q, "mode": "queue", "ack": "manual", "prefetch": 1000}
        )
        assert (await client.recv())["type"] == "ack"
        got: list[int] = []
        replies = 0
        while len(got) < count or replies < count:
            frame = await client.recv()
            if frame["type"] == "message":
                if len(got) < count:
                    got.append(frame["message"]["n"])
                    await client.send({"action": "ack", "message_id": frame["message_id"]})
            else:
                assert frame["type"] == "ack", frame  # the ack was stored
                replies += 1
        return got
    finally:
        await client.close()


async def test_broker_refuses_publishes_keeps_acking_and_resumes() -> None:
    fs = CrashFS(capacity=CAPACITY)
    config = Config(host="127.0.0.1", port=0, data_dir=Path(ROOT))
    server = Server(config, store=make_store(fs))
    await server.start()
    try:
        port = server.addresses[0][1]
        publisher = await Raw.connect(port)
        try:
            acked, refused = await publish_until_refused(publisher, 0)
            assert acked == list(range(refused))
            assert await consume(port, 100) == acked[:100]  # consumers ack while full
            fs.capacity = CAPACITY * 4  # space freed; no restart
            reply = await publisher.request(publish(10_000))
            assert reply["type"] == "ack", reply
        finally:
            await publisher.close()
    finally:
        await server.stop()
    store = make_store(fs)
    again = Server(config, store=store)
    await again.start()
    try:
        stats = await store.stats()
        assert stats.queues[Q].ready == len(acked) - 100 + 1
        assert await consume(again.addresses[0][1], len(acked) - 100 + 1) == [
            *acked[100:],
            10_000,
        ]
    finally:
        await again.stop()


# -- a real disk ----------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``where``, or skip the test if this machine cannot."""
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        timeout=10,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10, check=False)


async def test_broker_process_on_a_full_tmpfs(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        ballast = disk / "ballast"
        ballast.write_bytes(bytes(1024 * 1024))  # what the operator will delete
        broker = BrokerProcess(
            disk / "data", args=["--min-free-bytes", "1MiB", "--segment-bytes", "64KiB"]
        )
        broker.start()
        try:
            publisher = await Raw.connect(broker.port)
            try:
                acked, refused = await publish_until_refused(publisher, 0, pad=2000)
                assert acked == list(range(refused))
                # The batch that crosses the mark is written whole (a burst here is 50
                # publishes of ~2 KB) and tmpfs rounds each segment file up to pages.
                assert shutil.disk_usage(disk).free >= 1024 * 1024 - 256 * 1024
                assert await consume(broker.port, 50) == acked[:50]
                mark = len(broker.log_lines)
                await asyncio.to_thread(ballast.unlink)
                await asyncio.to_thread(
                    broker.wait_for_log, "publishes are accepted", timeout=10.0, start=mark
                )
                reply = await publisher.request(publish(100_000))
                assert reply["type"] == "ack", reply
            finally:
                await publisher.close()
        finally:
            assert broker.stop() == 0
        broker.start()
        try:
            assert not [line for line in broker.log_lines if "torn" in line or "corrupt" in line]
            assert await consume(broker.port, len(acked) - 50 + 1) == [*acked[50:], 100_000]
        finally:
            broker.stop()
