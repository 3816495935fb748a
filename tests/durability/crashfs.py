"""A file system in memory with a page cache that a test can pull the plug on.

Theory of operation
-------------------
:class:`CrashFS` implements the file store's one file-system seam
(:class:`msg.storage.fs.FileSystem`) in memory, modelling what a POSIX system promises
about durability and nothing more, the way SQLite's crash-test VFS and Jepsen's LazyFS
do:

- Every file has two contents: what processes see (the page cache) and what is on
  the disk. ``pwrite`` and ``truncate`` change only the first; ``sync`` (fsync) copies
  it to the second. Each file remembers the lowest offset changed since its last sync
  (``dirty_from``): everything below it is the same in both.
- Every directory has two entry tables in the same way. Creating, renaming and
  removing change what processes see; only an fsync of *the directory* makes its
  entries durable. An fsync of a file does not make its name durable.
- Metadata changes not yet made durable are also kept in order in one journal, so a
  crash can keep a prefix of them (what an ordered-metadata journal such as ext4's
  may have committed on its own) -- which exposes a rename that reached the disk
  before the data of the file it names.

:meth:`CrashFS.crash` (or the ``crash_at``-th operation: every write, truncate, sync,
create, rename and remove is counted in ``ops``) freezes the file system: from then on
every call fails with EIO, as on a machine that lost power, so nothing can be
acknowledged afterwards. :meth:`CrashFS.reboot` then builds what a restart would find,
as a fresh, fully durable CrashFS, under a :class:`Loss` mode:

``KEEP``     the page cache survives: a process crash (``kill -9``), not a power loss
``DROP``     every byte and every directory entry not yet fsynced is gone
``TORN``     a random prefix of each file's unsynced tail survived
``ZEROS``    the file size reached the disk but the data did not: the tail is zeros
``GARBAGE``  the tail is random bytes (a torn sector, a misdirected write)
``PAGES``    each unsynced 4 KiB page independently did or did not reach the disk

and with ``keep_metadata`` a random prefix of the unsynced metadata journal.

Faults without a crash: ``capacity`` bounds the bytes all files may hold (a write
that does not fit writes what fits, the next raises ENOSPC, as on a real full disk),
and ``fail_writes`` / ``fail_syncs`` map the Nth write or sync (1-based, counted in
``writes`` and ``syncs``) to an errno it fails with. A failed sync behaves as Linux
does: the dirty pages are marked clean without reaching the disk, so a later sync that
succeeds does not bring them back ("fsyncgate").

All methods take one lock: the file store calls them from the event loop thread and
from its sync thread.
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import threading
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Final

from msg.errors import StorageError
from msg.storage.fs import FileSystem

__all__ = ["CrashFS", "Loss"]

PAGE: Final = 4096
# What free_bytes reports when no capacity is set: more than any test writes.
_UNLIMITED: Final = 1 << 50


class Loss(StrEnum):
    """What a crash does to data that was written but not synced."""

    KEEP = "keep"
    DROP = "drop"
    TORN = "torn"
    ZEROS = "zeros"
    GARBAGE = "garbage"
    PAGES = "pages"


POWER_LOSSES: Final = (Loss.DROP, Loss.TORN, Loss.ZEROS, Loss.GARBAGE, Loss.PAGES)


class _File:
    __slots__ = ("data", "dirty_from", "durable", "links", "opens")

    def __init__(self, data: bytes = b"", durable: bytes = b"") -> None:
        self.data = bytearray(data)
        self.durable = durable
        self.dirty_from: int | None = None if data == durable else 0
        self.links = 0
        self.opens = 0

    def touched(self, offset: int) -> None:
        if self.dirty_from is None or offset < self.dirty_from:
            self.dirty_from = offset

    def synced(self) -> None:
        start = self.dirty_from
        if start is None:
            return
        # Only what changed since the last sync goes out: bytes a failed sync dropped
        # stay lost (zeros where the disk never got them).
        self.durable = self.durable[:start].ljust(start, b"\0") + bytes(self.data[start:])
        self.dirty_from = None


class _Dir:
    __slots__ = ("durable", "entries")

    def __init__(self) -> None:
        self.entries: dict[str, _Node] = {}
        self.durable: dict[str, _Node] = {}


_Node = _File | _Dir
# One metadata operation: the entry changes it made, applied together by a crash.
_Change = tuple[_Dir, str, _Node | None]


class CrashFS(FileSystem):
    """An in-memory :class:`FileSystem` that can crash; see the module docstring."""

    def __init__(self, *, capacity: int | None = None) -> None:
        self.capacity = capacity
        """Bytes all files together may hold; None: unlimited."""
        self.crash_at: int | None = None
        """Crash just before operation number ``crash_at`` (see ``ops``)."""
        self.on_crash: Callable[[], None] | None = None
        """Called (under the lock, on whichever thread) at the moment of the crash."""
        self.fail_writes: dict[int, int] = {}
        """Write number -> errno that write fails with (writes counted from 1)."""
        self.fail_syncs: dict[int, int] = {}
        """Sync number -> errno that sync fails with (syncs counted from 1)."""
        self.ops = 0
        self.writes = 0
        self.syncs = 0
        self.enospc = 0
        """How many writes failed for want of space."""
        self.crashed = False
        self._lock = threading.RLock()
        self._root = _Dir()
        self._journal: list[list[_Change]] = []
        self._fds: dict[int, _File] = {}
        self._next_fd = 3
        self._locked: dict[int, _File] = {}
        self._used = 0

    # -- bookkeeping -----------------------------------------------------------------

    def _op(self, counted: bool = True) -> None:
        """Enter an operation: fail if crashed, crash if this is the one."""
        if self.crashed:
            raise OSError(errno.EIO, "simulated power loss: the machine is down")
        if counted:
            self.ops += 1
            if self.crash_at is not None and self.ops >= self.crash_at:
                self._crash()
                raise OSError(errno.EIO, "simulated power loss: the machine is down")

    def _crash(self) -> None:
        self.crashed = True
        if self.on_crash is not None:
            self.on_crash()

    def crash(self) -> None:
        """Pull the plug now (if the crash point was not reached already)."""
        with self._lock:
            if not self.crashed:
                self._crash()

    def _resize(self, file: _File, length: int) -> None:
        old = len(file.data)
        if length < old:
            del file.data[length:]
        else:
            file.data.extend(bytes(length - old))
        if file.links or file.opens:
            self._used += length - old

    def _release(self, file: _File) -> None:
        """``file`` lost a name or a descriptor; free its space if it has neither."""
        if not file.links and not file.opens:
            self._used -= len(file.data)

    def _room(self, growth: int) -> int:
        if self.capacity is None:
            return growth
        return max(0, min(growth, self.capacity - self._used))

    def _walk(self, path: str) -> _Node | None:
        node: _Node = self._root
        for part in _parts(path):
            if not isinstance(node, _Dir):
                return None
            found = node.entries.get(part)
            if found is None:
                return None
            node = found
        return node

    def _parent(self, path: str) -> tuple[_Dir, str]:
        parts = _parts(path)
        if not parts:
            raise OSError(errno.EBUSY, "cannot change the root", path)
        parent = self._walk("/" + "/".join(parts[:-1]))
        if parent is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if not isinstance(parent, _Dir):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        return parent, parts[-1]

    def _file(self, path: str) -> _File:
        node = self._walk(path)
        if node is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if not isinstance(node, _File):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        return node

    def _fd(self, fd: int) -> _File:
        file = self._fds.get(fd)
        if file is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return file

    def _set_entries(self, changes: list[_Change]) -> None:
        """Change directory entries (one metadata operation) and journal the change."""
        for directory, name, node in changes:
            old = directory.entries.get(name)
            if node is None:
                directory.entries.pop(name, None)
            else:
                directory.entries[name] = node
                if isinstance(node, _File):
                    node.links += 1
            if isinstance(old, _File):
                old.links -= 1
                self._release(old)
        self._journal.append(changes)

    def _create(self, path: str) -> _File:
        directory, name = self._parent(path)
        file = _File()
        self._set_entries([(directory, name, file)])
        return file

    def _new_fd(self, file: _File) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = file
        file.opens += 1
        return fd

    # -- the seam ----------------------------------------------------------------------

    def open(self, path: str) -> int:
        with self._lock:
            node = self._walk(path)
            self._op(counted=node is None)
            if node is None:
                node = self._create(path)
            elif not isinstance(node, _File):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            return self._new_fd(node)

    def close(self, fd: int) -> None:
        # Works even after a crash, so the crashed store can let go of its files.
        with self._lock:
            file = self._fds.pop(fd, None)
            self._locked.pop(fd, None)
            if file is not None:
                file.opens -= 1
                self._release(file)

    def size(self, fd: int) -> int:
        with self._lock:
            self._op(counted=False)
            return len(self._fd(fd).data)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        with self._lock:
            self._op()
            file = self._fd(fd)
            self.writes += 1
            failing = self.fail_writes.get(self.writes)
            if failing is not None:
                raise OSError(failing, os.strerror(failing))
            end = offset + len(data)
            growth = max(0, end - len(file.data))
            room = self._room(growth)
            if room < growth:
                # What fits is written; the next write finds no room at all.
                count = len(data) - (growth - room)
                if count <= 0:
                    self.enospc += 1
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                data = data[:count]
                end = offset + count
            old = len(file.data)
            if end > old:
                self._resize(file, end)
            # A hole before offset reads as zeros both in the cache and on the disk.
            file.touched(min(offset, old))
            file.data[offset:end] = data
            return len(data)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        with self._lock:
            self._op(counted=False)
            return bytes(self._fd(fd).data[offset : offset + size])

    def truncate(self, fd: int, length: int) -> None:
        with self._lock:
            self._op()
            file = self._fd(fd)
            if length > len(file.data) and self._room(length - len(file.data)) < length - len(
                file.data
            ):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            old = len(file.data)
            self._resize(file, length)
            file.touched(min(length, old))

    def sync(self, fd: int) -> None:
        with self._lock:
            self._op()
            self._sync_file(self._fd(fd))

    def _sync_file(self, file: _File) -> None:
        self.syncs += 1
        failing = self.fail_syncs.get(self.syncs)
        if failing is not None:
            # Linux marks the pages clean although they never reached the disk.
            file.dirty_from = None
            raise OSError(failing, os.strerror(failing))
        file.synced()

    def sync_path(self, path: str) -> None:
        with self._lock:
            self._op()
            node = self._walk(path)
            if node is None:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            if isinstance(node, _File):
                self._sync_file(node)
                return
            self.syncs += 1
            failing = self.fail_syncs.get(self.syncs)
            if failing is not None:
                raise OSError(failing, os.strerror(failing))
            node.durable = dict(node.entries)
            # Those changes are on the disk now; a crash need not choose about them.
            journal = []
            for changes in self._journal:
                rest = [change for change in changes if change[0] is not node]
                if rest:
                    journal.append(rest)
            self._journal = journal

    def read_file(self, path: str) -> bytes:
        with self._lock:
            self._op(counted=False)
            return bytes(self._file(path).data)

    def write_file(self, path: str, data: bytes) -> None:
        with self._lock:
            self._op()
            self.writes += 1
            failing = self.fail_writes.get(self.writes)
            if failing is not None:
                raise OSError(failing, os.strerror(failing))
            node = self._walk(path)
            if node is not None and not isinstance(node, _File):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            old = len(node.data) if node is not None else 0
            if self._room(max(0, len(data) - old)) < len(data) - old:
                self.enospc += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            file = node if node is not None else self._create(path)
            self._resize(file, len(data))
            file.data[:] = data
            file.touched(0)

    def rename(self, source: str, target: str) -> None:
        with self._lock:
            self._op()
            node = self._walk(source)
            if node is None:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), source)
            from_dir, from_name = self._parent(source)
            to_dir, to_name = self._parent(target)
            existing = to_dir.entries.get(to_name)
            if existing is node:
                return
            if isinstance(existing, _Dir) and (not isinstance(node, _Dir) or existing.entries):
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), target)
            if isinstance(node, _Dir) and isinstance(existing, _File):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), target)
            # One journal entry: a rename is atomic, even to a journal that keeps half.
            self._set_entries([(to_dir, to_name, node), (from_dir, from_name, None)])

    def remove(self, path: str) -> None:
        with self._lock:
            self._op()
            self._file(path)
            directory, name = self._parent(path)
            self._set_entries([(directory, name, None)])

    def makedirs(self, path: str) -> None:
        with self._lock:
            node: _Node = self._root
            for part in _parts(path):
                assert isinstance(node, _Dir)
                found = node.entries.get(part)
                if found is None:
                    self._op()
                    found = _Dir()
                    self._set_entries([(node, part, found)])
                elif not isinstance(found, _Dir):
                    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), path)
                node = found

    def remove_dir(self, path: str) -> None:
        with self._lock:
            self._op()
            node = self._walk(path)
            if not isinstance(node, _Dir):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            if node.entries:
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), path)
            directory, name = self._parent(path)
            self._set_entries([(directory, name, None)])

    def is_empty(self, path: str) -> bool:
        with self._lock:
            self._op(counted=False)
            node = self._walk(path)
            return isinstance(node, _File) and not node.data

    def listdir(self, path: str) -> list[str]:
        with self._lock:
            self._op(counted=False)
            node = self._walk(path)
            if node is None:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            if not isinstance(node, _Dir):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            return list(node.entries)

    def is_dir(self, path: str) -> bool:
        with self._lock:
            self._op(counted=False)
            return isinstance(self._walk(path), _Dir)

    def exists(self, path: str) -> bool:
        with self._lock:
            self._op(counted=False)
            return self._walk(path) is not None

    def free_bytes(self, path: str) -> int:
        with self._lock:
            self._op(counted=False)
            if self._walk(path) is None:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            if self.capacity is None:
                return _UNLIMITED
            return max(0, self.capacity - self._used)

    def lock(self, path: str) -> int:
        with self._lock:
            fd = self.open(path)
            file = self._fds[fd]
            if any(held is file for held in self._locked.values()):
                self.close(fd)
                raise StorageError(f"data directory is in use: another broker holds {path}")
            self._locked[fd] = file
            return fd

    def unlock(self, fd: int) -> None:
        self.close(fd)

    # -- for tests ---------------------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes held by all files (names or open descriptors)."""
        return self._used

    def writeback(self) -> None:
        """What the kernel's flusher does on its own: make everything durable."""
        with self._lock:
            self._op(counted=False)
            for file in self._all_files():
                file.synced()
            for directory in self._all_dirs(self._root):
                directory.durable = dict(directory.entries)
            self._journal = []

    def _all_files(self) -> Iterator[_File]:
        seen: set[int] = set()
        for file in [*self._fds.values(), *_files_under(self._root)]:
            if id(file) not in seen:
                seen.add(id(file))
                yield file

    def _all_dirs(self, directory: _Dir) -> Iterator[_Dir]:
        yield directory
        for node in directory.entries.values():
            if isinstance(node, _Dir):
                yield from self._all_dirs(node)

    def tree(self) -> dict[str, bytes]:
        """Every file path and its contents as processes see them (debugging, asserts)."""
        with self._lock:
            out: dict[str, bytes] = {}
            _flatten(self._root, "", out)
            return out

    def clone(self) -> CrashFS:
        """A fully durable copy of what processes see now; this one goes on unchanged."""
        with self._lock:
            tables = {id(d): dict(d.entries) for d in self._all_dirs(self._root)}
            image = CrashFS(capacity=self.capacity)
            image._root = self._rebuild(self._root, tables, {}, Loss.KEEP, random.Random(0), image)
            return image

    def reboot(
        self, loss: Loss, rng: random.Random | None = None, *, keep_metadata: bool = False
    ) -> CrashFS:
        """What a restart finds after the crash, as a new, fully durable CrashFS.

        Crashes first if that has not happened. ``rng`` chooses what survives (torn
        lengths, pages, garbage, the journal prefix); the same seed gives the same image.
        """
        self.crash()
        rng = rng if rng is not None else random.Random(0)
        with self._lock:
            if loss is Loss.KEEP:
                tables = {id(d): dict(d.entries) for d in self._all_dirs(self._root)}
            else:
                tables = self._durable_tables(rng if keep_metadata else None)
            image = CrashFS(capacity=self.capacity)
            contents: dict[int, _Node] = {}
            image._root = self._rebuild(self._root, tables, contents, loss, rng, image)
            return image

    def _durable_tables(self, rng: random.Random | None) -> dict[int, dict[str, _Node]]:
        """Every directory's durable entries, plus a random prefix of the journal."""
        tables: dict[int, dict[str, _Node]] = {}
        pending: list[_Dir] = [self._root]
        known: dict[int, _Dir] = {}
        # Every directory that ever was an entry, durable or not, may matter.
        while pending:
            directory = pending.pop()
            if id(directory) in known:
                continue
            known[id(directory)] = directory
            tables[id(directory)] = dict(directory.durable)
            for node in [*directory.entries.values(), *directory.durable.values()]:
                if isinstance(node, _Dir):
                    pending.append(node)
        for changes in self._journal:
            for directory, _, target in changes:
                if id(directory) not in tables:
                    tables[id(directory)] = dict(directory.durable)
                if isinstance(target, _Dir) and id(target) not in tables:
                    tables[id(target)] = dict(target.durable)
        kept = 0 if rng is None else rng.randint(0, len(self._journal))
        for changes in self._journal[:kept]:
            for directory, name, target in changes:
                table = tables[id(directory)]
                if target is None:
                    table.pop(name, None)
                else:
                    table[name] = target
        return tables

    def _rebuild(
        self,
        directory: _Dir,
        tables: dict[int, dict[str, _Node]],
        made: dict[int, _Node],
        loss: Loss,
        rng: random.Random,
        image: CrashFS,
    ) -> _Dir:
        fresh = _Dir()
        made[id(directory)] = fresh
        for name, node in sorted(tables.get(id(directory), {}).items()):
            copy = made.get(id(node))
            if copy is None:
                if isinstance(node, _Dir):
                    copy = self._rebuild(node, tables, made, loss, rng, image)
                else:
                    data = _survivor(node, loss, rng)
                    copy = made[id(node)] = _File(data, data)
                    image._used += len(data)
            fresh.entries[name] = copy
            if isinstance(copy, _File):
                copy.links += 1
        fresh.durable = dict(fresh.entries)
        return fresh


def _survivor(file: _File, loss: Loss, rng: random.Random) -> bytes:
    """The bytes of ``file`` a restart finds, under ``loss``."""
    data = file.data
    start = file.dirty_from
    if loss is Loss.KEEP:
        return bytes(data)
    if start is None or loss is Loss.DROP:
        return file.durable
    base = file.durable[:start].ljust(start, b"\0")
    tail = len(data) - start
    if loss is Loss.TORN:
        kept = rng.randint(0, tail)
        if kept == 0:
            # Nothing of the tail got out; a truncate may or may not have.
            return file.durable if tail or rng.random() < 0.5 else bytes(data)
        return base + bytes(data[start : start + kept])
    if tail == 0:
        return file.durable
    if loss is Loss.ZEROS:
        return base + bytes(rng.randint(1, tail))
    if loss is Loss.GARBAGE:
        return base + rng.randbytes(rng.randint(1, tail))
    # PAGES: the size may or may not have reached the disk, and each dirty page
    # independently did or did not.
    length = rng.choice((len(file.durable), len(data)))
    out = bytearray(file.durable[:length].ljust(length, b"\0"))
    page = start - start % PAGE
    while page < min(len(data), length):
        if rng.random() < 0.5:
            low, high = max(page, start), min(page + PAGE, len(data), length)
            out[low:high] = data[low:high]
        page += PAGE
    return bytes(out)


def _parts(path: str) -> list[str]:
    normal = posixpath.normpath("/" + path.replace(os.sep, "/"))
    return [part for part in normal.split("/") if part]


def _files_under(directory: _Dir) -> Iterator[_File]:
    for node in directory.entries.values():
        if isinstance(node, _File):
            yield node
        else:
            yield from _files_under(node)


def _flatten(directory: _Dir, prefix: str, out: dict[str, bytes]) -> None:
    for name, node in directory.entries.items():
        path = f"{prefix}/{name}"
        if isinstance(node, _File):
            out[path] = bytes(node.data)
        else:
            _flatten(node, path, out)
