"""Segment files: appending whole batches, and reading topic messages back.

Theory of operation
-------------------
A :class:`LogFile` appends with one ``pwrite`` per batch at the offset it tracks
itself. If a write fails (disk full) or is cut short, the file is truncated back to
its last good length, so no partial record stays behind and the next batch lands
where the failed one would have. Only if that truncate fails too is the file
``damaged``: the store then stops writing.

A :class:`Segment` is one numbered file of a log plus the counts the store needs
without reading it: for queues the live messages it holds (beanstalkd's walg keeps
the same count; the oldest segment can go once it reaches zero) and how many
``pub`` records it has (to judge compaction); for topics the message count, payload
bytes, newest timestamp (for retention) and a sparse index, one (position, offset)
mark per :data:`SPARSE_INDEX_BYTES`, so a read seeks near its position and scans at
most that many bytes of records it does not want. Topic payloads stay on disk;
:func:`read_topic_segment` reads them with ``pread``, in chunks.
"""

from __future__ import annotations

import bisect
import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from msg.persistence import TopicMessage
from msg.storage import records
from msg.storage.fs import FileSystem

__all__ = ["SPARSE_INDEX_BYTES", "LogFile", "Segment", "read_topic_segment"]

logger = logging.getLogger(__name__)

# One index mark per 4 KiB of records (Kafka's index.interval.bytes is the same
# 4096): a read scans at most one page of unwanted records, and a 1 GiB topic needs
# only 262,144 marks.
SPARSE_INDEX_BYTES: Final = 4096
# Read size for topic scans; grows when one record is larger.
_READ_CHUNK: Final = 64 * 1024


class LogFile:
    """An open file that only grows, batch by batch, at offsets it tracks itself."""

    __slots__ = ("damaged", "fd", "fs", "path", "size")

    def __init__(self, fs: FileSystem, path: str, fd: int, size: int) -> None:
        self.fs = fs
        self.path = path
        self.fd = fd
        self.size = size
        """Length of the good records; writes go here."""
        self.damaged = False

    @classmethod
    def open(cls, fs: FileSystem, path: str) -> LogFile:
        fd = fs.open(path)
        try:
            size = fs.size(fd)
        except OSError:
            fs.close(fd)
            raise
        return cls(fs, path, fd, size)

    def append(self, data: bytes) -> None:
        """Write all of ``data`` at the end, or nothing (raising the OSError)."""
        if self.damaged:
            raise OSError(errno.EIO, "log file is damaged by an earlier failed write", self.path)
        start = self.size
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                count = self.fs.pwrite(self.fd, view[written:], start + written)
                if count <= 0:
                    raise OSError(errno.EIO, "write made no progress", self.path)
                written += count
        except OSError:
            if written:
                try:
                    self.fs.truncate(self.fd, start)
                except OSError as exc:
                    self.damaged = True
                    logger.error(
                        "cannot cut a failed write off %s at %d: %s", self.path, start, exc
                    )
            raise
        finally:
            view.release()
        self.size = start + written

    def truncate(self, length: int) -> None:
        self.fs.truncate(self.fd, length)
        self.size = length


@dataclass(slots=True, eq=False)
class Segment:
    """One segment file of a log and what the store knows about it."""

    number: int
    """From the file name. Topics: the first position in it. Queues: no sequence
    number assigned before the segment was created is >= it."""
    path: str
    size: int = 0
    file: LogFile | None = None
    """Open while this is the log's active (written) segment."""
    # Queues.
    live: int = 0
    pubs: int = 0
    # Topics.
    count: int = 0
    bytes: int = 0
    newest: float = float("-inf")
    marks: list[int] = field(default_factory=list)
    """Positions of the sparse index marks, ascending."""
    mark_offsets: list[int] = field(default_factory=list)
    unmarked: int = SPARSE_INDEX_BYTES
    """Bytes written since the last mark (starts full: the first record gets one)."""
    bad_regions: list[tuple[int, int]] = field(default_factory=list)
    """(start, end) of the damage already reported, so a read logs each once."""
    corrupt: bool = False
    """Recovery found a corrupt record here: the file goes to lost+found, not away."""

    def add_topic_record(self, position: int, offset: int, length: int) -> None:
        if self.unmarked >= SPARSE_INDEX_BYTES:
            self.marks.append(position)
            self.mark_offsets.append(offset)
            self.unmarked = 0
        self.unmarked += length


def read_topic_segment(
    fs: FileSystem, segment: Segment, start: int, end: int, limit: int, out: list[TopicMessage]
) -> None:
    """Append to ``out`` the messages of ``segment`` at positions ``start`` to ``end`` - 1,
    until ``out`` holds ``limit`` messages."""
    if not segment.marks:
        return
    mark = max(bisect.bisect_right(segment.marks, start) - 1, 0)
    offset = segment.mark_offsets[mark]
    stop = segment.size
    active = segment.file
    own = active is None
    fd = fs.open(segment.path) if active is None else active.fd
    try:
        chunk = _READ_CHUNK
        while offset < stop and len(out) < limit:
            data = fs.pread(fd, min(chunk, stop - offset), offset)
            if not data:
                break
            last_newline = data.rfind(b"\n")
            if last_newline < 0:
                if offset + len(data) >= stop:
                    # No newline up to the end: a damaged tail (recovery reported it).
                    # Reading "more" would read the same bytes forever.
                    _report_bad(segment, offset, offset + len(data))
                    break
                # One record larger than the chunk: read more at once.
                chunk *= 2
                continue
            line_offset = offset
            for line in data[:last_newline].split(b"\n"):
                here = line_offset
                line_offset += len(line) + 1
                good: Sequence[bytes] = (line,)
                if not records.valid(line) or not records.is_pub(line):
                    good = _salvage(segment, line, here)
                for record in good:
                    header, payload = records.parse_pub(record)
                    position = header["seq"]
                    if position < start:
                        continue
                    if position >= end:
                        return
                    out.append(TopicMessage(position, header["id"], payload, header["ts"]))
                    if len(out) >= limit:
                        return
            offset += last_newline + 1
    finally:
        if own:
            fs.close(fd)


def _salvage(segment: Segment, line: bytes, offset: int) -> list[bytes]:
    """The good ``pub`` records in a bad line (a damaged newline glues a good record to
    a bad one, as recovery knows too); reports the damage where recovery's scan does."""
    good: list[bytes] = []
    pieces = records.salvage(line)
    for k, (start, piece, ok) in enumerate(pieces):
        if not ok:
            _report_bad(segment, offset + start, offset + start + len(piece))
            continue
        if records.is_pub(piece):
            good.append(piece)
        if k + 1 < len(pieces):  # the byte after it should have been a newline
            _report_bad(segment, offset + start + len(piece), offset + start + len(piece) + 1)
    return good


def _report_bad(segment: Segment, start: int, end: int) -> None:
    """Log damage found by a read, unless recovery or an earlier read reported it."""
    regions = segment.bad_regions
    if any(low <= start < high for low, high in regions):
        return
    regions.append((start, end))
    logger.error("corrupt record in %s at offset %d skipped on read", segment.path, start)
