"""Checking a data directory offline, and repairing it: ``msg check DATA_DIR [--fix]``.

Theory of operation
-------------------
:func:`check` takes the data directory's lock (so no broker is using it, and none can
start meanwhile), then reads every log the broker would read -- each queue's and
topic's ``meta.json``, segment files and ``cursors.log`` -- and checks every record
exactly as recovery does (:func:`msg.storage.records.scan`: checksum, then the
fields a replay needs). It reports, with file and offset:

``torn``        bad bytes from some offset to the end of a log's newest file: a write
                cut short by a crash (the broker cuts these off when it starts)
``corrupt``     bad bytes followed by good records, or at the end of an older file:
                a bit flip, a lost sector (the broker skips these)
``unreadable``  a record whose checksum matches but whose content a replay cannot
                use (a bug, or a file written by something else)
``bad meta``    a ``meta.json`` the broker cannot read, of a log that holds
                records (the broker rebuilds a torn one from the directory's name,
                and moves any other to ``lost+found``)
``unfinished``  a log directory without a readable ``meta.json`` and without a
                single record: a creation cut short by a crash (the broker deletes
                these)

With ``fix``, every file with a problem is repaired so that the broker afterwards
starts without a warning, and no good record is lost:

- a file whose only problem is a torn tail is cut at the tail (as the broker does),
  and synced;
- a file with corrupt or unreadable records is first copied, as it is, to
  ``lost+found`` (durably: :func:`msg.storage.lostfound.copy_aside`), then rewritten
  with its good records only: a temporary file, fsync, rename over the original,
  fsync of the directory. A crash at any point leaves either the original or the
  repaired file in place, never neither.

- an unfinished log directory is deleted, and a torn ``meta.json`` rebuilt from the
  directory's name (the torn one kept aside), as the broker would; the rebuilt log's
  files are then checked and repaired in the same pass.

Any other bad ``meta.json`` (a newer format, a hashed name) is only reported.

Nothing here logs: the result is a :class:`CheckReport`, which the CLI prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from msg.errors import StorageError
from msg.storage import records
from msg.storage.filenames import encode_name, segment_number
from msg.storage.fs import FileSystem
from msg.storage.logs import holds_records, rebuild_meta
from msg.storage.lostfound import copy_aside

__all__ = ["CheckReport", "Finding", "Problem", "check"]

_KINDS: Final = (("queue", "queues"), ("topic", "topics"))
_CURSORS: Final = "cursors.log"
_META: Final = "meta.json"
_LOCK: Final = "LOCK"
_TMP: Final = ".tmp"
_QUEUE_OPS: Final = frozenset({"pub", "ack", "con", "req", "dead"})


class Problem(StrEnum):
    """What is wrong at one place in one file."""

    TORN = "torn"
    CORRUPT = "corrupt"
    UNREADABLE = "unreadable"
    BAD_META = "bad meta"
    UNFINISHED = "unfinished"


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem, where it is, and what ``fix`` did about it."""

    path: str
    """Relative to the data directory."""
    offset: int
    length: int
    problem: Problem
    detail: str = ""
    fixed: str | None = None
    """What the repair did; None if nothing (not asked to, or cannot)."""

    def line(self) -> str:
        what = {
            Problem.TORN: "torn write at the end",
            Problem.CORRUPT: "corrupt record",
            Problem.UNREADABLE: "unreadable record",
            Problem.BAD_META: "unreadable meta.json",
            Problem.UNFINISHED: "log directory without meta.json or records",
        }[self.problem]
        text = f"{self.path}: offset {self.offset}: {what} ({self.length} bytes)"
        if self.detail:
            text += f": {self.detail}"
        if self.fixed is not None:
            text += f"; {self.fixed}"
        return text


@dataclass(slots=True)
class CheckReport:
    """What :func:`check` found and did."""

    data_dir: str
    logs: int = 0
    files: int = 0
    records: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No problem found."""
        return not self.findings

    @property
    def unfixed(self) -> list[Finding]:
        return [f for f in self.findings if f.fixed is None]

    def summary(self) -> str:
        counts: dict[Problem, int] = {}
        for finding in self.findings:
            counts[finding.problem] = counts.get(finding.problem, 0) + 1
        found = ", ".join(f"{n} {problem}" for problem, n in counts.items()) or "no problems"
        text = (
            f"checked {self.logs} logs, {self.files} files, {self.records} records "
            f"in {self.data_dir}: {found}"
        )
        if self.findings:
            text += "; all fixed" if not self.unfixed else f"; {len(self.unfixed)} not fixed"
        return text

    def lines(self) -> list[str]:
        return [finding.line() for finding in self.findings] + [self.summary()]


def check(
    data_dir: str | os.PathLike[str], *, fix: bool = False, fs: FileSystem | None = None
) -> CheckReport:
    """Check (and with ``fix``, repair) every log in ``data_dir``; see the module docstring.

    Raises StorageError if the directory is missing or a broker is using it.
    """
    fs = fs if fs is not None else FileSystem()
    root = os.path.abspath(os.fspath(data_dir))
    if not fs.is_dir(root):
        raise StorageError(f"{root} is not a data directory (it does not exist)")
    lock = fs.lock(os.path.join(root, _LOCK))
    try:
        report = CheckReport(root)
        for kind, directory in _log_dirs(fs, root):
            report.logs += 1
            meta = os.path.join(directory, _META)
            problem = _meta_problem(fs, meta, kind, os.path.basename(directory))
            if problem is not None:
                finding = _bad_meta(fs, root, directory, problem, fix)
                report.findings.append(finding)
                if finding.problem is not Problem.BAD_META or finding.fixed is None:
                    continue
                # Rebuilt: its files are checked (and repaired) now, like any log's, so
                # one --fix leaves nothing for the next check to find.
            files = _log_files(fs, directory)
            for k, path in enumerate(files):
                last = k == len(files) - 1
                _check_file(fs, root, path, last, _segment_fields(kind), fix, report)
            cursors = os.path.join(directory, _CURSORS)
            if kind == "topic" and fs.exists(cursors):
                _check_file(fs, root, cursors, True, _cursor_fields, fix, report)
        return report
    finally:
        fs.unlock(lock)


def _log_dirs(fs: FileSystem, root: str) -> Iterator[tuple[str, str]]:
    for kind, sub in _KINDS:
        base = os.path.join(root, sub)
        if not fs.is_dir(base):
            continue
        for entry in sorted(fs.listdir(base)):
            directory = os.path.join(base, entry)
            if fs.is_dir(directory):
                yield kind, directory


def _log_files(fs: FileSystem, directory: str) -> list[str]:
    numbered = sorted(
        (number, name)
        for name in fs.listdir(directory)
        if (number := segment_number(name)) is not None
    )
    return [os.path.join(directory, name) for _, name in numbered]


def _meta_problem(fs: FileSystem, path: str, kind: str, entry: str) -> str | None:
    try:
        found_kind, name = records.parse_meta(fs.read_file(path))
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    except ValueError as exc:
        return str(exc)
    if found_kind != kind:
        return f"kind {found_kind!r} in a {kind} directory"
    if encode_name(name) != entry:
        return f"name {name!r} does not belong in this directory"
    return None


def _bad_meta(fs: FileSystem, root: str, directory: str, problem: str, fix: bool) -> Finding:
    meta = os.path.join(directory, _META)
    if holds_records(fs, directory):
        size = len(fs.read_file(meta)) if fs.exists(meta) else 0
        finding = Finding(os.path.relpath(meta, root), 0, size, Problem.BAD_META, problem)
        if fix and rebuild_meta(fs, root, _kind_of(directory), directory) is not None:
            return _fixed(finding, "rebuilt from the directory's name")
        return finding
    finding = Finding(os.path.relpath(directory, root), 0, 0, Problem.UNFINISHED, problem)
    if not fix:
        return finding
    for name in fs.listdir(directory):
        fs.remove(os.path.join(directory, name))
    fs.remove_dir(directory)
    fs.sync_path(os.path.dirname(directory))
    return _fixed(finding, "deleted")


def _kind_of(directory: str) -> str:
    return "queue" if os.path.basename(os.path.dirname(directory)) == "queues" else "topic"


def _check_file(
    fs: FileSystem,
    root: str,
    path: str,
    last: bool,
    readable: Callable[[dict[str, Any]], str | None],
    fix: bool,
    report: CheckReport,
) -> None:
    data = fs.read_file(path)
    scan = records.scan(data)
    report.files += 1
    relative = os.path.relpath(path, root)
    found: list[Finding] = [
        Finding(relative, offset, length, Problem.CORRUPT) for offset, length in scan.corrupt
    ]
    if scan.torn is not None:
        length = len(data) - scan.torn
        if last:
            found.append(Finding(relative, scan.torn, length, Problem.TORN))
        else:
            found.append(
                Finding(relative, scan.torn, length, Problem.CORRUPT, "at the end of an older file")
            )
    good: list[bytes] = []
    for line, offset in zip(scan.records, scan.offsets, strict=True):
        why = _unreadable(line, readable)
        if why is None:
            good.append(line)
        else:
            found.append(Finding(relative, offset, len(line) + 1, Problem.UNREADABLE, why))
    report.records += len(good)
    if found and fix:
        found = _repair(fs, root, path, data, scan, good, found)
    report.findings += sorted(found, key=lambda f: f.offset)


def _unreadable(line: bytes, readable: Callable[[dict[str, Any]], str | None]) -> str | None:
    try:
        if records.is_pub(line):
            fields, _ = records.parse_pub(line)
        else:
            fields = records.parse(line)
    except (TypeError, ValueError) as exc:
        return f"not JSON: {exc}"
    if not isinstance(fields, dict):
        return "not a JSON object"
    return readable(fields)


def _segment_fields(kind: str) -> Callable[[dict[str, Any]], str | None]:
    def readable(fields: dict[str, Any]) -> str | None:
        op = fields.get("op")
        allowed = _QUEUE_OPS if kind == "queue" else {"pub"}
        if op not in allowed:
            return f"op {op!r} in a {kind} log"
        if not _is_int(fields.get("seq")):
            return "seq is not an integer"
        if op == "pub":
            if not isinstance(fields.get("id"), str):
                return "id is not a string"
            if not _is_number(fields.get("ts")):
                return "ts is not a number"
        if op == "req" and not _is_int(fields.get("att")):
            return "att is not an integer"
        return None

    return readable


def _cursor_fields(fields: dict[str, Any]) -> str | None:
    op = fields.get("op")
    if op not in ("cur", "del"):
        return f"op {op!r} in cursors.log"
    if not isinstance(fields.get("name"), str):
        return "name is not a string"
    if op == "cur":
        if not _is_int(fields.get("pos")):
            return "pos is not an integer"
        try:
            records.parse_cursor(fields)
        except (TypeError, ValueError) as exc:
            return str(exc)
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _repair(
    fs: FileSystem,
    root: str,
    path: str,
    data: bytes,
    scan: records.Scan,
    good: list[bytes],
    found: list[Finding],
) -> list[Finding]:
    """Repair one file (see the module docstring); the findings, with what was done."""
    if all(f.problem is Problem.TORN for f in found):
        assert scan.torn is not None
        fd = fs.open(path)
        try:
            fs.truncate(fd, scan.torn)
            fs.sync(fd)
        finally:
            fs.close(fd)
        return [_fixed(f, "cut off") for f in found]
    kept = copy_aside(fs, root, path, data)
    repaired = b"".join(line + b"\n" for line in good)
    fs.write_file(path + _TMP, repaired)
    fs.sync_path(path + _TMP)
    fs.rename(path + _TMP, path)
    fs.sync_path(os.path.dirname(path))
    where = os.path.relpath(kept, root)
    return [
        _fixed(f, "cut off" if f.problem is Problem.TORN else f"quarantined (original in {where})")
        for f in found
    ]


def _fixed(finding: Finding, how: str) -> Finding:
    return Finding(
        finding.path, finding.offset, finding.length, finding.problem, finding.detail, how
    )
