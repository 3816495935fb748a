"""Segment files: appending whole batches, and reading topic messages back.

Theory of operation
-------------------
The active (newest) segment of a log has a :class:`~msg.storage.files.LogFile`, which
appends with one ``pwrite`` per batch and is open only while the store's file cache
holds it (:mod:`msg.storage.files`). A :class:`Segment` is one numbered file of a log
plus the counts the store needs without reading it: for queues the live messages it
holds (beanstalkd's walg keeps the same count; the oldest segment can go once it
reaches zero) and how many ``pub`` records it has (to judge compaction); for topics
the message count, payload bytes, newest timestamp (for retention) and a sparse index,
one (position, offset) mark per :data:`SPARSE_INDEX_BYTES`, so a read seeks near its
position and scans at most that many bytes of records it does not want. Topic payloads
stay on disk; :func:`read_topic_segment` reads them with ``pread``, in chunks.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from msg.persistence import TopicMessage
from msg.storage import records
from msg.storage.files import LogFile, OpenFiles

__all__ = ["SPARSE_INDEX_BYTES", "Segment", "read_topic_segment"]

logger = logging.getLogger(__name__)

# One index mark per 4 KiB of records (Kafka's index.interval.bytes is the same
# 4096): a read scans at most one page of unwanted records, and a 1 GiB topic needs
# only 262,144 marks.
SPARSE_INDEX_BYTES: Final = 4096
# Read size for topic scans; grows when one record is larger.
_READ_CHUNK: Final = 64 * 1024


@dataclass(slots=True, eq=False)
class Segment:
    """One segment file of a log and what the store knows about it."""

    number: int
    """From the file name. Topics: the first position in it. Queues: no sequence
    number assigned before the segment was created is >= it."""
    path: str
    size: int = 0
    file: LogFile | None = None
    """Set while this is the log's active (written) segment; open or not is up to
    the file cache."""
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
    files: OpenFiles,
    segment: Segment,
    start: int,
    end: int,
    limit: int,
    out: list[TopicMessage],
) -> None:
    """Append to ``out`` the messages of ``segment`` at positions ``start`` to ``end`` - 1,
    until ``out`` holds ``limit`` messages.

    The active segment is read through the file cache (reopened if it was closed: it
    is likely to be written again soon); an older one is opened for this read only.
    """
    if not segment.marks:
        return
    mark = max(bisect.bisect_right(segment.marks, start) - 1, 0)
    offset = segment.mark_offsets[mark]
    stop = segment.size
    active = segment.file
    own = active is None
    fs = files.fs
    fd = files.open(segment.path) if active is None else active.descriptor()
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
