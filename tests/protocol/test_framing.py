"""Cutting the byte stream into lines: chunking, line endings, the size cap.

How a stream is split into reads must never change what is read, and no read may make
the reader hold more than ``max_line_bytes`` of an unfinished line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, Final, cast

import pytest

from msg.protocol import codec
from msg.protocol.codec import (
    DEFAULT_MAX_LINE_BYTES,
    TOO_LONG_HEAD_BYTES,
    LineBuffer,
    LineTooLong,
    RequestReader,
)
from msg.protocol.codes import ErrorCode
from msg.protocol.frames import Ack, Ping, Publish, Request, RequestError, Status
from tests.protocol.test_codec import CANONICAL, ERRORS, SPELLINGS, assert_frames

pytestmark = pytest.mark.usefixtures("json_backend")


def _complete_early(line: bytes) -> bool:
    """Whether a proper prefix of ``line`` ending in '}' is already a JSON value."""
    for end in range(1, len(line)):
        if line[end - 1 : end] == b"}":
            try:
                json.loads(line[:end])
            except ValueError:
                continue
            return True
    return False


def _table_lines() -> list[bytes]:
    lines = [cast(bytes, case.values[0]) for case in [*CANONICAL, *SPELLINGS, *ERRORS]]
    # The well-formed streams the framing promises to read the same however they are
    # cut: no line that starts with a complete object and goes on (that is an error
    # read differently when split: see test_object_then_more_on_the_same_line), and
    # no 100 kB nesting bombs (fed byte by byte they only make the test slow).
    return [line for line in lines if len(line) < 20_000 and not _complete_early(line)]


TABLE_STREAM: Final = b"".join(line + b"\n" for line in _table_lines())


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_table_stream_covers_the_tables() -> None:
    assert len(_table_lines()) > len(CANONICAL) + len(ERRORS) - 5


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000])
def test_any_chunking_reads_the_same_frames(size: int) -> None:
    whole = RequestReader().feed(TABLE_STREAM)
    assert len(whole) == len(_table_lines())
    reader = RequestReader()
    pieces: list[Request | RequestError] = []
    for chunk in _chunks(TABLE_STREAM, size):
        pieces += reader.feed(chunk)
    assert_frames(pieces, whole)


def test_several_requests_in_one_chunk() -> None:
    out = RequestReader().feed(
        b'{"action":"ping","id":1}\n{"action":"status"}\n{"action":"ack","message_id":"m"}\n'
    )
    assert_frames(out, [Ping(1), Status(), Ack("m")])


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([b'{"action":"ping"}\r\n{"action":"status"}\r\n'], id="one-chunk"),
        pytest.param([b'{"action":"ping"}\r', b'\n{"action":"status"}\r', b"\n"], id="split-crlf"),
        pytest.param([b'{"action":"ping"', b'}\r\n{"action":"status"}\r\n'], id="split-line"),
    ],
)
def test_crlf_line_endings(chunks: list[bytes]) -> None:
    reader = RequestReader()
    out = [frame for chunk in chunks for frame in reader.feed(chunk)]
    assert_frames(out, [Ping(), Status()])


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([b"\n\n\n"], id="newlines"),
        pytest.param([b"  \n\t\n\r\n \t \r\n"], id="whitespace-lines"),
        pytest.param([b"   ", b"  ", b"\n"], id="whitespace-across-chunks"),
        pytest.param([b"\x0b\x0c\n"], id="vertical-tab-form-feed"),
    ],
)
def test_blank_lines_are_ignored(chunks: list[bytes]) -> None:
    reader = RequestReader()
    out = [frame for chunk in [*chunks, b'{"action":"ping"}\n\n'] for frame in reader.feed(chunk)]
    assert_frames(out, [Ping()])


def test_line_split_at_every_byte() -> None:
    line = '{"action":"publish","id":"x","topic":"t","message":{"k":["é",1]}}\n'.encode()
    want = [Publish("t", '{"k":["é",1]}'.encode(), id="x")]
    for cut in range(1, len(line)):
        reader = RequestReader()
        assert_frames(reader.feed(line[:cut]) + reader.feed(line[cut:]), want)


def test_chunk_of_only_a_newline_ends_the_line() -> None:
    reader = RequestReader()
    assert reader.feed(b'{"action":"ping"') == []
    [error] = reader.feed(b"\n")
    assert isinstance(error, RequestError)
    assert error.code is ErrorCode.BAD_JSON


# ---------------------------------------------------------------------------
# A complete object with no newline after it


def test_object_without_newline_is_read_at_once() -> None:
    reader = RequestReader()
    assert_frames(reader.feed(b'{"action":"ping"}'), [Ping()])
    assert_frames(reader.feed(b'\n{"action":"status","id":1}\n'), [Status(1)])


def test_objects_without_any_newlines() -> None:
    reader = RequestReader()
    assert_frames(reader.feed(b'{"action":"ping"}'), [Ping()])
    assert_frames(reader.feed(b'{"action":"status"}'), [Status()])
    assert_frames(reader.feed(b' {"action":"ping","id":2}  '), [Ping(2)])


def test_bad_object_without_newline_is_answered_at_once() -> None:
    reader = RequestReader()
    [error] = reader.feed(b'{"action":"nope"}')
    assert isinstance(error, RequestError)
    assert error.code is ErrorCode.UNKNOWN_ACTION
    assert reader.feed(b"\n") == []


@pytest.mark.parametrize(
    ("first", "rest", "frame"),
    [
        pytest.param(
            b'{"action":"publish","topic":"t","message":{"a":{"b":1}}',
            b"}\n",
            Publish("t", b'{"a":{"b":1}}'),
            id="inner-object-closed",
        ),
        pytest.param(
            b'{"action":"publish","topic":"t","message":"}',
            b'"}\n',
            Publish("t", b'"}"'),
            id="brace-inside-a-string",
        ),
        pytest.param(
            b'{"action":"publish","topic":"t","message":"a\\"}',
            b'"}\n',
            Publish("t", b'"a\\"}"'),
            id="escaped-quote-before-brace",
        ),
    ],
)
def test_unfinished_object_ending_in_brace_waits(first: bytes, rest: bytes, frame: Request) -> None:
    reader = RequestReader()
    assert reader.feed(first) == []
    assert_frames(reader.feed(rest), [frame])


def test_invalid_line_ending_in_brace_is_one_error() -> None:
    reader = RequestReader()
    assert reader.feed(b'{"action":"ping",}') == []
    [error] = reader.feed(b"\n")
    assert isinstance(error, RequestError)
    assert error.code is ErrorCode.BAD_JSON


def test_object_then_more_on_the_same_line() -> None:
    # In one read the line is invalid; across reads the object was already answered
    # and the rest is a line of its own. Either way the client gets an error.
    whole = RequestReader().feed(b'{"action":"ping"} x\n')
    assert [type(item) for item in whole] == [RequestError]
    reader = RequestReader()
    assert_frames(reader.feed(b'{"action":"ping"}'), [Ping()])
    [error] = reader.feed(b" x\n")
    assert isinstance(error, RequestError)
    assert error.code is ErrorCode.BAD_JSON


class CountingLoads:
    """Wraps the codec's ``loads`` to count the calls."""

    def __init__(self, loads: Callable[[bytes | str], Any]) -> None:
        self.loads = loads
        self.calls = 0

    def __call__(self, data: bytes | str) -> Any:
        self.calls += 1
        return self.loads(data)


@pytest.fixture
def counting_loads(monkeypatch: pytest.MonkeyPatch) -> CountingLoads:
    counter = CountingLoads(vars(codec)["loads"])  # the json_backend fixture's
    monkeypatch.setattr(codec, "loads", counter)
    return counter


def test_reads_not_ending_in_brace_never_reparse(counting_loads: CountingLoads) -> None:
    reader = RequestReader()
    reader.feed(b'{"action":"publish","topic":"t","message":"')
    for _ in range(1000):
        assert reader.feed(b"x" * 100) == []
    assert counting_loads.calls == 0


def test_trickled_braces_are_tried_a_bounded_number_of_times(
    counting_loads: CountingLoads,
) -> None:
    reader = RequestReader()
    reader.feed(b'{"action":"publish","topic":"t","message":"')
    for _ in range(1000):
        assert reader.feed(b"}") == []
    tries = counting_loads.calls
    assert 1 <= tries <= 10
    [frame] = reader.feed(b'"}\n')
    assert frame == Publish("t", json.dumps("}" * 1000).encode())
    # A new line gets its own tries.
    assert_frames(reader.feed(b'{"action":"ping"}'), [Ping()])


def test_object_completed_after_failed_tries_is_read_early() -> None:
    reader = RequestReader()
    assert reader.feed(b'{"action":"publish","topic":"t","message":{"a":{"b":{}}') == []
    assert reader.feed(b"}") == []
    assert_frames(reader.feed(b"}"), [Publish("t", b'{"a":{"b":{}}}')])


# ---------------------------------------------------------------------------
# The size cap

LIMIT: Final = 64
X65: Final = b"x" * (LIMIT + 1)
X100: Final = b"x" * 100
TooLong = LineTooLong


def request_of_length(length: int) -> bytes:
    prefix = b'{"action":"publish","topic":"t","message":"'
    line = prefix + b"x" * (length - len(prefix) - 2) + b'"}'
    assert len(line) == length
    return line


def assert_too_large(item: object, limit: int = LIMIT) -> None:
    assert isinstance(item, RequestError)
    assert item.code is ErrorCode.TOO_LARGE
    assert f"limit of {limit} bytes" in item.text


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_LINE_BYTES == 1024 * 1024
    reader = RequestReader()
    assert reader.max_line_bytes == DEFAULT_MAX_LINE_BYTES
    [ok] = reader.feed(request_of_length(DEFAULT_MAX_LINE_BYTES) + b"\n")
    assert isinstance(ok, Publish)
    [too_large] = reader.feed(request_of_length(DEFAULT_MAX_LINE_BYTES + 1) + b"\n")
    assert_too_large(too_large, DEFAULT_MAX_LINE_BYTES)


def test_line_at_the_limit_is_read() -> None:
    [frame] = RequestReader(LIMIT).feed(request_of_length(LIMIT) + b"\n")
    assert isinstance(frame, Publish)


def test_line_at_the_limit_byte_by_byte() -> None:
    reader = RequestReader(LIMIT)
    out: list[Request | RequestError] = []
    for chunk in _chunks(request_of_length(LIMIT) + b"\n", 1):
        out += reader.feed(chunk)
    assert [type(item) for item in out] == [Publish]


def test_line_over_the_limit_is_one_error_then_reading_goes_on() -> None:
    reader = RequestReader(LIMIT)
    out = reader.feed(request_of_length(LIMIT + 1) + b'\n{"action":"ping"}\n')
    assert len(out) == 2
    assert_too_large(out[0])
    assert_frames(out[1:], [Ping()])
    assert_frames(reader.feed(b'{"action":"status"}\n'), [Status()])


def test_limit_counts_bytes_not_characters() -> None:
    line = b'{"action":"publish","topic":"t","message":"'
    line += "é".encode() * ((LIMIT - len(line) - 1) // 2) + b'"}'
    assert len(line) == LIMIT + 1
    [error] = RequestReader(LIMIT).feed(line + b"\n")
    assert_too_large(error)


@pytest.mark.parametrize("size", [1, 5, 63, 64, 65, 200])
def test_overlong_line_in_small_chunks_without_newline(size: int) -> None:
    reader = RequestReader(LIMIT)
    out: list[Request | RequestError] = []
    for chunk in _chunks(b'{"action":"publish","topic":"t","message":"' + b"x" * 5000, size):
        out += reader.feed(chunk)
    assert len(out) == 1
    assert_too_large(out[0])
    out = reader.feed(b'xx"}\n{"action":"ping"}\n')
    assert_frames(out, [Ping()])


@pytest.mark.parametrize("size", [1, 5, 63, 64, 65, 200])
def test_buffer_never_holds_more_than_the_limit(size: int) -> None:
    lines = LineBuffer(LIMIT)
    out: list[bytes | LineTooLong] = []
    for chunk in _chunks(b"y" * 5000, size):
        out += lines.feed(chunk)
        assert len(lines.partial) <= LIMIT
    [too_long] = out
    assert isinstance(too_long, LineTooLong)
    assert too_long.head == b"y" * len(too_long.head)
    assert LIMIT < len(too_long.head) <= LIMIT + size
    assert lines.feed(b"still the same line") == []
    assert lines.partial == b""
    assert lines.feed(b"end\nnext\npart") == [b"next"]
    assert lines.partial == b"part"


@pytest.mark.parametrize(
    ("chunks", "want"),
    [
        pytest.param([b"x" * LIMIT + b"\n"], [b"x" * LIMIT], id="at-limit"),
        pytest.param([b"x" * 40, b"x" * 24, b"\n"], [b"x" * LIMIT], id="at-limit-in-pieces"),
        pytest.param([X65 + b"\nok\n"], [TooLong(X65), b"ok"], id="over-in-chunk"),
        pytest.param([b"x" * 60, b"xxxxx\nok\n"], [TooLong(X65), b"ok"], id="over-when-completed"),
        pytest.param(
            [b"x" * 60, b"xxxxx", b"xx\nok\n"], [TooLong(X65), b"ok"], id="over-while-partial"
        ),
        pytest.param([b"a\n" + X100], [b"a", TooLong(X100)], id="over-in-tail"),
        pytest.param(
            [X100, b"yyy", b"zz\nok\n"], [TooLong(X100), b"ok"], id="discard-across-reads"
        ),
        pytest.param(
            [X100 + b"\n" + b"y" * 100 + b"\nok\n"],
            [TooLong(X100), TooLong(b"y" * 100), b"ok"],
            id="two-overlong-lines",
        ),
        pytest.param([X100, b"\n", b"\n", b"ok\n"], [TooLong(X100), b"ok"], id="blank-after"),
        pytest.param(
            [b"z" * (TOO_LONG_HEAD_BYTES + 10) + b"\n"],
            [TooLong(b"z" * TOO_LONG_HEAD_BYTES)],
            id="head-is-capped",
        ),
        pytest.param([b"a\r\n", b"\n", b" \n", b"b"], [b"a\r", b" "], id="keeps-cr-drops-empty"),
    ],
)
def test_line_buffer(chunks: list[bytes], want: list[bytes | LineTooLong]) -> None:
    lines = LineBuffer(LIMIT)
    got = [line for chunk in chunks for line in lines.feed(chunk)]
    assert got == want
    assert len(lines.partial) <= LIMIT


def test_line_buffer_partial_and_clear() -> None:
    lines = LineBuffer()
    assert lines.feed(b'{"a"') == []
    assert lines.partial == b'{"a"'
    lines.clear_partial()
    assert lines.partial == b""
    assert lines.feed(b"b\n") == [b"b"]


@pytest.mark.parametrize("limit", [0, -1])
def test_line_buffer_needs_a_positive_limit(limit: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        LineBuffer(limit)


def test_line_too_long_keeps_the_head_of_the_line() -> None:
    assert LineTooLong(b"ab").head == b"ab"
    assert LineTooLong(b"ab") == LineTooLong(b"ab") != LineTooLong(b"a")


QUIET_HEAD = b'{"action":"publish","topic":"logs","reply":false,"message":"'


@pytest.mark.parametrize(
    ("head", "reply"),
    [
        pytest.param(QUIET_HEAD, False, id="no-reply"),
        pytest.param(
            b'{"action":"publish","topic":"a b","reply":false,"message":"', False, id="bad"
        ),
        pytest.param(b'{"action":"publish","topic":"logs","message":"', True, id="reply"),
        pytest.param(
            b'{"action":"publish","topic":"logs","reply":true,"message":"', True, id="true"
        ),
        pytest.param(b'{"action":"ping","reply":false,"message":"', True, id="not-a-publish"),
        pytest.param(b'{"message":"', True, id="no-action"),
        pytest.param(b'"', True, id="not-json"),
    ],
)
@pytest.mark.parametrize("chunk", [50, 10_000], ids=["overflows-while-partial", "whole"])
def test_an_overlong_publish_that_asked_for_no_reply_is_refused_saying_so(
    head: bytes, reply: bool, chunk: int
) -> None:
    # Its error must be told from the reply to the client's next request; the broker
    # can tell if "reply" comes before the message, as msg's client writes it.
    reader = RequestReader(LIMIT)
    stream = head + b"x" * 500 + b'","id":4}\n{"action":"ping"}\n'
    out: list[Request | RequestError] = []
    for piece in _chunks(stream, chunk):
        out += reader.feed(piece)
    assert len(out) == 2
    assert_too_large(out[0])
    assert cast(RequestError, out[0]).reply is reply
    assert_frames(out[1:], [Ping()])


def test_an_overlong_line_with_reply_after_its_message_is_answered_as_usual() -> None:
    reader = RequestReader(LIMIT)
    [error] = reader.feed(
        b'{"action":"publish","topic":"t","message":"' + b"x" * 99 + b'","reply":false}\n'
    )
    assert_too_large(error)
    assert cast(RequestError, error).reply is True
