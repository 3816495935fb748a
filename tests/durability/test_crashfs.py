"""The crashing file system itself: it must lose exactly what POSIX allows it to lose."""

from __future__ import annotations

import errno
import os
import random

import pytest

from msg.errors import StorageError
from tests.durability.crashfs import PAGE, CrashFS, Loss


def written(fs: CrashFS, path: str, data: bytes, *, sync: bool) -> int:
    fd = fs.open(path)
    fs.pwrite(fd, data, fs.size(fd))
    if sync:
        fs.sync(fd)
    return fd


def fresh(*dirs: str) -> CrashFS:
    """A file system whose directories ``dirs`` exist durably."""
    fs = CrashFS()
    for directory in dirs:
        fs.makedirs(directory)
    fs.writeback()
    return fs


def test_unsynced_bytes_are_dropped_synced_ones_kept() -> None:
    fs = fresh("/d")
    fd = written(fs, "/d/f", b"synced\n", sync=True)
    fs.sync_path("/d")
    fs.pwrite(fd, b"not yet\n", 7)
    assert fs.read_file("/d/f") == b"synced\nnot yet\n"
    assert fs.reboot(Loss.DROP).read_file("/d/f") == b"synced\n"
    assert fs.reboot(Loss.KEEP).read_file("/d/f") == b"synced\nnot yet\n"


def test_a_new_name_needs_its_directory_synced() -> None:
    fs = fresh("/d")
    written(fs, "/d/f", b"data", sync=True)  # the file's data, not its name
    assert not fs.reboot(Loss.DROP).exists("/d/f")
    fs = fresh("/d")
    written(fs, "/d/f", b"data", sync=True)
    fs.sync_path("/d")
    assert fs.reboot(Loss.DROP).read_file("/d/f") == b"data"


def test_new_directories_need_their_parent_synced() -> None:
    fs = fresh()
    fs.makedirs("/a/b")
    fs.sync_path("/a")  # b's entry, but not a's own
    assert not fs.reboot(Loss.DROP).exists("/a")
    fs = fresh()
    fs.makedirs("/a/b")
    fs.sync_path("/")
    fs.sync_path("/a")
    assert fs.reboot(Loss.DROP).is_dir("/a/b")


def test_rename_and_remove_are_undone_unless_the_directory_is_synced() -> None:
    fs = fresh("/d")
    written(fs, "/d/old", b"one", sync=True)
    written(fs, "/d/gone", b"two", sync=True)
    fs.sync_path("/d")
    fs.rename("/d/old", "/d/new")
    fs.remove("/d/gone")
    image = fs.reboot(Loss.DROP)
    assert image.tree() == {"/d/old": b"one", "/d/gone": b"two"}


def test_a_kept_journal_prefix_can_expose_a_rename_before_its_data() -> None:
    # Writing a temp file and renaming it without syncing it first: a crash may keep
    # the rename (an ordered metadata journal commits it) but not the data.
    outcomes = set()
    for seed in range(40):
        fs = fresh("/d")
        written(fs, "/d/f", b"old", sync=True)
        fs.sync_path("/d")
        fs.write_file("/d/f.tmp", b"new")
        fs.rename("/d/f.tmp", "/d/f")
        image = fs.reboot(Loss.DROP, random.Random(seed), keep_metadata=True)
        outcomes.add(image.read_file("/d/f"))
    assert outcomes == {b"old", b""}


def test_torn_zeros_garbage_and_pages_only_touch_the_unsynced_tail() -> None:
    base = b"A" * 5000
    tail = b"B" * 9000
    for loss in (Loss.TORN, Loss.ZEROS, Loss.GARBAGE, Loss.PAGES):
        shapes = set()
        for seed in range(30):
            fs = fresh("/d")
            fd = written(fs, "/d/f", base, sync=True)
            fs.sync_path("/d")
            fs.pwrite(fd, tail, len(base))
            data = fs.reboot(loss, random.Random(seed)).read_file("/d/f")
            assert data[: len(base)] == base, loss
            rest = data[len(base) :]
            assert len(rest) <= len(tail)
            if loss is Loss.TORN:
                assert tail.startswith(rest)
            elif loss is Loss.ZEROS:
                assert rest.strip(b"\0") == b""
            elif loss is Loss.PAGES:
                assert all(byte in b"B\0" for byte in rest)
            shapes.add(len(rest))
        assert len(shapes) > 1, loss  # random, not always the same cut
    assert PAGE == 4096


def test_a_failed_fsync_loses_its_pages_for_good() -> None:
    fs = fresh("/d")
    fd = written(fs, "/d/f", b"kept", sync=True)
    fs.sync_path("/d")
    fs.pwrite(fd, b"lost", 4)
    fs.fail_syncs[fs.syncs + 1] = errno.EIO
    with pytest.raises(OSError, match="Input/output"):
        fs.sync(fd)
    fs.pwrite(fd, b"later", 8)
    fs.sync(fd)  # succeeds, but the pages of the failed one are not written again
    assert fs.read_file("/d/f") == b"keptlostlater"
    assert fs.reboot(Loss.DROP).read_file("/d/f") == b"kept\0\0\0\0later"


def test_nth_write_and_sync_fail() -> None:
    fs = fresh("/d")
    fd = fs.open("/d/f")
    fs.fail_writes[2] = errno.EIO
    fs.fail_syncs[1] = errno.ENOSPC
    assert fs.pwrite(fd, b"1", 0) == 1
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        fs.pwrite(fd, b"2", 1)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        fs.sync(fd)
    assert fs.pwrite(fd, b"3", 1) == 1


def test_capacity_writes_what_fits_then_enospc() -> None:
    fs = fresh("/d")
    fs.capacity = 10
    fd = fs.open("/d/f")
    assert fs.pwrite(fd, b"x" * 8, 0) == 8
    assert fs.free_bytes("/d") == 2
    assert fs.pwrite(fd, b"y" * 8, 8) == 2  # a short write, as on a real disk
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        fs.pwrite(fd, b"z", 10)
    fs.remove("/d/f")
    assert fs.free_bytes("/d") == 0  # still open: its space is not free yet
    fs.close(fd)
    assert fs.free_bytes("/d") == 10


def test_crash_at_an_operation_freezes_everything() -> None:
    fs = fresh("/d")
    fd = fs.open("/d/f")
    fs.crash_at = fs.ops + 2
    fs.pwrite(fd, b"a", 0)
    with pytest.raises(OSError, match="power loss"):
        fs.sync(fd)
    assert fs.crashed
    with pytest.raises(OSError, match="power loss"):
        fs.read_file("/d/f")
    fs.close(fd)  # letting go still works
    assert not fs.reboot(Loss.DROP).exists("/d/f")
    assert fs.reboot(Loss.KEEP).read_file("/d/f") == b"a"


def test_the_lock_is_exclusive() -> None:
    fs = fresh("/d")
    fd = fs.lock("/d/LOCK")
    with pytest.raises(StorageError, match="in use"):
        fs.lock("/d/LOCK")
    fs.unlock(fd)
    fs.unlock(fs.lock("/d/LOCK"))
