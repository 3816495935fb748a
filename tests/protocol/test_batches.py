"""A read of many lines: batched into runs, and read exactly as line by line.

The reader takes a read made only of well-formed publishes in C-level passes over the
whole read, and anything else line by line. Whatever path a read takes, its frames
must be the ones its lines give when fed one at a time.
"""

from __future__ import annotations

import random
from itertools import repeat

import pytest

from msg.protocol.codec import _UNDECODED, RequestReader
from msg.protocol.frames import Acks, Mode, Publish, Publishes, Request, RequestError
from msg.protocol.names import name_problem

pytestmark = pytest.mark.usefixtures("json_backend")

WELL_FORMED = [
    b'{"action":"publish","topic":"orders","message":{"n":1}}',
    b'{"action":"publish","topic":"orders","mode":"queue","message":[1,2]}',
    b'{"action":"publish","topic":"audit","mode":"pubsub","message":"x","id":7}',
    b'{"id":"r-1","message":null,"topic":"orders","action":"publish"}',
    b'{"action":"publish","topic":"orders","message":1.5,"id":true}',
    b'{"action":"publish","topic":"orders","message":"caf\\u00e9 \\ud83d\\ude00"}',
]

ODD = [
    b'{"action":"publish","topic":"orders","mode":null,"message":1}',
    b'{"action":"publish","topic":"orders","id":null,"message":1}',
    b'{"action":"publish","topic":"orders","message":1,"extra":2}',
    b'{"action":"publish","topic":"orders","reply":null,"message":1}',
    b'{"action":"publish","topic":"orders","reply":0,"message":1}',
    b'{"action":"publish","topic":"orders","reply":"no","message":1}',
    b'{"action":"publish","topic":"orders","reply":false,"message":1}',
    b'{"action":"publish","topic":["orders"],"message":1}',
    b'{"action":"publish","topic":"orders","mode":["queue"],"message":1}',
    b'{"action":"publish","topic":"orders","mode":"fanout","message":1}',
    b'{"action":"publish","topic":"orders","id":[1],"message":1}',
    b'{"action":"publish","topic":"orders"}',
    b'{"action":"publish","topic":"no such/../name","message":1}',
    b'{"action":"publish","topic":"orders","message":1,"topic":"audit"}',
    b'{"action":"ack","message_id":"m-1"}',
    b'{"action":"ping"}',
    b"[1,2]",
    b"null",
    b"not json",
]


ACKS = [
    b'{"action":"ack","message_id":"m-1"}',
    b'{"message_id":"abc0def-17","action":"ack"}',
    b'{"action":"ack","message_id":"m-2","id":4}',
    b'{"action":"ack","message_id":"x","id":"r"}',
]

ODD_ACKS = [
    b'{"action":"ack","message_id":"---"}',
    b'{"action":"ack","message_id":""}',
    b'{"action":"ack","message_id":"m 1"}',
    b'{"action":"ack","message_id":"m\\u00e9"}',
    b'{"action":"ack","message_id":"' + b"m" * 129 + b'"}',
    b'{"action":"ack","message_id":7}',
    b'{"action":"ack","message_id":"m-3","id":null}',
    b'{"action":"ack","message_id":"m-3","id":{}}',
    b'{"action":"ack","message_id":"m-3","requeue":true}',
    b'{"action":"ack"}',
    b'{"action":"nack","message_id":"m-3"}',
]


def one_at_a_time(lines: list[bytes]) -> list[Request | RequestError]:
    """The reference: each line decoded and checked alone, by the line-by-line path."""
    frames: list[Request | RequestError] = []
    for line in lines:
        for frame in RequestReader()._frames([line], repeat(_UNDECODED)):
            if isinstance(frame, Publishes | Acks):
                frames.extend(frame)
            else:
                frames.append(frame)
    return frames


@pytest.fixture(autouse=True)
def known_names() -> None:
    # The C-level path only takes names already checked once (as a broker has).
    for name in ("orders", "audit"):
        assert name_problem(name) is None


def test_a_read_of_well_formed_publishes_is_one_batch() -> None:
    lines = WELL_FORMED * 50
    batches = RequestReader().feed_batches(b"\n".join(lines) + b"\n")
    assert len(batches) == 1
    batch = batches[0]
    assert isinstance(batch, Publishes)
    assert list(batch) == one_at_a_time(lines)
    assert batch.modes[:3] == [Mode.PUBSUB, Mode.QUEUE, Mode.PUBSUB]
    assert batch.ids[:5] == [None, None, 7, "r-1", True]


@pytest.mark.parametrize("odd", ODD, ids=range(len(ODD)))
def test_one_odd_line_among_publishes_reads_as_line_by_line(odd: bytes) -> None:
    lines = [*WELL_FORMED, odd, *WELL_FORMED]
    frames = RequestReader().feed(b"\n".join(lines) + b"\n")
    assert frames == one_at_a_time(lines)
    # The publishes around the odd line still come batched, before and after it.
    batches = RequestReader().feed_batches(b"\n".join(lines) + b"\n")
    assert isinstance(batches[0], Publishes)
    assert isinstance(batches[-1], Publishes)


# Publishes that asked for no reply: a batch holds only such publishes, or none.
QUIET = [
    b'{"action":"publish","topic":"orders","reply":false,"message":{"n":1}}',
    b'{"action":"publish","topic":"orders","mode":"queue","reply":false,"message":[1]}',
    b'{"reply":false,"id":3,"message":null,"topic":"audit","action":"publish"}',
    b'{"action":"publish","topic":"orders","message":"x","reply":false,"id":"r"}',
]


def test_a_read_of_publishes_that_ask_for_no_reply_is_one_batch() -> None:
    lines = QUIET * 50
    batches = RequestReader().feed_batches(b"\n".join(lines) + b"\n")
    assert len(batches) == 1
    batch = batches[0]
    assert isinstance(batch, Publishes)
    assert batch.reply is False
    assert list(batch) == one_at_a_time(lines)


@pytest.mark.parametrize("explicit", [False, True], ids=["default", "reply-true"])
def test_publishes_asking_and_not_asking_for_replies_come_as_separate_batches(
    explicit: bool,
) -> None:
    asking = b'{"action":"publish","topic":"orders","message":1%s}' % (
        b',"reply":true' if explicit else b""
    )
    lines = [asking, asking, *QUIET, *QUIET, asking]
    batches = RequestReader().feed_batches(b"\n".join(lines) + b"\n")
    assert [(type(b), getattr(b, "reply", None), len(b)) for b in batches] == [  # type: ignore[arg-type]
        (Publishes, True, 2),
        (Publishes, False, 8),
        (Publishes, True, 1),
    ]
    assert [f for b in batches for f in b] == one_at_a_time(lines)  # type: ignore[union-attr]


def test_publishes_and_acks_come_as_runs_in_order() -> None:
    lines = [
        b'{"action":"publish","topic":"orders","message":1}',
        b'{"action":"publish","topic":"orders","message":2}',
        b'{"action":"ack","message_id":"m-1"}',
        b'{"action":"ack","message_id":"m-2","id":3}',
        b'{"action":"publish","topic":"audit","message":3}',
    ]
    batches = RequestReader().feed_batches(b"\n".join(lines) + b"\n")
    assert [type(b) for b in batches] == [Publishes, Acks, Publishes]
    assert [f for b in batches for f in b] == one_at_a_time(lines)  # type: ignore[union-attr]


def test_an_overlong_line_among_publishes_is_an_error_in_its_place() -> None:
    reader = RequestReader(max_line_bytes=100)
    long = b'{"action":"publish","topic":"orders","message":"' + b"x" * 200 + b'"}'
    short = b'{"action":"publish","topic":"orders","message":1}'
    frames = reader.feed(b"\n".join([short, long, short]) + b"\n")
    assert [type(f) for f in frames] == [Publish, RequestError, Publish]
    # The next read, all publishes again, takes the batched path.
    assert [type(b) for b in reader.feed_batches(short + b"\n" + short + b"\n")] == [Publishes]


def test_a_read_of_well_formed_acks_is_one_batch() -> None:
    lines = ACKS * 50
    batches = RequestReader().feed_batches(b"\n".join(lines) + b"\n")
    assert len(batches) == 1
    assert isinstance(batches[0], Acks)
    assert list(batches[0]) == one_at_a_time(lines)


@pytest.mark.parametrize("odd", ODD_ACKS, ids=range(len(ODD_ACKS)))
def test_one_odd_line_among_acks_reads_as_line_by_line(odd: bytes) -> None:
    lines = [*ACKS, odd, *ACKS]
    assert RequestReader().feed(b"\n".join(lines) + b"\n") == one_at_a_time(lines)


# -- lines of one shape: cut apart by their common text --------------------------------

# A client's publishes usually differ only in their message. Such a read is cut into
# messages by one split and checked as a whole; these tests hold it to reading exactly
# as line by line, whatever is mixed in and wherever the reads are cut.

SHAPED = [
    b'{"action":"publish","topic":"orders","message":' + message + b"}"
    for message in (
        b"1",
        b'"plain text"',
        b'{"n":1,"tags":["a","b"]}',
        b"[]",
        b"null",
        b"-2.5",
        b'"caf\xc3\xa9 \\" \\\\ \\n"',
        b'"}\\n{\\"action\\":\\"publish\\"}"',
    )
]

# Each a line a client could send among shaped ones: alone, each reads as it always has.
NOT_CANONICAL = [
    b'{"action":"publish","topic":"orders","message": 1}',
    b'{"action":"publish","topic":"orders","message":1 }',
    b'{"action":"publish","topic":"orders","message":{"n": 1}}',
    b'{"action":"publish","topic":"orders","message":1E2}',
    b'{"action":"publish","topic":"orders","message":"\\u0041\\/"}',
    b'{"action":"publish","topic":"orders","message":18446744073709551616}',
    b'{"action":"publish","topic":"orders","message":}',
    b'{"action":"publish","topic":"orders","message":12',
    b'{"action":"publish","topic":"orders","message":1,"message":2}',
    b'{"action":"publish","topic":"orders","message":"x"}\r',
    b'{"action":"publish","topic":"orders","message":"unterminated}',
    b'{"action":"publish","topic":"orders","message":"\xff"}',
    b"   ",
    b'{"action":"publish","topic":"audit","message":1}',
]

PREFIX = b'{"action":"publish","topic":"orders","message":'

QUIET_PREFIX = b'{"action":"publish","topic":"orders","reply":false,"message":'
SHAPED_QUIET = [QUIET_PREFIX + line[len(PREFIX) :] for line in SHAPED]
SHAPED_QUIET_WITH_IDS = [
    QUIET_PREFIX + message + b',"id":%d}' % n
    for n, message in enumerate((b"1", b'"x"', b'{"a":[1,2]}', b"null"))
]
# Lines a client asking for no reply could send among its shaped ones.
NOT_CANONICAL_QUIET = [
    PREFIX + b'1,"reply":false}',
    QUIET_PREFIX[:-1] + b" 1}",
    b'{"action":"publish","topic":"orders","reply":true,"message":1}',
    b'{"action":"publish","topic":"orders","reply": false,"message":1}',
    QUIET_PREFIX + b'1,"reply":true}',
    QUIET_PREFIX + b'1,"id":2,"reply":true}',
]

# Lines each invalid alone that would make valid requests if the reader joined them:
# it must not.
SPLICED = [
    PREFIX + b'[{"b":1}}',
    PREFIX + b"2}]}",
    PREFIX + b"3}," + PREFIX + b"4}",
]


ACK_PREFIX = b'{"action":"ack","message_id":"'
TWO_OBJECTS = [SPLICED[1], SPLICED[2], ACK_PREFIX + b'm"}' + ACK_PREFIX + b'n"}']
SHAPED_ACKS = [ACK_PREFIX + message_id + b'"}' for message_id in (b"m-1", b"abc0def-17", b"Z")]

NOT_CANONICAL_ACKS = [
    b'{"action":"ack","message_id": "m-1"}',
    b'{"action":"ack","message_id":"m-1" }',
    b'{"action":"ack","message_id":"m\\u002d1"}',
    b'{"action":"ack","message_id":"m-1"}\r',
    b'{"action":"ack","message_id":"m-1","id":2}',
    ACK_PREFIX + b'm-1", "id": 3}',
    *TWO_OBJECTS[2:],
    ACK_PREFIX + b'm\xc3\xa9"}',
    ACK_PREFIX + b"m-12",
    *ODD_ACKS,
]

# The same with a request id after the value, as msg's own client writes its lines.
SHAPED_WITH_IDS = [
    line[:-1] + b',"id":' + rid + b"}"
    for line, rid in zip(
        SHAPED, [b"1", b'"r-1"', b"2.5", b"true", b"-7", b"9", b"0", b'"x"'], strict=True
    )
] + [PREFIX + b'{"a":1,"id":2},"id":3}']
SHAPED_ACKS_WITH_IDS = [
    ACK_PREFIX + b'm-1","id":1}',
    ACK_PREFIX + b'Z","id":"r-2"}',
    ACK_PREFIX + b'abc0def-17","id":false}',
]
NOT_CANONICAL_IDS = [
    PREFIX + b'1,"id": 5}',
    PREFIX + b'1,"id":05}',
    PREFIX + b'1,"id":null}',
    PREFIX + b'1,"id":[1]}',
    PREFIX + b'1,"id":1.0E2}',
    PREFIX + b'1,"id":"\\u0041"}',
    PREFIX + b'1,"id":5,"mode":"queue"}',
    PREFIX + b'1,"id":18446744073709551616}',
    PREFIX + b"1}",
    PREFIX + b'1,"id":5',
    PREFIX + b'1 ,"id":5}',
    ACK_PREFIX + b'm-1","id": 1}',
    ACK_PREFIX + b'm-1","id":{}}',
    ACK_PREFIX + b'm-1"}',
    ACK_PREFIX + b'm 1","id":1}',
]


def fed_in_pieces(lines: list[bytes], seed: int) -> list[Request | RequestError]:
    """The frames of ``lines`` sent as one stream, read in chunks of random sizes."""
    stream = b"\n".join(lines) + b"\n"
    rng = random.Random(seed)
    reader = RequestReader()
    frames: list[Request | RequestError] = []
    start = 0
    while start < len(stream):
        end = start + rng.randint(1, 300)
        frames += reader.feed(stream[start:end])
        start = end
    return frames


@pytest.mark.parametrize(
    ("lines", "kind"),
    [
        (SHAPED, Publishes),
        (SHAPED_ACKS, Acks),
        (SHAPED_WITH_IDS, Publishes),
        (SHAPED_ACKS_WITH_IDS, Acks),
        (SHAPED_QUIET, Publishes),
        (SHAPED_QUIET_WITH_IDS, Publishes),
    ],
)
def test_a_read_of_shaped_lines_is_one_batch_read_as_line_by_line(
    lines: list[bytes], kind: type[Publishes | Acks]
) -> None:
    batches = RequestReader().feed_batches(b"\n".join(lines * 40) + b"\n")
    assert len(batches) == 1
    assert isinstance(batches[0], kind)
    assert list(batches[0]) == one_at_a_time(lines * 40)


@pytest.mark.parametrize(
    "lines",
    [
        [prefix + b'{"n":%d}}' % n for n in range(100)]
        for prefix in (
            b'{"action":"publish","topic":"orders","mode":"queue","message":',
            b'{"topic":"audit","message":',
            b'{"action":"publish","id":"same","topic":"orders","message":',
            b'{"message":0,"action":"publish","topic":"orders","message":',
            b'{ "action" : "publish" , "topic" : "orders" , "message" :',
        )
    ]
    + [
        [prefix + b'm-%d"}' % n for n in range(100)]
        for prefix in (
            b'{"message_id":"',
            b'{"action":"ack","id":"r","message_id":"',
            b'{"message_id":"x","action":"ack","message_id":"',
        )
    ],
)
def test_any_valid_shape_reads_as_line_by_line(lines: list[bytes]) -> None:
    assert RequestReader().feed(b"\n".join(lines) + b"\n") == one_at_a_time(lines)


ODD_AMONG_SHAPED = (
    [(SHAPED, odd) for odd in NOT_CANONICAL]
    + [(SHAPED_ACKS, odd) for odd in NOT_CANONICAL_ACKS]
    + [(SHAPED_WITH_IDS, odd) for odd in NOT_CANONICAL_IDS]
    + [(SHAPED_ACKS_WITH_IDS, odd) for odd in NOT_CANONICAL_IDS]
    + [(SHAPED, odd) for odd in NOT_CANONICAL_QUIET]
    + [(SHAPED_QUIET, odd) for odd in NOT_CANONICAL_QUIET + NOT_CANONICAL[:6]]
    + [(SHAPED_QUIET_WITH_IDS, odd) for odd in NOT_CANONICAL_QUIET + NOT_CANONICAL_IDS]
)


@pytest.mark.parametrize(("shaped", "odd"), ODD_AMONG_SHAPED, ids=range(len(ODD_AMONG_SHAPED)))
@pytest.mark.parametrize("last", [False, True], ids=["between", "last"])
def test_a_line_not_as_msg_writes_it_reads_as_line_by_line(
    shaped: list[bytes], odd: bytes, last: bool
) -> None:
    lines = [*shaped, odd, *([] if last else shaped)]
    assert RequestReader().feed(b"\n".join(lines) + b"\n") == one_at_a_time(lines)


# Request ids that make valid scalars only when joined: "a,b", 3, 4.
SPLICED_IDS = [PREFIX + b'1,"id":"a}', PREFIX + b'2,"id":b"}', PREFIX + b'3,"id":3,4}']


@pytest.mark.parametrize(("shaped", "spliced"), [(SHAPED, SPLICED), (SHAPED_WITH_IDS, SPLICED_IDS)])
def test_lines_invalid_alone_are_not_joined_into_valid_ones(
    shaped: list[bytes], spliced: list[bytes]
) -> None:
    lines = [*shaped, *spliced, *shaped]
    frames = RequestReader().feed(b"\n".join(lines) + b"\n")
    assert frames == one_at_a_time(lines)
    assert [type(f) for f in frames[len(shaped) : -len(shaped)]] == [RequestError] * 3


@pytest.mark.parametrize("seed", range(20))
def test_reads_cut_anywhere_read_as_line_by_line(seed: int) -> None:
    pool = SHAPED * 6 + SHAPED_ACKS * 6 + SHAPED_WITH_IDS * 6 + SHAPED_ACKS_WITH_IDS * 6
    pool += SHAPED_QUIET * 6 + SHAPED_QUIET_WITH_IDS * 6
    pool += NOT_CANONICAL + NOT_CANONICAL_ACKS + NOT_CANONICAL_IDS + SPLICED + ODD
    pool += NOT_CANONICAL_QUIET + QUIET
    # Not a line that starts with a whole object and goes on: a read cut right after
    # that object takes it as a request (the codec's concession to clients that send
    # no newline), which is what it would be were the rest not sent.
    pool = [line for line in pool + ACKS + [b""] if line not in TWO_OBJECTS]
    lines = random.Random(seed).choices(pool, k=300)
    assert fed_in_pieces(lines, seed) == one_at_a_time([line for line in lines if line])


def test_an_overlong_shaped_line_is_an_error_in_its_place() -> None:
    reader = RequestReader(max_line_bytes=100)
    short = PREFIX + b"1}"
    long = PREFIX + b'"' + b"x" * 200 + b'"}'
    frames = reader.feed(b"\n".join([short] * 30 + [long] + [short] * 30) + b"\n")
    assert [type(f) for f in frames] == [Publish] * 30 + [RequestError] + [Publish] * 30


@pytest.mark.parametrize(
    "line",
    SHAPED
    + SHAPED_ACKS
    + SHAPED_WITH_IDS
    + SHAPED_ACKS_WITH_IDS
    + SHAPED_QUIET
    + SHAPED_QUIET_WITH_IDS
    + NOT_CANONICAL_QUIET
    + NOT_CANONICAL
    + NOT_CANONICAL_ACKS
    + NOT_CANONICAL_IDS
    + ODD,
)
def test_a_read_of_one_line_reads_as_line_by_line(line: bytes) -> None:
    reader = RequestReader()
    for _ in range(3):  # the first read of a shape, and reads after it
        assert reader.feed(line + b"\n") == one_at_a_time([line])
