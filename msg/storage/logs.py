"""The logs of queues and topics on disk, and rebuilding the index from them.

Theory of operation
-------------------
A :class:`Log` is the ordered list of segment files of one queue or topic; the last
one is written (through the store's file cache: recovery leaves every file closed).
:func:`recover_queue` and :func:`recover_topic` run once, at start-up, on the
storage thread: they read every segment, check every record
(:func:`msg.storage.records.scan`), and replay the good ones. An intact segment's
records are decoded with one JSON decode (:func:`msg.storage.records.parse_all`);
one that has a record that does not decode is parsed line by line, so only that
record is lost.

Replaying a queue keeps one message per sequence number: a ``pub`` creates it (a
later ``pub`` of the same number is a compaction copy and replaces it), ``ack``,
``con`` and ``dead`` remove it, ``req`` sets its attempt count. Records about numbers
never seen are normal (their segment was deleted) and ignored. What is left is
ready, in sequence order, and goes into the index as columnar runs (one per stretch
of messages in the same segment), so a recovered backlog is not one object per
message. Replaying a topic rebuilds only counts, timestamps and the sparse index;
payloads stay on disk.

A bad tail of the newest file of a log is a write torn by a crash: it is cut off with
one WARNING naming file and offset. Any other bad region is corruption: it is skipped
with one ERROR line, and the records around it are kept. A file with corrupt records
is marked (``Segment.corrupt``), so that nothing later deletes or rewrites it without
keeping it in ``lost+found`` (:mod:`.lostfound`); cutting a torn tail off such a file
copies it there first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Final

from msg.storage import records
from msg.storage.filenames import decode_name, segment_file_name, segment_number
from msg.storage.files import LogFile, OpenFiles
from msg.storage.fs import FileSystem
from msg.storage.index import DEDUP_WINDOW, QueueIndex, Run, TopicIndex
from msg.storage.lostfound import copy_aside
from msg.storage.segments import Segment

__all__ = [
    "CURSORS",
    "META",
    "Counts",
    "Log",
    "QueueLog",
    "TopicLog",
    "holds_records",
    "rebuild_meta",
    "recover_queue",
    "recover_topic",
]

logger = logging.getLogger(__name__)

CURSORS: Final = "cursors.log"
META: Final = "meta.json"


class Log:
    """The segments of one queue or topic; the last one is open for writing."""

    __slots__ = ("by_number", "dir", "name", "numbers", "segments")

    def __init__(self, name: str, directory: str, segments: list[Segment]) -> None:
        self.name = name
        self.dir = directory
        self.segments = segments
        self.numbers = [segment.number for segment in segments]
        self.by_number = {segment.number: segment for segment in segments}

    @property
    def active(self) -> Segment:
        return self.segments[-1]

    def add(self, segment: Segment) -> None:
        self.segments.append(segment)
        self.numbers.append(segment.number)
        self.by_number[segment.number] = segment

    def drop_oldest(self) -> Segment:
        segment = self.segments.pop(0)
        self.numbers.pop(0)
        del self.by_number[segment.number]
        return segment


class QueueLog(Log):
    __slots__ = ("index",)

    def __init__(
        self, name: str, directory: str, segments: list[Segment], index: QueueIndex
    ) -> None:
        super().__init__(name, directory, segments)
        self.index = index


class TopicLog(Log):
    __slots__ = (
        "bytes",
        "count",
        "cursor_live_bytes",
        "cursor_records",
        "cursor_version",
        "cursors",
        "cursors_corrupt",
        "index",
    )

    def __init__(
        self, name: str, directory: str, segments: list[Segment], index: TopicIndex
    ) -> None:
        super().__init__(name, directory, segments)
        self.index = index
        self.count = sum(segment.count for segment in segments)
        """Messages in all segments, pending ones included."""
        self.bytes = sum(segment.bytes for segment in segments)
        self.cursors: LogFile | None = None
        self.cursor_records = 0
        self.cursor_live_bytes = 0
        """Size of cursors.log right after its last rewrite (0: not rewritten yet)."""
        self.cursor_version = 0
        self.cursors_corrupt = False
        """cursors.log has a corrupt record: keep a copy before rewriting it."""


@dataclass(slots=True)
class Counts:
    torn: int = 0
    corrupt: int = 0


def _segment_numbers(fs: FileSystem, directory: str) -> list[int]:
    numbers = [segment_number(n) for n in fs.listdir(directory)]
    return sorted(n for n in numbers if n is not None)


def _load(
    fs: FileSystem, root: str, path: str, last: bool, counts: Counts
) -> tuple[records.Scan, int]:
    """Read and check one log file; cut a torn tail off the last one of a log.

    Returns the scan and the length of the good data. No descriptor stays open: the
    file cache opens the active file when it is first written (a store with 100,000
    logs must start without 100,000 descriptors).
    """
    data = fs.read_file(path)
    scan = records.scan(data)
    for offset, length in scan.corrupt:
        counts.corrupt += 1
        logger.error("corrupt record in %s at offset %d (%d bytes) skipped", path, offset, length)
    size = len(data)
    if scan.torn is not None:
        if last:
            counts.torn += 1
            logger.warning(
                "torn write at the end of %s at offset %d (%d bytes) cut off",
                path,
                scan.torn,
                len(data) - scan.torn,
            )
            if scan.corrupt:
                # Cutting is a rewrite: the corrupt records' file goes aside first.
                kept = copy_aside(fs, root, path, data)
                logger.warning("kept the original of %s as %s", path, kept)
            fd = fs.open(path)
            try:
                fs.truncate(fd, scan.torn)
            finally:
                fs.close(fd)
            size = scan.torn
        else:
            counts.corrupt += 1
            logger.error(
                "corrupt record at the end of %s at offset %d (%d bytes) skipped",
                path,
                scan.torn,
                len(data) - scan.torn,
            )
    return scan, size


def holds_records(fs: FileSystem, directory: str) -> bool:
    """True if a segment or cursors.log of log ``directory`` has a byte in it."""
    return any(
        not fs.is_empty(os.path.join(directory, name))
        for name in fs.listdir(directory)
        if name == CURSORS or segment_number(name) is not None
    )


def rebuild_meta(fs: FileSystem, root: str, kind: str, directory: str) -> str | None:
    """Rewrite a torn or missing ``meta.json`` from the directory's name, durably;
    return the log's name, or None if it cannot be rebuilt (a hashed name, or a
    readable meta.json that says something else: that one is left alone).

    A crash during a log's creation can leave its meta.json torn while records after
    it survive (a journal may commit the rename before the data). The records are
    fine and the name is in the directory's name, so nothing needs to go to
    lost+found. The torn file is kept there first (see :mod:`.lostfound`).
    """
    name = decode_name(os.path.basename(directory))
    if name is None:
        return None
    path = os.path.join(directory, META)
    if fs.exists(path):
        data = fs.read_file(path)
        if not records.is_torn_meta(data):
            return None
        if data:
            copy_aside(fs, root, path, data)
    fs.write_file(path + ".tmp", records.meta_bytes(kind, name))
    fs.sync_path(path + ".tmp")
    fs.rename(path + ".tmp", path)
    fs.sync_path(directory)
    return name


def _first_segment(fs: FileSystem, files: OpenFiles, directory: str) -> list[Segment]:
    """A log without segments (a crash cut its creation short) gets its first one, made
    durable in its directory now: writes to it will be acked."""
    path = os.path.join(directory, segment_file_name(0))
    fs.close(fs.open(path))
    fs.sync_path(directory)
    return [Segment(0, path, file=LogFile(files, path, 0))]


def recover_queue(
    fs: FileSystem,
    files: OpenFiles,
    root: str,
    name: str,
    directory: str,
    queue: QueueIndex,
    counts: Counts,
) -> QueueLog:
    """Replay a queue's segments into ``queue``; the newest is the one to append to."""
    numbers = _segment_numbers(fs, directory)
    if not numbers:
        return QueueLog(name, directory, _first_segment(fs, files, directory), queue)
    # seq -> (fields of its pub record, payload, segment number)
    by_seq: dict[int, tuple[dict[str, Any], bytes, int]] = {}
    segments: list[Segment] = []
    by_number: dict[int, Segment] = {}
    max_seq = -1
    for k, number in enumerate(numbers):
        path = os.path.join(directory, segment_file_name(number))
        corrupt_before = counts.corrupt
        last = k == len(numbers) - 1
        scan, size = _load(fs, root, path, last, counts)
        file = LogFile(files, path, size) if last else None
        segment = Segment(number, path, size=size, file=file)
        segments.append(segment)
        by_number[number] = segment
        ids: list[str] = []
        seqs: list[int] = []
        for offset, _, fields, payload in _parsed(scan, path, counts):
            try:
                op = fields["op"]
                seq = fields["seq"]
                if op == "pub":
                    message_id = fields["id"]
                    if not isinstance(message_id, str) or not isinstance(seq, int):
                        raise TypeError("id must be a string and seq an integer")
                    old = by_seq.get(seq)
                    if old is not None:  # a compaction copy replaces the original
                        by_number[old[2]].live -= 1
                    by_seq[seq] = (fields, payload, number)
                    ids.append(message_id)
                    seqs.append(seq)
                elif op == "req":
                    found = by_seq.get(seq)
                    if found is not None:
                        found[0]["att"] = fields["att"]
                elif op in ("ack", "con", "dead"):
                    found = by_seq.pop(seq, None)
                    if found is not None:
                        by_number[found[2]].live -= 1
                else:
                    raise ValueError(f"unknown op {op!r}")
            except (KeyError, TypeError, ValueError) as exc:
                counts.corrupt += 1
                logger.error("unreadable record in %s at offset %d skipped: %s", path, offset, exc)
                continue
            if seq > max_seq:
                max_seq = seq
        segment.corrupt = counts.corrupt > corrupt_before
        # Every pub record counts (a compaction copy took its original's live count
        # away above).
        segment.live += len(ids)
        segment.pubs += len(ids)
        # Only the newest ids can matter to the window; older ones would be dropped.
        window = 2 * DEDUP_WINDOW
        queue.recent.add_many(ids[-window:], seqs[-window:])
    queue.restore(_runs(by_seq))
    queue.next_seq = max(max_seq + 1, numbers[-1])
    return QueueLog(name, directory, segments, queue)


def _parsed(
    scan: records.Scan, path: str, counts: Counts
) -> Iterator[tuple[int, bytes, dict[str, Any], bytes]]:
    """(offset, line, fields, payload) of each good record; unreadable ones are skipped

    One JSON decode for the whole segment when every record decodes; else line by line.
    """
    parsed = records.parse_all(scan.records)
    if parsed is not None:
        yield from zip(scan.offsets, scan.records, *parsed, strict=True)
        return
    for line, offset in zip(scan.records, scan.offsets, strict=True):
        try:
            if records.is_pub(line):
                fields, payload = records.parse_pub(line)
            else:
                fields, payload = records.parse(line), b""
            if not isinstance(fields, dict):
                raise TypeError("not a JSON object")
        except (TypeError, ValueError) as exc:
            counts.corrupt += 1
            logger.error("unreadable record in %s at offset %d skipped: %s", path, offset, exc)
            continue
        yield offset, line, fields, payload


def _runs(by_seq: dict[int, tuple[dict[str, Any], bytes, int]]) -> list[Run]:
    """The replayed messages as runs in sequence order, one per stretch in one segment."""
    out: list[Run] = []
    seqs = sorted(by_seq)  # already sorted but for compaction copies: linear then
    start = 0
    while start < len(seqs):
        number = by_seq[seqs[start]][2]
        stop = start + 1
        while stop < len(seqs) and by_seq[seqs[stop]][2] == number:
            stop += 1
        part = tuple(seqs[start:stop])
        messages = list(map(by_seq.__getitem__, part))
        fields = list(map(_FIELDS, messages))
        attempts = tuple(field.get("att", 0) for field in fields)
        reasons = tuple(field.get("why") for field in fields)
        out.append(
            Run(
                part,
                tuple(map(_ID, fields)),
                tuple(map(_PAYLOAD, messages)),
                tuple(map(_TS, fields)),
                number,
                attempts if any(attempts) else None,
                reasons if any(r is not None for r in reasons) else None,
            )
        )
        start = stop
    return out


_FIELDS: Final = itemgetter(0)
_PAYLOAD: Final = itemgetter(1)
_ID: Final = itemgetter("id")
_TS: Final = itemgetter("ts")


def recover_topic(
    fs: FileSystem,
    files: OpenFiles,
    root: str,
    name: str,
    directory: str,
    topic: TopicIndex,
    counts: Counts,
) -> TopicLog:
    """Scan a topic's segments and cursors into ``topic``; payloads stay on disk."""
    numbers = _segment_numbers(fs, directory)
    segments: list[Segment] = []
    last_position = -1
    recent = topic.recent
    for k, number in enumerate(numbers):
        path = os.path.join(directory, segment_file_name(number))
        corrupt_before = counts.corrupt
        last = k == len(numbers) - 1
        scan, size = _load(fs, root, path, last, counts)
        file = LogFile(files, path, size) if last else None
        segment = Segment(number, path, size=size, file=file)
        segment.bad_regions.extend((offset, offset + length) for offset, length in scan.corrupt)
        if scan.torn is not None and not last:
            segment.bad_regions.append((scan.torn, size))  # reported above, as corrupt
        segments.append(segment)
        for offset, line, header, payload in _parsed(scan, path, counts):
            try:
                if header["op"] != "pub":
                    raise ValueError("not a pub record")
                position = header["seq"]
                published_at = header["ts"]
                recent.add(header["id"], position)
            except (KeyError, TypeError, ValueError) as exc:
                counts.corrupt += 1
                logger.error("unreadable record in %s at offset %d skipped: %s", path, offset, exc)
                continue
            segment.add_topic_record(position, offset, len(line) + 1)
            segment.count += 1
            segment.bytes += len(payload)
            if published_at > segment.newest:
                segment.newest = published_at
            last_position = position
        segment.corrupt = counts.corrupt > corrupt_before
    if not segments:
        segments = _first_segment(fs, files, directory)
    log = TopicLog(name, directory, segments, topic)
    topic.first = segments[0].number
    topic.end = topic.next_position = max(last_position + 1, segments[-1].number)
    topic.bytes = log.bytes
    _recover_cursors(fs, files, root, log, counts)
    return log


def _recover_cursors(
    fs: FileSystem, files: OpenFiles, root: str, log: TopicLog, counts: Counts
) -> None:
    path = os.path.join(log.dir, CURSORS)
    if not fs.exists(path):
        return
    corrupt_before = counts.corrupt
    scan, size = _load(fs, root, path, True, counts)
    log.cursors = LogFile(files, path, size)
    cursors = log.index.cursors
    for line, offset in zip(scan.records, scan.offsets, strict=True):
        try:
            record = records.parse(line)
            if record["op"] == "cur":
                name = record["name"]
                if not isinstance(name, str):
                    raise ValueError("name is not a string")
                # Each record holds the cursor's whole state: the last one wins.
                cursors[name] = records.parse_cursor(record)
            elif record["op"] == "del":
                cursors.pop(record["name"], None)
            else:
                raise ValueError(f"unknown op {record['op']!r}")
        except (KeyError, TypeError, ValueError) as exc:
            counts.corrupt += 1
            logger.error("unreadable record in %s at offset %d skipped: %s", path, offset, exc)
    log.cursor_records = len(scan.records)
    log.cursors_corrupt = counts.corrupt > corrupt_before
