"""Keeping damaged files aside, in ``lost+found``, before anything rewrites them.

Theory of operation
-------------------
A log file with a corrupt record is never rewritten or deleted in place: the bytes
that failed their checksum are the only evidence of what happened (a bad sector, a
bug, a misdirected write), and an operator may be able to salvage the record by
hand. Whatever would destroy them first keeps the file aside, under the data
directory's ``lost+found/``, at the same relative path (``queues/jobs/0...0.log``
becomes ``lost+found/queues/jobs/0...0.log``, then ``.1``, ``.2`` if that is taken):

- the broker, when compaction or retention deletes a segment that had corrupt
  records, moves it there instead (:func:`move_aside`: a rename, no copy);
- the broker, when it cuts a torn tail off a file that also has corrupt records, and
  when it rewrites a ``cursors.log`` that had, copies it there first
  (:func:`copy_aside`);
- ``msg check --fix`` copies every file it repairs.

A copy is made durable (file, then every directory entry on the way) before the
original is touched, so a crash in between leaves the original intact. A move is a
rename: the caller makes both directories durable, in its own time.
"""

from __future__ import annotations

import os
from typing import Final

from msg.storage.fs import FileSystem

__all__ = ["LOST_FOUND", "aside_path", "copy_aside", "move_aside"]

LOST_FOUND: Final = "lost+found"


def aside_path(fs: FileSystem, root: str, path: str) -> str:
    """A free name under ``root/lost+found`` for ``path`` (a file under ``root``)."""
    target = os.path.join(root, LOST_FOUND, os.path.relpath(path, root))
    candidate = target
    suffix = 0
    while fs.exists(candidate):
        suffix += 1
        candidate = f"{target}.{suffix}"
    return candidate


def _make_dirs(fs: FileSystem, path: str) -> list[str]:
    """Create directory ``path`` and missing parents; return the directories whose
    entries changed (to be fsynced)."""
    missing: list[str] = []
    at = path
    while not fs.exists(at):
        missing.append(at)
        at = os.path.dirname(at)
    if missing:
        fs.makedirs(path)
    return [os.path.dirname(created) for created in reversed(missing)]


def copy_aside(fs: FileSystem, root: str, path: str, data: bytes | None = None) -> str:
    """Copy ``path`` (or ``data``, its contents already read) into lost+found, durably;
    return the copy's path (an earlier copy with the same bytes, if there is one).

    Blocks on fsyncs: call it from the storage thread or an offline tool.
    """
    data = fs.read_file(path) if data is None else data
    # A start-up interrupted after its copy copies again: the same bytes are kept once
    # (and made durable again, in case the interruption came before that).
    kept = os.path.join(root, LOST_FOUND, os.path.relpath(path, root))
    target, suffix = kept, 0
    while fs.exists(target) and fs.read_file(target) != data:
        suffix += 1
        target = f"{kept}.{suffix}"
    if not fs.exists(target):
        _make_dirs(fs, os.path.dirname(target))
        fs.write_file(target, data)
    fs.sync_path(target)
    at = os.path.dirname(target)
    while at != root and at != os.path.dirname(at):
        fs.sync_path(at)  # lost+found and below: each holds the entry of the next
        at = os.path.dirname(at)
    fs.sync_path(root)
    return target


def move_aside(fs: FileSystem, root: str, path: str) -> tuple[str, list[str]]:
    """Rename ``path`` into lost+found.

    Returns the new path and the directories whose entries changed: the caller fsyncs
    them (the file store hands them to its group commit).
    """
    target = aside_path(fs, root, path)
    changed = _make_dirs(fs, os.path.dirname(target))
    fs.rename(path, target)
    return target, [*changed, os.path.dirname(path), os.path.dirname(target)]
