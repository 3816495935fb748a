"""The file store's record format (version 1): one checksummed JSON object per line.

Theory of operation
-------------------
Every topic and queue has its own log: numbered segment files of records, one JSON
object per line, so ``cat`` and ``jq`` can read them. This format is msg's own and
versioned (``meta.json`` carries :data:`FORMAT_VERSION`); it is not the wire
protocol, so protocol changes never break stored data. Records::

    {"op":"pub","seq":7,"id":"m-7","ts":1732712345.123,"msg":{"any":"json"},"crc":"1a2b3c4d"}
    {"op":"pub","seq":3,"id":"m-3","ts":1732712340.5,"att":2,"why":"bad input","msg":...}
    {"op":"ack","seq":7,"crc":"..."}     queue: acked by its consumer
    {"op":"con","seq":7,"crc":"..."}     queue: consumed by an auto_ack claim
    {"op":"dead","seq":7,"crc":"..."}    queue: moved to the dead-letter queue
    {"op":"req","seq":7,"att":2,"crc":"..."}   queue: requeued after 2 deliveries
    {"op":"cur","name":"audit","pos":42,"crc":"..."}   topic cursors.log: moved
    {"op":"cur","name":"audit","pos":42,"acked":[[44,45],[50,50]],"crc":"..."}
                                         ...with 44, 45 and 50 acked before 42 and 43
    {"op":"del","name":"audit","crc":"..."}            topic cursors.log: deleted

A ``cur`` record holds a durable cursor's whole state: ``pos`` is its floor (every
position below is done), ``acked`` (absent when empty, as in records written before
it existed) the positions above the floor that were acked out of order, as
``[first, last]`` ranges, both ends included. The last ``cur`` record of a name wins.

``seq`` is the queue's sequence number or the topic's position. ``att`` (deliveries
so far) and ``why`` (dead-letter reason) appear only when set: in compaction copies
and in dead-letter queues. ``crc`` is the CRC-32 of every byte before ``,"crc":``, as
8 lower-case hex digits, and is always the last field, so a reader checks a line
with a slice and one ``zlib.crc32`` before parsing anything.

Writing is the hot path, so records are assembled from bytes, a whole batch at a
time (:func:`pub_batch`, :func:`seq_records`): per record one ``%``-format for the
body (the payload exactly as the broker encoded it once, on arrival) and one
``zlib.crc32``, each run over the batch by ``map`` so no Python bytecode runs per
record; the checksum fields of the whole batch come from one ``bytes.hex`` call, and
:func:`pub_batch` joins bodies and checksums into the batch's bytes in one go. What
is the same for the whole batch (the timestamp, whether ids need JSON escaping,
whether any payload holds a newline) is worked out once. ``msg`` is the last field
before ``crc`` and every earlier field is a number or a JSON string (in which ``,"``
cannot occur unescaped), so the first ``,"msg":`` marks where the payload starts,
and recovery parses only the short head.

Reading a segment (:func:`scan`) sorts its bytes into good records, corrupt regions
(bad lines followed by good ones: a bit flip, a lost sector) and a torn tail (bad
bytes up to the end: a write cut short by a crash). It first checks every line at
once, in C (reseal each body, compare); only a segment with a bad line is walked
line by line, and there a bad line is searched for embedded records too, so a
flipped newline costs one record, not two.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from operator import itemgetter
from typing import Any, Final, NamedTuple

from msg import jsonlib
from msg.persistence import Cursor, Ranges

__all__ = [
    "FORMAT_VERSION",
    "PubRecords",
    "Scan",
    "ack_record",
    "consume_record",
    "cursor_delete_record",
    "cursor_record",
    "dead_record",
    "is_pub",
    "is_torn_meta",
    "meta_bytes",
    "parse_all",
    "parse_cursor",
    "parse_meta",
    "parse_pub",
    "pub_batch",
    "pub_parts",
    "requeue_record",
    "requeue_records",
    "salvage",
    "scan",
    "seq_records",
    "valid",
]

FORMAT_VERSION: Final = 1

_CRC_FIELD: Final = b',"crc":"'
# ,"crc":"xxxxxxxx"} after the body; the newline is not part of a line.
_SUFFIX: Final = len(_CRC_FIELD) + 8 + 2
_MSG_FIELD: Final = b',"msg":'
_AFTER_MSG_FIELD: Final = len(_MSG_FIELD).__add__
_BODY: Final = itemgetter(slice(None, -_SUFFIX))
_SEALED_LINE: Final = b'%b,"crc":"%08x"}'
_PLUS_ONE: Final = (1).__add__
_PUB_START: Final = b'{"op":"pub",'
_RECORD_START: Final = b'{"op":'


# A body and its checksum make a record.
_SEALED: Final = b'%b,"crc":"%08x"}\n'


def _seal(body: bytes) -> bytes:
    return _SEALED % (body, zlib.crc32(body))


def _seal_all(bodies: list[bytes]) -> list[bytes]:
    """Records from their bodies: per body one crc32 and one concatenation, all in C."""
    return list(map(bytes.__add__, bodies, _crc_fields(bodies)))


def _crc_fields(bodies: list[bytes]) -> list[bytes]:
    """The ``,"crc":"<hex>"}\n`` that ends each body's record.

    The checksums of the whole batch are written out by one ``bytes.hex`` call (4
    bytes per CRC, a separator between them) and cut apart by one ``split``: a
    ``%08x`` format per record cost more than the CRC itself.
    """
    if not bodies:
        return []
    crcs = struct.pack(f">{len(bodies)}I", *map(zlib.crc32, bodies))
    hexes = crcs.hex("\x01", 4)  # "1a2b3c4d\x01..."; hex digits never hold \x01
    return (_CRC_OPEN + hexes.replace("\x01", _CRC_NEXT) + _CRC_CLOSE).encode().split(b"\x01")


# The CRC fields of a batch as one string, split on \x01: ,"crc":"<hex>"}\n each.
_CRC_OPEN: Final = ',"crc":"'
_CRC_CLOSE: Final = '"}\n'
_CRC_NEXT: Final = _CRC_CLOSE + "\x01" + _CRC_OPEN
# Bytes a JSON string must escape, but for the newline (the separator of _plain_ids,
# which counts the pieces instead). In UTF-8 they only ever stand for themselves.
_ESCAPED_BYTES: Final = bytes(range(0x0A)) + bytes(range(0x0B, 0x20)) + b'"\\'


def _plain_ids(message_ids: Sequence[str]) -> list[bytes] | None:
    """The ids UTF-8 encoded, if none needs JSON escaping; else None.

    One join, one encode, one ``translate`` (deleting every byte that would need
    escaping: nothing deleted, nothing to escape) and one split for the whole batch,
    instead of a JSON encoder call per id (which costs microseconds here).
    """
    if not message_ids:
        return []
    try:
        joined = "\n".join(message_ids).encode()
    except UnicodeEncodeError:
        return None  # a lone surrogate: let the JSON encoder refuse it, as before
    if len(joined.translate(None, _ESCAPED_BYTES)) != len(joined):
        return None
    ids = joined.split(b"\n")
    # More pieces than ids: an id held a newline.
    return ids if len(ids) == len(message_ids) else None


class PubRecords(NamedTuple):
    """The ``pub`` records of one append, as :func:`pub_batch` makes them."""

    data: bytes
    """Every record, one per line."""
    sizes: list[int]
    """Each record's length in bytes."""
    payload_bytes: int
    """The payloads' length in all."""


def pub_batch(
    seqs: Sequence[int], message_ids: Sequence[str], payloads: Sequence[bytes], published_at: float
) -> PubRecords:
    """The ``pub`` records of one append, as one bytes object, and each record's length.

    Byte for byte what :func:`pub_parts` writes for each message (without ``att``
    and ``why``), built for the whole batch at once: per record one format and one
    CRC, and one join for all, so no record exists as an object of its own.
    """
    if len(seqs) == 1:
        # A lone publish (the usual append at low rates): one format and one CRC
        # for the record, without the batch machinery around them, which cost
        # three times as much as the record itself.
        return _pub_record(seqs[0], message_ids[0], payloads[0], published_at)
    ts = jsonlib.dumps(published_at)
    joined = b"".join(payloads)
    if joined.find(b"\n") >= 0:
        # In JSON a raw newline is only insignificant whitespace: it becomes a space,
        # and the record stays one line.
        payloads = [payload.replace(b"\n", b" ") for payload in payloads]
    ids = _plain_ids(message_ids)
    if ids is not None:
        fmt = b'{"op":"pub","seq":%%d,"id":"%%b","ts":%b,"msg":%%b' % ts
    else:
        fmt = b'{"op":"pub","seq":%%d,"id":%%b,"ts":%b,"msg":%%b' % ts
        ids = [jsonlib.dumps(message_id) for message_id in message_ids]
    bodies = list(map(fmt.__mod__, zip(seqs, ids, payloads, strict=True)))
    pieces: list[bytes] = [b""] * (2 * len(bodies))
    pieces[::2] = bodies
    pieces[1::2] = _crc_fields(bodies)
    sizes = list(map(_CRC_FIELD_BYTES.__add__, map(len, bodies)))
    return PubRecords(b"".join(pieces), sizes, len(joined))


def _pub_record(seq: int, message_id: str, payload: bytes, published_at: float) -> PubRecords:
    """:func:`pub_batch` for one message."""
    size = len(payload)
    # find, not ``in``: ``in`` on bytes first tries the needle as an int, and makes
    # and discards a TypeError (a third of this function's time).
    if payload.find(b"\n") >= 0:
        payload = payload.replace(b"\n", b" ")
    dumps = jsonlib.dumps
    record = _seal(
        b'{"op":"pub","seq":%d,"id":%b,"ts":%b,"msg":%b'
        % (seq, dumps(message_id), dumps(published_at), payload)
    )
    return PubRecords(record, [len(record)], size)


# len(',"crc":"1a2b3c4d"}\n'): what sealing adds to a body.
_CRC_FIELD_BYTES: Final = len(_CRC_OPEN) + 8 + len(_CRC_CLOSE)


def seq_records(op: bytes, seqs: Sequence[int]) -> list[bytes]:
    """``ack``, ``con`` or ``dead`` records (``op``) for each of ``seqs``."""
    return _seal_all(list(map((b'{"op":"%b","seq":%%d' % op).__mod__, seqs)))


def requeue_records(items: Sequence[tuple[int, int]]) -> list[bytes]:
    """``req`` records for (seq, attempt) pairs."""
    return _seal_all(list(map(b'{"op":"req","seq":%d,"att":%d'.__mod__, items)))


def pub_parts(
    seq: int,
    message_id: str,
    published_at: float,
    payload: bytes,
    attempt: int = 0,
    reason: str | None = None,
) -> tuple[bytes, bytes, bytes]:
    """A ``pub`` record as (head, payload, tail), to be joined with the rest of a batch.

    Raw newlines in JSON can only be insignificant whitespace (inside strings they are
    escaped), so they are replaced by spaces to keep one record per line.
    """
    if b"\n" in payload:
        payload = payload.replace(b"\n", b" ")
    dumps = jsonlib.dumps
    if attempt or reason is not None:
        extra = b',"att":%d' % attempt
        if reason is not None:
            extra += b',"why":' + dumps(reason)
        head = b'{"op":"pub","seq":%d,"id":%b,"ts":%b%b,"msg":' % (
            seq,
            dumps(message_id),
            dumps(published_at),
            extra,
        )
    else:
        # The JSON encoder writes floats faster than %r, and just as exactly.
        head = b'{"op":"pub","seq":%d,"id":%b,"ts":%b,"msg":' % (
            seq,
            dumps(message_id),
            dumps(published_at),
        )
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head, payload, b',"crc":"%08x"}\n' % crc


def ack_record(seq: int) -> bytes:
    return _seal(b'{"op":"ack","seq":%d' % seq)


def consume_record(seq: int) -> bytes:
    return _seal(b'{"op":"con","seq":%d' % seq)


def dead_record(seq: int) -> bytes:
    return _seal(b'{"op":"dead","seq":%d' % seq)


def requeue_record(seq: int, attempt: int) -> bytes:
    return _seal(b'{"op":"req","seq":%d,"att":%d' % (seq, attempt))


def cursor_record(name: str, position: int, acked: Ranges = ()) -> bytes:
    if not acked:
        return _seal(b'{"op":"cur","name":%b,"pos":%d' % (jsonlib.dumps(name), position))
    ranges = b",".join([b"[%d,%d]" % pair for pair in acked])
    return _seal(
        b'{"op":"cur","name":%b,"pos":%d,"acked":[%b]' % (jsonlib.dumps(name), position, ranges)
    )


def parse_cursor(record: dict[str, Any]) -> Cursor:
    """The cursor a ``cur`` record's fields describe; ValueError (or TypeError,
    KeyError) if they describe none."""
    position = record["pos"]
    if not _is_int(position):
        raise ValueError("pos is not an integer")
    value = record.get("acked", ())
    if not isinstance(value, list | tuple):
        raise ValueError("acked is not a list")
    acked: list[tuple[int, int]] = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(map(_is_int, pair))):
            raise ValueError(f"acked range {pair!r} is not a pair of integers")
        acked.append((pair[0], pair[1]))
    return Cursor(position, tuple(acked))  # checks the ranges


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cursor_delete_record(name: str) -> bytes:
    return _seal(b'{"op":"del","name":%b' % jsonlib.dumps(name))


def valid(line: bytes) -> bool:
    """True if ``line`` (without its newline) is a record with a matching checksum."""
    return (
        len(line) > _SUFFIX
        and line[-_SUFFIX:-10] == _CRC_FIELD
        and line[-2:] == b'"}'
        and b"%08x" % zlib.crc32(line[:-_SUFFIX]) == line[-10:-2]
    )


def is_pub(line: bytes) -> bool:
    return line.startswith(_PUB_START)


def parse_pub(line: bytes) -> tuple[dict[str, Any], bytes]:
    """The fields of a valid ``pub`` line other than ``msg``, and the payload bytes."""
    cut = line.find(_MSG_FIELD)
    if cut < 0:
        raise ValueError("pub record without a msg field")
    header: dict[str, Any] = jsonlib.loads(line[:cut] + b"}")
    return header, line[cut + len(_MSG_FIELD) : -_SUFFIX]


def parse(line: bytes) -> dict[str, Any]:
    """All fields of a valid (short) record."""
    record: dict[str, Any] = jsonlib.loads(line)
    return record


def meta_bytes(kind: str, name: str) -> bytes:
    return jsonlib.dumps({"v": FORMAT_VERSION, "kind": kind, "name": name}) + b"\n"


def parse_meta(data: bytes) -> tuple[str, str]:
    """(kind, name) from a ``meta.json``; ValueError if it is not one this version reads."""
    try:
        meta = jsonlib.loads(data)
    except jsonlib.DecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    version, kind, name = meta.get("v"), meta.get("kind"), meta.get("name")
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version!r}, this broker reads {FORMAT_VERSION}")
    if not isinstance(kind, str) or not isinstance(name, str):
        raise ValueError("kind and name must be strings")
    return kind, name


def is_torn_meta(data: bytes) -> bool:
    """True if ``data`` is no JSON object at all: a ``meta.json`` a crash tore or zeroed
    (as opposed to a readable one that says something else, e.g. a newer version)."""
    try:
        meta = jsonlib.loads(data)
    except jsonlib.DecodeError:
        return True
    return not isinstance(meta, dict)


@dataclass(slots=True)
class Scan:
    """What :func:`scan` found in a segment's bytes."""

    records: list[bytes] = field(default_factory=list)
    """Good lines (checksum verified), without newlines, in file order."""
    offsets: list[int] = field(default_factory=list)
    """File offset of each good line."""
    corrupt: list[tuple[int, int]] = field(default_factory=list)
    """(offset, length) of each bad region that good records follow."""
    torn: int | None = None
    """Offset where bad bytes start that run to the end of the data; None if clean."""


def scan(data: bytes) -> Scan:
    """Sort ``data`` into good records, corrupt regions and a torn tail."""
    lines = data.split(b"\n")
    tail = lines.pop()  # the bytes after the last newline: b"" if the data ends cleanly
    if not tail and _all_valid(lines):
        # The usual case, checked in C: every line is a good record.
        offsets = list(accumulate(map(_PLUS_ONE, map(len, lines)), initial=0))
        offsets.pop()
        return Scan(lines, offsets)
    result = Scan()
    records = result.records
    offsets = result.offsets
    bad_start = -1
    offset = 0
    for line in lines:
        if valid(line):
            if bad_start >= 0:
                result.corrupt.append((bad_start, offset - bad_start))
                bad_start = -1
            records.append(line)
            offsets.append(offset)
        else:
            pieces = salvage(line)
            for k, (start, piece, good) in enumerate(pieces):
                if good:
                    if bad_start >= 0:
                        result.corrupt.append((bad_start, offset + start - bad_start))
                        bad_start = -1
                    records.append(piece)
                    offsets.append(offset + start)
                    if k + 1 < len(pieces):
                        # The byte after it should have been a newline: damaged.
                        bad_start = offset + start + len(piece)
                elif bad_start < 0:
                    bad_start = offset + start
        offset += len(line) + 1
    if tail and bad_start < 0:
        bad_start = offset
    if bad_start >= 0:
        result.torn = bad_start
    return result


def _all_valid(lines: list[bytes]) -> bool:
    """True if :func:`valid` holds for every line: resealing each body gives the line."""
    if not lines:
        return True
    if min(map(len, lines)) <= _SUFFIX:
        return False
    bodies = list(map(_BODY, lines))
    return (
        list(map(_SEALED_LINE.__mod__, zip(bodies, map(zlib.crc32, bodies), strict=True))) == lines
    )


def parse_all(lines: list[bytes]) -> tuple[list[dict[str, Any]], list[bytes]] | None:
    """The fields of every good record (as :func:`parse`, and as :func:`parse_pub` for
    ``pub`` records without ``msg``) and the payloads (garbage for other records),
    with one JSON decode for all of them; None if any record does not decode (the
    caller then parses line by line, to skip just the bad ones).

    Each line is cut before its first ``,"msg":``; a line without one loses only its
    closing brace. Joined with ``},`` inside brackets, that is one JSON array.
    """
    cuts = list(map(bytes.find, lines, repeat(_MSG_FIELD)))
    heads = map(bytes.__getitem__, lines, map(slice, cuts))
    try:
        parsed = jsonlib.loads(b"[" + b"},".join(heads) + b"}]") if lines else []
    except ValueError:
        return None
    if not isinstance(parsed, list) or len(parsed) != len(lines):
        return None
    if parsed and set(map(type, parsed)) != {dict}:
        return None
    starts = map(_AFTER_MSG_FIELD, cuts)
    payloads = list(map(bytes.__getitem__, lines, map(slice, starts, repeat(-_SUFFIX))))
    return parsed, payloads


def salvage(line: bytes) -> list[tuple[int, bytes, bool]]:
    """Split a bad line where records start: (offset in the line, piece, whether it is
    a good record). A damaged newline joins two records; this gets the second back."""
    starts = []
    at = line.find(_RECORD_START, 1)
    while at >= 0:
        starts.append(at)
        at = line.find(_RECORD_START, at + 1)
    if not starts:
        return [(0, line, False)]
    pieces: list[tuple[int, bytes, bool]] = []
    bounds = [0, *starts]
    for k, start in enumerate(bounds):
        # Each piece but the last lost the byte before the next start: the newline.
        end = bounds[k + 1] - 1 if k + 1 < len(bounds) else len(line)
        piece = line[start:end]
        pieces.append((start, piece, valid(piece)))
    return pieces
