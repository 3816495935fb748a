"""Random operation sequences: the file store answers exactly as the memory store,
and after a restart keeps exactly the messages that were not done."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from msg.persistence import (
    Append,
    Claim,
    FsyncPolicy,
    Kind,
    Outcome,
    Settle,
    Store,
)
from msg.storage.filestore import FileStore
from msg.storage.memory import MemoryStore

QUEUES = ("a", "b")
CONSUMERS = ("c1", "c2", "c3")


async def step(
    store: Store, rng: random.Random, counter: list[int], held: set[tuple[str, str, str]]
) -> object:
    choice = rng.random()
    queue = rng.choice(QUEUES)
    if choice < 0.35:
        appends = []
        for name in rng.sample(QUEUES, rng.randint(1, 2)):
            ids = []
            payloads = []
            for _ in range(rng.randint(0, 8)):
                counter[0] += 1
                # Now and then a retry of an earlier id.
                number = counter[0] if rng.random() > 0.1 else rng.randint(1, counter[0])
                ids.append(f"m{number}")
                payloads.append(b'{"n":%d,"pad":"%s"}' % (number, b"p" * rng.randint(0, 200)))
            appends.append(Append(Kind.QUEUE, name, ids, payloads, float(counter[0])))
        return [(list(r.positions), r.failure) for r in await store.append(appends)]
    if choice < 0.6:
        consumers = tuple(rng.choice(CONSUMERS) for _ in range(rng.randint(1, 5)))
        auto_ack = rng.random() < 0.2
        deadline = float(rng.randint(1, 50)) if rng.random() < 0.3 else None
        [ds] = await store.claim([Claim(queue, consumers, auto_ack=auto_ack, deadline=deadline)])
        if not auto_ack:
            held.update((queue, d.message_id, d.consumer) for d in ds)
        return [(d.message_id, d.consumer, d.attempt, d.payload, d.reason) for d in ds]
    if choice < 0.85:
        if not held:
            return None
        picks = rng.sample(sorted(held), min(len(held), rng.randint(1, 6)))
        groups: dict[tuple[str, str], list[str]] = {}
        for q, m, c in picks:
            groups.setdefault((q, c), []).append(m)
        if rng.random() < 0.2:
            groups.setdefault((queue, rng.choice(CONSUMERS)), []).append("m-unknown")
        outcomes = [Outcome.ACK, Outcome.ACK, Outcome.REQUEUE, Outcome.DEAD]
        settles = [Settle(q, c, ms, rng.choice(outcomes), "r") for (q, c), ms in groups.items()]
        results = await store.settle(settles)
        for (q, c), ms in groups.items():
            held.difference_update((q, m, c) for m in ms)
        return [(sorted(r.unknown), r.failure) for r in results]
    if choice < 0.92:
        consumer = rng.choice(CONSUMERS)
        return await store.release(queue, consumer)
    if choice < 0.97:
        return await store.reclaim(float(rng.randint(1, 60)))
    await store.maintain(1000.0)
    return None


async def not_done(store: Store) -> dict[str, list[str]]:
    out = {}
    for queue in (*QUEUES, *("$dead." + q for q in QUEUES)):
        await store.release(queue, "c1")
        await store.release(queue, "c2")
        await store.release(queue, "c3")
        [ds] = await store.claim([Claim(queue, ("z",) * 100_000)])
        out[queue] = [d.message_id for d in ds]
    return out


@pytest.mark.parametrize("limit", [None, 25])
@pytest.mark.parametrize("seed", range(6))
async def test_file_store_matches_memory_store(
    tmp_path: Path, seed: int, limit: int | None
) -> None:
    memory = MemoryStore(max_queue_messages=limit)
    files = FileStore(
        tmp_path, segment_bytes=1500, fsync=FsyncPolicy.NEVER, max_queue_messages=limit
    )
    await memory.open()
    await files.open()
    try:
        rng_m, rng_f = random.Random(seed), random.Random(seed)
        count_m, count_f = [0], [0]
        held_m: set[tuple[str, str, str]] = set()
        held_f: set[tuple[str, str, str]] = set()
        for i in range(400):
            expected = await step(memory, rng_m, count_m, held_m)
            got = await step(files, rng_f, count_f, held_f)
            assert got == expected, i
        stats_m, stats_f = await memory.stats(), await files.stats()
        assert stats_f.queues == stats_m.queues
    finally:
        await files.close()
    reopened = FileStore(tmp_path, segment_bytes=1500, max_queue_messages=limit)
    await reopened.open()
    try:
        assert await not_done(reopened) == await not_done(memory)
    finally:
        await reopened.close()
