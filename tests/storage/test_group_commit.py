"""Group commit's sync rounds, on real files and a real storage thread.

- Under ``always`` a waiter is told only once a round that began after its write has
  synced it; writes made while a round runs wait for the next one, and waiters are
  told in the order they asked. ``drain`` returns when the last round has ended.
- A round that raises something other than an OSError (a bug) still ends: every
  waiter gets an error, the failure is final and reported once, and ``drain`` does
  not hang.
- A waiter that writes and waits again while it is being told starts the next round
  itself, and no second round runs beside it: a descriptor let go of during that round
  stays open until the round has synced it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from msg.persistence import FsyncPolicy
from msg.storage.commit import GroupCommit
from msg.storage.fs import FileSystem
from msg.storage.thread import StorageThread


class GatedFS(FileSystem):
    """The real file system, whose fsyncs wait for ``gate`` and are noted."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.synced: list[int] = []

    def sync(self, fd: int) -> None:
        assert self.gate.wait(30), "the test never opened the gate"
        super().sync(fd)
        self.synced.append(fd)


class SteppedFS(FileSystem):
    """The real file system, whose fsyncs each wait for one ``step`` permit;
    ``second`` is set once a second fsync has begun to wait."""

    def __init__(self) -> None:
        self.step = threading.Semaphore(0)
        self.second = threading.Event()
        self.begun = 0
        self.synced: list[int] = []

    def sync(self, fd: int) -> None:
        self.begun += 1
        if self.begun == 2:
            self.second.set()
        assert self.step.acquire(timeout=30), "the test never let the sync go"
        super().sync(fd)
        self.synced.append(fd)


class BuggyFS(FileSystem):
    """The real file system, but a sync raises what no disk fault raises."""

    def sync(self, fd: int) -> None:
        raise RuntimeError("a bug in the sync")


def _commit_with_one_write(
    fs: FileSystem, executor: StorageThread, failures: list[OSError], tmp_path: Path
) -> tuple[GroupCommit, int]:
    """A group commit under ``always``, and a log with one record written, not synced."""
    commit = GroupCommit(
        fs, FsyncPolicy.ALWAYS, asyncio.get_running_loop(), executor, failures.append
    )
    fd = fs.open(str(tmp_path / "00000000000000000000.log"))
    fs.pwrite(fd, b"first\n", 0)
    commit.wrote(fd)
    return commit, fd


async def test_waiters_are_told_in_order_once_a_later_round_synced_their_writes(
    tmp_path: Path,
) -> None:
    fs = GatedFS()
    failures: list[OSError] = []
    told: list[tuple[str, OSError | None]] = []
    with StorageThread() as executor:
        commit, fd = _commit_with_one_write(fs, executor, failures, tmp_path)
        commit.after_durable(lambda error: told.append(("first", error)))
        # The first round is running (held at its fsync): this write is not in it.
        fs.pwrite(fd, b"second\n", 6)
        commit.wrote(fd)
        commit.after_durable(lambda error: told.append(("second", error)))
        assert told == []
        assert commit.dirty
        fs.gate.set()
        await commit.drain()
        assert told == [("first", None), ("second", None)]
        assert fs.synced == [fd, fd]  # two rounds: the second write needed its own
        assert not commit.dirty
        assert failures == []
        fs.close(fd)
        commit.close_all()


async def test_a_round_that_raises_a_bug_fails_every_waiter_and_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fs = BuggyFS()
    failures: list[OSError] = []
    told: list[OSError | None] = []
    with StorageThread() as executor:
        commit, fd = _commit_with_one_write(fs, executor, failures, tmp_path)
        with caplog.at_level(logging.ERROR, logger="msg.storage.commit"):
            commit.after_durable(told.append)
            commit.after_durable(told.append)
            await commit.drain()
        assert len(told) == 2
        for error in told:
            assert isinstance(error, OSError)
            assert "a bug in the sync" in str(error)
        assert len(failures) == 1
        assert commit.failure is failures[0]
        assert "sync round failed unexpectedly" in caplog.text
        # Final: a later waiter is told at once, and no round starts.
        commit.after_durable(told.append)
        assert told[-1] is commit.failure
        assert commit._round is None  # white box: nothing is left running
        fs.close(fd)
        commit.close_all()


async def test_a_waiter_that_waits_again_starts_the_only_next_round(tmp_path: Path) -> None:
    fs = SteppedFS()
    failures: list[OSError] = []
    told: list[tuple[str, OSError | None]] = []
    with StorageThread() as executor:
        commit, fd = _commit_with_one_write(fs, executor, failures, tmp_path)

        def first(error: OSError | None) -> None:
            told.append(("first", error))
            # Told inside the round's end: write again and wait again, as a store's
            # settle does when it records what it was told.
            fs.pwrite(fd, b"second\n", 6)
            commit.wrote(fd)
            commit.after_durable(lambda error: told.append(("second", error)))

        commit.after_durable(first)
        fs.step.release()  # the first round syncs
        assert await asyncio.to_thread(fs.second.wait, 30)  # the second round waits
        assert told == [("first", None)]
        # The file cache lets go of the descriptor while the second round holds it.
        commit.close_fd(fd, str(tmp_path / "00000000000000000000.log"))
        for _ in range(4):
            fs.step.release()
        await commit.drain()
        assert failures == []
        assert told == [("first", None), ("second", None)]
        assert fs.synced == [fd, fd]
        assert commit._round is None  # white box: nothing is left running
        commit.close_all()
