"""Crashes during compaction and during start-up replay lose nothing.

How the store rewrites, and why a crash anywhere in it is safe:

- A queue segment is compacted by appending copies of its live messages (same id,
  sequence number and attempt count) to the active segment, fsyncing, and only then
  deleting the old file (and fsyncing the directory). Replay keeps the newest copy
  of a sequence number, so a crash before the delete leaves duplicates that replay
  folds into one, never a loss.
- ``cursors.log`` is rewritten as a temporary file, fsynced, renamed over the old
  one, and the directory fsynced.
- Start-up replay writes too: it cuts torn tails (after keeping a file with corrupt
  records aside), moves unreadable directories to ``lost+found`` and deletes
  temporary files. Each of those is safe to redo.

In-process, exhaustively: the same state is rebuilt on a
:class:`~tests.durability.crashfs.CrashFS` once per file-system operation that
maintenance (or start-up) performs, crashed just before that operation, rebooted as a
process crash (everything written survives) and as power losses (what was not synced
is dropped or torn, with and without a kept metadata-journal prefix), and checked.

With real processes: a broker busy compacting gets SIGKILL right after it starts a
compaction (its DEBUG log line says when), and a broker replaying a damaged backlog
gets SIGKILL at random moments of its start-up; each round restarts it on the same
data directory, and the last start must hold exactly the live messages (50 rounds
each under ``--slow``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from msg.errors import MsgError
from msg.persistence import Append, Claim, CursorCommit, FsyncPolicy, Kind, Outcome, Settle
from msg.storage.filenames import encode_name
from msg.storage.filestore import FileStore
from msg.testing import BrokerProcess
from tests.durability.crashfs import CrashFS, Loss
from tests.integration.raw import Raw

log = logging.getLogger(__name__)

ROOT = "/data"
Q = "jobs"
T = "news"
SEGMENT_BYTES = 1024
REBOOTS = (
    (Loss.KEEP, False),
    (Loss.DROP, False),
    (Loss.DROP, True),
    (Loss.TORN, True),
    (Loss.PAGES, True),
)


def open_store(fs: CrashFS) -> FileStore:
    return FileStore(ROOT, segment_bytes=SEGMENT_BYTES, fs=fs)


async def ready(store: FileStore, queue: str = Q) -> list[tuple[str, int]]:
    [deliveries] = await store.claim([Claim(queue, ("check",) * 10_000)])
    return [(d.message_id, d.attempt) for d in deliveries]


# -- in-process: a crash before every operation of maintenance ------------------------


async def build_compactable() -> tuple[CrashFS, FileStore, list[tuple[str, int]], dict[str, int]]:
    """A store whose oldest queue segments are mostly acked (compaction work) and whose
    cursors.log is due for a rewrite. Returns what must survive any crash: the live
    queue messages with the attempt count a restart reports, and the cursors."""
    fs = CrashFS()
    store = open_store(fs)
    await store.open()
    for i in range(0, 90, 3):
        ids = [f"m{k}" for k in range(i, i + 3)]
        payloads = [b'{"n":%d}' % k for k in range(i, i + 3)]
        await store.append([Append(Kind.QUEUE, Q, ids, payloads, 1.0)])
    [deliveries] = await store.claim([Claim(Q, ("c",) * 90)])
    live = {f"m{k}" for k in range(0, 90, 16)}  # one in sixteen stays: compaction work
    requeued = {"m16", "m48"}
    await store.settle(
        [
            Settle(
                Q, "c", [d.message_id for d in deliveries if d.message_id not in live], Outcome.ACK
            ),
            Settle(Q, "c", sorted(requeued), Outcome.REQUEUE),
        ]
    )
    # Still in flight: a restart makes them ready again, attempt as last written.
    expected = [(f"m{k}", 2 if f"m{k}" in requeued else 1) for k in range(0, 90, 16)]
    await store.append([Append(Kind.TOPIC, T, ["t0"], [b"0"], 1.0)])
    commits = [CursorCommit(T, f"c{i % 3}", i) for i in range(4200)]
    await store.commit_cursors(commits)
    cursors = {"c0": 4197, "c1": 4198, "c2": 4199}
    return fs, store, expected, cursors


async def check_reboot(
    fs: CrashFS,
    loss: Loss,
    keep_metadata: bool,
    seed: int,
    expected: list[tuple[str, int]],
    cursors: dict[str, int],
) -> None:
    image = fs.reboot(loss, random.Random(seed), keep_metadata=keep_metadata)
    store = open_store(image)
    await store.open()
    try:
        got = await ready(store)
        assert [i for i, _ in got] == [i for i, _ in expected]
        # A compaction copy of a delivered message records that delivery (the restart
        # then says attempt 2); without the copy the restart says 1. Either is true.
        for (_, attempt), (message_id, least) in zip(got, expected, strict=True):
            assert least <= attempt <= least + 1, message_id
        assert dict((await store.stats()).topics[T].cursors) == cursors
    finally:
        await store.close()


async def maintain_three_times(store: FileStore) -> None:
    for tick in range(3):
        await store.maintain(1000.0 + tick)


async def crash_everywhere_in(
    build: Callable[[], Awaitable[tuple[CrashFS, FileStore, Any, Any]]],
    work: Callable[[FileStore], Awaitable[None]],
) -> int:
    """Crash ``work`` before each of its file-system operations; check every reboot.
    Returns how many crash points there were."""
    fs, store, expected, cursors = await build()
    before = fs.ops
    await work(store)
    total = fs.ops - before
    await store.close()
    assert total > 10, "the work did no compaction to crash in"
    # Without a crash, the work kept everything too.
    await check_reboot(fs, Loss.DROP, False, 0, expected, cursors)
    for point in range(1, total + 1):
        fs, store, expected, cursors = await build()
        fs.crash_at = fs.ops + point
        with contextlib.suppress(OSError):
            await work(store)
        assert fs.crashed, point
        await store.close()
        for loss, keep_metadata in REBOOTS:
            try:
                await check_reboot(fs, loss, keep_metadata, point, expected, cursors)
            except AssertionError as exc:
                raise AssertionError(f"crash before operation {point} of {total}, {loss}") from exc
    return total


async def test_crash_at_every_operation_of_compaction() -> None:
    points = await crash_everywhere_in(build_compactable, maintain_three_times)
    log.info("compaction: crashed before each of its %d operations, 5 reboots each", points)


# -- in-process: a crash before every operation of start-up --------------------------


async def build_damaged() -> tuple[CrashFS, FileStore, Any, Any]:
    """A data directory that start-up must repair: a torn tail in a file that also has a
    corrupt record, an unreadable meta.json, a leftover temporary file."""
    fs = CrashFS()
    store = open_store(fs)
    await store.open()
    for i in range(12):
        await store.append([Append(Kind.QUEUE, Q, [f"m{i}"], [b'{"n":%d}' % i], 1.0)])
    await store.append([Append(Kind.QUEUE, "other", ["o0"], [b"0"], 1.0)])
    await store.append([Append(Kind.TOPIC, T, ["t0"], [b"0"], 1.0)])
    await store.commit_cursors([CursorCommit(T, "c0", 1)])
    await store.close()
    queue_dir = f"{ROOT}/queues/{encode_name(Q)}"
    last = sorted(n for n in fs.listdir(queue_dir) if n.endswith(".log"))[-1]
    path = f"{queue_dir}/{last}"
    data = bytearray(fs.read_file(path))
    data[12] ^= 2  # its first record: corrupt, with good ones after it
    fs.write_file(path, bytes(data) + b'{"op":"pub","seq":12,"id":')
    fs.write_file(f"{ROOT}/queues/other/meta.json", b"{not json")
    fs.write_file(f"{ROOT}/topics/{T}/cursors.log.tmp", b"half a rewrite")
    fs.writeback()
    first = int(last.split(".")[0])
    gone = f"m{first}"
    expected = [(f"m{i}", 1) for i in range(12) if f"m{i}" != gone]
    template = fs
    template.crash()
    image = template.reboot(Loss.KEEP)
    return image, open_store(image), expected, {"c0": 1}


async def test_crash_at_every_operation_of_start_up() -> None:
    fs, _, expected, cursors = await build_damaged()
    store = open_store(fs)
    before = fs.ops
    await store.open()
    total = fs.ops - before
    assert await ready(store) == expected
    await store.close()
    assert total >= 5  # the copy aside, the cut, the move to lost+found, the removal
    for point in range(1, total + 1):
        for loss, keep_metadata in REBOOTS:
            fs, _, expected, cursors = await build_damaged()
            fs.crash_at = fs.ops + point
            with pytest.raises(MsgError):
                await open_store(fs).open()
            image = fs.reboot(loss, random.Random(point), keep_metadata=keep_metadata)
            try:
                await check_reboot(image, Loss.KEEP, False, 0, expected, cursors)
            except AssertionError as exc:
                raise AssertionError(f"crash before operation {point} of {total}, {loss}") from exc
    log.info("start-up: crashed before each of its %d operations, 5 reboots each", total)


# -- real processes: SIGKILL --------------------------------------------------------

QUEUES = [f"q{i}" for i in range(4)]
BACKLOG = 40_000


async def fill_and_ack(root: Path, rng: random.Random, per_queue: int) -> dict[str, set[int]]:
    """Publish ``per_queue`` messages to each queue, ack all but about one in twenty;
    return the ns left live per queue.

    Written by the store itself, with no maintenance run: every mostly-acked segment is
    left for the broker to compact (over a socket, its ticks would compact during the
    filling already).
    """
    live: dict[str, set[int]] = {}
    store = FileStore(root, segment_bytes=4096, fsync=FsyncPolicy.NEVER)
    await store.open()
    try:
        for queue in QUEUES:
            for start in range(0, per_queue, 20):
                numbers = range(start, min(start + 20, per_queue))
                await store.append(
                    [
                        Append(
                            Kind.QUEUE,
                            queue,
                            [f"{queue}-{n}" for n in numbers],
                            [b'{"n":%d}' % n for n in numbers],
                            1.0,
                        )
                    ]
                )
            [deliveries] = await store.claim([Claim(queue, ("c",) * per_queue)])
            keep = {n for n in range(per_queue) if rng.random() < 0.05}
            live[queue] = keep
            done = [d.message_id for d in deliveries if int(d.message_id.split("-")[1]) not in keep]
            [settled] = await store.settle([Settle(queue, "c", done, Outcome.ACK)])
            assert settled.failure is None
    finally:
        await store.close()
    return live


async def queue_contents(port: int, counts: dict[str, int]) -> dict[str, list[int]]:
    """Consume (auto ack: this is the final look) ``counts[queue]`` messages of each."""
    out: dict[str, list[int]] = {}
    client = await Raw.connect(port)
    try:
        for queue, count in counts.items():
            reply = await client.request({"action": "subscribe", "topic": queue, "mode": "queue"})
            assert reply["type"] == "ack", reply
            out[queue] = [(await client.recv())["message"]["n"] for _ in range(count)]
            await client.request({"action": "unsubscribe", "topic": queue, "mode": "queue"})
    finally:
        await client.close()
    return out


async def depths(port: int) -> dict[str, int]:
    client = await Raw.connect(port)
    try:
        status = await client.request({"action": "status"})
    finally:
        await client.close()
    return {name: q["depth"] + q["unacked"] for name, q in status["queues"].items()}


@pytest.mark.slow_timeout(1800)
async def test_sigkill_during_compaction_loses_nothing(tmp_path: Path, slow: bool) -> None:
    rng = random.Random()
    rounds = 50 if slow else 3
    # About 25 segments a queue (75 under --slow): a round compacts one to four.
    live = await fill_and_ack(tmp_path / "data", rng, 3000 if slow else 1000)
    broker = BrokerProcess(
        tmp_path / "data", args=["--segment-bytes", "4096", "--log-level", "DEBUG"]
    )
    hit = 0
    for _ in range(rounds):
        broker.start()
        try:
            await asyncio.to_thread(broker.wait_for_log, "compacting .*", timeout=15.0)
            # The experiment: a random moment within the compaction just begun.
            await asyncio.to_thread(time.sleep, rng.uniform(0.0, 0.005))
        finally:
            broker.kill()
        hit += 1
    broker.start()
    try:
        counts = await depths(broker.port)
        assert counts == {queue: len(keep) for queue, keep in live.items()}
        contents = await queue_contents(broker.port, counts)
        assert contents == {queue: sorted(keep) for queue, keep in live.items()}
    finally:
        broker.stop()
    log.info("SIGKILL during compaction: %d rounds, nothing lost or returned", hit)


@pytest.mark.slow_timeout(1800)
async def test_sigkill_during_start_up_replay_loses_nothing(tmp_path: Path, slow: bool) -> None:
    rng = random.Random()
    rounds = 50 if slow else 3
    root = tmp_path / "data"
    # A backlog that takes a while to replay.
    store = FileStore(root, segment_bytes=256 * 1024)
    await store.open()
    try:
        for batch in range(BACKLOG // 1000):
            ids = [f"m{batch}-{i}" for i in range(1000)]
            payloads = [b'{"n":%d}' % (batch * 1000 + i) for i in range(1000)]
            await store.append([Append(Kind.QUEUE, Q, ids, payloads, 1.0)])
    finally:
        await store.close()
    last = sorted((root / "queues" / Q).glob("*.log"))[-1]
    data = bytearray(last.read_bytes())
    data[5] ^= 1  # a corrupt first record in the newest file
    damaged_first = int(data[data.index(b'"msg":{"n":') + 11 :].split(b"}")[0])
    last.write_bytes(bytes(data))
    torn = b'{"op":"pub","se'

    def damage() -> None:
        # Before every start: a torn tail to cut (after keeping the file aside) and a
        # half-done rewrite to delete, so each start-up has repairs to make.
        with last.open("ab") as file:
            file.write(torn)
        (root / "queues" / Q / "meta.json.tmp").write_bytes(b"{")

    broker = BrokerProcess(root)
    await asyncio.to_thread(damage)
    spawned = time.monotonic()
    broker.start()
    listening = time.monotonic() - spawned
    opened = next(line for line in broker.log_lines if "opened" in line)
    replay = float(opened.rsplit(" in ", 1)[1].split(" ")[0])
    broker.kill()
    started = time.monotonic()
    killed_early = 0
    for _ in range(rounds):
        await asyncio.to_thread(damage)
        # The experiment: a moment within the replay (it ends just before listening).
        delay = rng.uniform(max(0.0, listening - replay - 0.1), listening)
        starting = asyncio.create_task(asyncio.to_thread(broker.start))
        await asyncio.to_thread(time.sleep, delay)
        broker.kill()
        try:
            await starting
        except MsgError:
            killed_early += 1  # killed before it was listening
    broker.start()
    try:
        counts = await depths(broker.port)
        assert counts == {Q: BACKLOG - 1}
        [numbers] = (await queue_contents(broker.port, counts)).values()
        assert numbers == [n for n in range(BACKLOG) if n != damaged_first]
    finally:
        broker.stop()
    # The file with the corrupt record was kept before its tail was cut: once per
    # distinct content (a start-up killed before its cut leaves two torn tails for the
    # next, a new content; one killed after its copy is reused).
    kept = list((root / "lost+found").rglob("*.log*"))
    assert 1 <= len(kept) <= rounds + 1
    assert all(path.read_bytes().startswith(bytes(data) + torn) for path in kept)
    log.info(
        "SIGKILL during start-up: replay takes %.2f s of %.2f s; %d rounds (%d before "
        "listening) in %.1f s, nothing lost",
        replay,
        listening,
        rounds,
        killed_early,
        time.monotonic() - started,
    )
