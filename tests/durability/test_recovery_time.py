"""Recovery time: a backlog of 100,000 queue messages of 200 bytes is ready for delivery
within 5 s of the broker's start (``--slow`` also measures 1,000,000).

"Ready for delivery" is measured end to end: from spawning ``python -m msg serve`` on
the data directory (interpreter start-up included) to a consumer holding the first
message. The store's own replay time (its "opened ... in X s" line) is logged too.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from msg.persistence import Append, FsyncPolicy, Kind
from msg.storage.filestore import FileStore
from msg.testing import BrokerProcess
from tests.integration.raw import Raw

log = logging.getLogger(__name__)

Q = "backlog"
BATCH = 5000
# A JSON string of 200 bytes, quotes included.
PAYLOAD = b'"' + b"x" * 198 + b'"'


async def write_backlog(root: Path, count: int) -> None:
    # Written by the store itself, in the production segment size; no fsync needed.
    store = FileStore(root, fsync=FsyncPolicy.NEVER)
    await store.open()
    try:
        for start in range(0, count, BATCH):
            ids = [f"m{i}" for i in range(start, start + BATCH)]
            await store.append([Append(Kind.QUEUE, Q, ids, [PAYLOAD] * BATCH, 1.0)])
    finally:
        await store.close()


async def time_to_first_delivery(root: Path) -> tuple[float, float]:
    """Seconds from spawning the broker to a consumer holding the first message, and
    the store's own replay time."""
    broker = BrokerProcess(root, start_timeout=120.0)
    spawned = time.monotonic()
    broker.start()
    try:
        client = await Raw.connect(broker.port)
        try:
            await client.send({"action": "subscribe", "topic": Q, "mode": "queue", "ack": "manual"})
            assert (await client.recv(60.0))["type"] == "ack"
            first = await client.recv(60.0)
            ready = time.monotonic() - spawned
            assert first["type"] == "message"
            assert first["message"] == PAYLOAD.decode().strip('"')
        finally:
            await client.close()
        opened = next(line for line in broker.log_lines if " opened " in line)
        match = re.search(r"\((\d+) ready messages\), .* in ([\d.]+) s", opened)
        assert match is not None, opened
        replay = float(match.group(2))
    finally:
        broker.stop()
    return ready, replay


@pytest.mark.slow_timeout(1800)
@pytest.mark.parametrize(
    ("count", "limit"),
    [pytest.param(100_000, 5.0, id="100k"), pytest.param(1_000_000, 60.0, id="1M")],
)
async def test_backlog_is_ready_for_delivery_soon_after_start(
    tmp_path: Path, count: int, limit: float, slow: bool
) -> None:
    if count > 100_000 and not slow:
        pytest.skip("the 1,000,000-message figure is measured under --slow")
    root = tmp_path / "data"
    await write_backlog(root, count)
    ready, replay = await time_to_first_delivery(root)
    log.info(
        "%d messages of %d bytes: first delivery %.2f s after spawning the broker "
        "(store replay %.2f s)",
        count,
        len(PAYLOAD),
        ready,
        replay,
    )
    assert ready < limit
