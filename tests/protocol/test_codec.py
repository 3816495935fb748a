"""Request lines to request frames: one table of good lines, one of bad ones.

Every test runs once per JSON backend (the ``json_backend`` fixture), because the
codec must read the same bytes the same way with orjson and with the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final, cast

import pytest

from msg.protocol.codec import RequestReader, encode_error, encode_request, parse_request
from msg.protocol.codes import ErrorCode
from msg.protocol.frames import (
    DEFAULT_PREFETCH,
    MAX_PREFETCH,
    Ack,
    AckMode,
    JsonScalar,
    Mode,
    Nack,
    Ping,
    Publish,
    Request,
    RequestError,
    Status,
    Subscribe,
    Unsubscribe,
)

pytestmark = pytest.mark.usefixtures("json_backend")

ACTIONS: Final = ("publish", "subscribe", "unsubscribe", "ack", "nack", "ping", "status")


def read(line: bytes) -> list[Request | RequestError]:
    """Feed one line, with its newline, to a fresh reader."""
    return RequestReader().feed(line + b"\n")


def req(**fields: Any) -> bytes:
    """A request line built by the standard library (an encoder independent of msg's)."""
    return json.dumps(fields).encode()


def assert_frames(got: Sequence[object], want: Sequence[object]) -> None:
    """Equal, and equal in repr: ``Ping(id=1) == Ping(id=True)``, but they differ."""
    assert got == want
    assert repr(got) == repr(want)


# ---------------------------------------------------------------------------
# Good requests. Each line is canonical: compact, in the order encode_request writes
# its fields, non-ASCII as UTF-8, so the same table also checks the client's encoder.

CANONICAL: Final = [
    # publish
    pytest.param(
        b'{"action":"publish","topic":"news","message":"hello"}',
        Publish("news", b'"hello"', Mode.PUBSUB, None),
        id="publish-defaults-to-pubsub",
    ),
    pytest.param(
        b'{"action":"publish","topic":"news","message":"hello","mode":"pubsub"}',
        Publish("news", b'"hello"', Mode.PUBSUB),
        id="publish-pubsub",
    ),
    pytest.param(
        b'{"action":"publish","topic":"jobs","message":{"n":1},"mode":"queue"}',
        Publish("jobs", b'{"n":1}', Mode.QUEUE),
        id="publish-queue",
    ),
    pytest.param(
        b'{"action":"publish","id":"p1","topic":"jobs","message":[1,2],"mode":"queue"}',
        Publish("jobs", b"[1,2]", Mode.QUEUE, "p1"),
        id="publish-every-field",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":{"a":1,"b":[true,false,null],"c":{}}}',
        Publish("t", b'{"a":1,"b":[true,false,null],"c":{}}'),
        id="publish-message-object",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":[]}',
        Publish("t", b"[]"),
        id="publish-message-empty-array",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":42}',
        Publish("t", b"42"),
        id="publish-message-int",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":-1.5}',
        Publish("t", b"-1.5"),
        id="publish-message-float",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":0}',
        Publish("t", b"0"),
        id="publish-message-zero",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":true}',
        Publish("t", b"true"),
        id="publish-message-true",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":false}',
        Publish("t", b"false"),
        id="publish-message-false",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":""}',
        Publish("t", b'""'),
        id="publish-message-empty-string",
    ),
    pytest.param(
        '{"action":"publish","topic":"t","message":"héllo 世界 😀"}'.encode(),
        Publish("t", '"héllo 世界 😀"'.encode()),
        id="publish-message-unicode",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":"a\\nb\\t\\"q\\" \\\\ \\u0001"}',
        Publish("t", b'"a\\nb\\t\\"q\\" \\\\ \\u0001"'),
        id="publish-message-escapes",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":18446744073709551615}',
        Publish("t", b"18446744073709551615"),
        id="publish-message-max-uint64",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":-9223372036854775808}',
        Publish("t", b"-9223372036854775808"),
        id="publish-message-min-int64",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","reply":false,"message":1}',
        Publish("t", b"1", reply=False),
        id="publish-no-reply",
    ),
    pytest.param(
        b'{"action":"publish","topic":"a.b/c/../d\\\\e","message":1}',
        Publish("a.b/c/../d\\e", b"1"),
        id="publish-topic-punctuation-is-not-a-path",
    ),
    pytest.param(
        '{"action":"publish","topic":"日本語.événements","message":1}'.encode(),
        Publish("日本語.événements", b"1"),
        id="publish-topic-unicode",
    ),
    pytest.param(
        b'{"action":"publish","topic":"' + b"x" * 255 + b'","message":1}',
        Publish("x" * 255, b"1"),
        id="publish-topic-255-chars",
    ),
    pytest.param(
        ('{"action":"publish","topic":"' + "é" * 255 + '","message":1}').encode(),
        Publish("é" * 255, b"1"),
        id="publish-topic-255-code-points-510-bytes",
    ),
    pytest.param(
        b'{"action":"publish","topic":"a$","message":1}',
        Publish("a$", b"1"),
        id="publish-topic-dollar-not-leading",
    ),
    # subscribe
    pytest.param(
        b'{"action":"subscribe","topic":"news"}',
        Subscribe("news", Mode.PUBSUB, AckMode.AUTO, DEFAULT_PREFETCH, None, None),
        id="subscribe-defaults",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"news","mode":"pubsub","ack":"auto"}',
        Subscribe("news"),
        id="subscribe-explicit-defaults",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"jobs","mode":"queue"}',
        Subscribe("jobs", Mode.QUEUE, AckMode.AUTO, DEFAULT_PREFETCH),
        id="subscribe-queue",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"jobs","mode":"queue","ack":"manual","prefetch":1}',
        Subscribe("jobs", Mode.QUEUE, AckMode.MANUAL, 1),
        id="subscribe-queue-manual-prefetch-1",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"jobs","mode":"queue","prefetch":65535}',
        Subscribe("jobs", Mode.QUEUE, prefetch=MAX_PREFETCH),
        id="subscribe-prefetch-max",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"news","durable":"d1"}',
        Subscribe("news", durable="d1"),
        id="subscribe-durable-auto",
    ),
    pytest.param(
        b'{"action":"subscribe","id":"s1","topic":"news","mode":"pubsub","ack":"manual",'
        b'"prefetch":10,"durable":"d1"}',
        Subscribe("news", Mode.PUBSUB, AckMode.MANUAL, 10, "d1", "s1"),
        id="subscribe-every-field",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"$dead.jobs","mode":"queue","ack":"manual"}',
        Subscribe("$dead.jobs", Mode.QUEUE, AckMode.MANUAL),
        id="subscribe-dead-letter-queue",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"$dead.' + b"q" * 255 + b'","mode":"queue"}',
        Subscribe("$dead." + "q" * 255, Mode.QUEUE),
        id="subscribe-dead-letter-of-longest-queue-name",
    ),
    # unsubscribe
    pytest.param(
        b'{"action":"unsubscribe","topic":"news"}',
        Unsubscribe("news", Mode.PUBSUB, None, None),
        id="unsubscribe-defaults",
    ),
    pytest.param(
        b'{"action":"unsubscribe","topic":"jobs","mode":"queue"}',
        Unsubscribe("jobs", Mode.QUEUE),
        id="unsubscribe-queue",
    ),
    pytest.param(
        b'{"action":"unsubscribe","id":9,"topic":"news","mode":"pubsub","durable":"d1"}',
        Unsubscribe("news", Mode.PUBSUB, "d1", 9),
        id="unsubscribe-every-field",
    ),
    pytest.param(
        b'{"action":"unsubscribe","topic":"$dead.jobs","mode":"queue"}',
        Unsubscribe("$dead.jobs", Mode.QUEUE),
        id="unsubscribe-dead-letter-queue",
    ),
    # ack / nack
    pytest.param(
        b'{"action":"ack","message_id":"m-1"}',
        Ack("m-1", None),
        id="ack",
    ),
    pytest.param(
        b'{"action":"ack","id":"a","message_id":"' + b"m" * 128 + b'"}',
        Ack("m" * 128, "a"),
        id="ack-longest-message-id",
    ),
    pytest.param(
        b'{"action":"ack","message_id":"Z9kq2-0-17"}',
        Ack("Z9kq2-0-17"),
        id="ack-letters-digits-dashes",
    ),
    pytest.param(
        b'{"action":"nack","message_id":"m-1"}',
        Nack("m-1", True, None),
        id="nack-requeues-by-default",
    ),
    pytest.param(
        b'{"action":"nack","message_id":"m-1","requeue":true}',
        Nack("m-1", True),
        id="nack-requeue",
    ),
    pytest.param(
        b'{"action":"nack","id":2,"message_id":"m-1","requeue":false}',
        Nack("m-1", False, 2),
        id="nack-dead-letter",
    ),
    pytest.param(
        b'{"action":"nack","message_id":"m-1","requeue":false,"reason":"bad \\"input\\" \xc3\xa9"}',
        Nack("m-1", False, None, 'bad "input" \u00e9'),
        id="nack-reason",
    ),
    pytest.param(
        b'{"action":"nack","message_id":"m-1","reason":"' + b"r" * 1000 + b'"}',
        Nack("m-1", True, None, "r" * 1000),
        id="nack-reason-longest",
    ),
    # ping / status
    pytest.param(b'{"action":"ping"}', Ping(None), id="ping"),
    pytest.param(b'{"action":"ping","id":"p"}', Ping("p"), id="ping-id"),
    pytest.param(b'{"action":"status"}', Status(None), id="status"),
    pytest.param(b'{"action":"status","id":3}', Status(3), id="status-id"),
]


@pytest.mark.parametrize(("line", "frame"), CANONICAL)
def test_request_line_decodes_to_frame(line: bytes, frame: Request) -> None:
    assert_frames(read(line), [frame])


@pytest.mark.parametrize(("line", "frame"), CANONICAL)
def test_encode_request_writes_the_line(line: bytes, frame: Request) -> None:
    fields = json.loads(line)
    action = fields.pop("action")
    assert encode_request(action, **fields) == line + b"\n"


def test_every_action_has_a_canonical_case() -> None:
    actions = {json.loads(cast(bytes, case.values[0]))["action"] for case in CANONICAL}
    assert actions == set(ACTIONS)


# Good requests in other spellings: whitespace, key order, escapes, explicit nulls,
# number forms. The payload is always re-encoded compactly.
SPELLINGS: Final = [
    pytest.param(b'{ "action" : "ping" , "id" : 1 }', Ping(1), id="spaces"),
    pytest.param(b'\t {"action":"ping"}  \t', Ping(), id="surrounding-whitespace"),
    pytest.param(
        b'{"message":{"b": 2, "a": [1, 2]},"topic":"t","action":"publish"}',
        Publish("t", b'{"b":2,"a":[1,2]}'),
        id="any-key-order-payload-compacted-in-order",
    ),
    pytest.param(
        b'{"action":"publish","topic":"caf\\u00e9","message":"\\ud83d\\ude00"}',
        Publish("café", '"😀"'.encode()),
        id="unicode-escapes-and-surrogate-pair",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":"\\/"}',
        Publish("t", b'"/"'),
        id="escaped-solidus",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":null}',
        Publish("t", b"null"),
        id="message-null",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":1E2}',
        Publish("t", b"100.0"),
        id="message-exponent-is-a-float",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":-0}',
        Publish("t", b"0"),
        id="message-minus-zero-int",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":1e-400}',
        Publish("t", b"0.0"),
        id="message-underflow-is-zero",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":100000000000000000000}',
        Publish("t", b"1e+20"),
        id="message-int-beyond-64-bits-is-a-float",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":-9223372036854775809}',
        Publish("t", b"-9.223372036854776e+18"),
        id="message-int-below-int64-is-a-float",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":' + b"[" * 200 + b"]" * 200 + b"}",
        Publish("t", b"[" * 200 + b"]" * 200),
        id="message-nested-200-levels",
    ),
    pytest.param(b'{"action":"ping","id":null}', Ping(None), id="id-null-is-no-id"),
    pytest.param(
        b'{"action":"subscribe","topic":"t","prefetch":null,"durable":null}',
        Subscribe("t"),
        id="subscribe-null-options-are-defaults",
    ),
    pytest.param(
        b'{"action":"unsubscribe","topic":"t","durable":null}',
        Unsubscribe("t"),
        id="unsubscribe-durable-null",
    ),
    pytest.param(
        b'{"action":"ping","action":"status"}',
        Status(),
        id="duplicate-key-last-wins",
    ),
    pytest.param(b'{"action":"ping"}\r', Ping(), id="carriage-return"),
]


@pytest.mark.parametrize(("line", "frame"), SPELLINGS)
def test_other_spellings_decode_to_frame(line: bytes, frame: Request) -> None:
    assert_frames(read(line), [frame])


# ---------------------------------------------------------------------------
# Ids: any JSON scalar, echoed with its type.

IDS: Final = [
    pytest.param("abc", id="str"),
    pytest.param("", id="empty-str"),
    pytest.param("ü 😀", id="unicode-str"),
    pytest.param(0, id="zero"),
    pytest.param(7, id="int"),
    pytest.param(-3, id="negative-int"),
    pytest.param(2**53 + 1, id="int-beyond-double-precision"),
    pytest.param(2**64 - 1, id="max-uint64"),
    pytest.param(1.5, id="float"),
    pytest.param(-0.25, id="negative-float"),
    pytest.param(1e300, id="large-float"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
]

MINIMAL: Final[dict[str, dict[str, Any]]] = {
    "publish": {"topic": "t", "message": 1},
    "subscribe": {"topic": "t"},
    "unsubscribe": {"topic": "t"},
    "ack": {"message_id": "m"},
    "nack": {"message_id": "m"},
    "ping": {},
    "status": {},
}


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("rid", IDS)
def test_id_is_kept_with_its_type(action: str, rid: JsonScalar) -> None:
    [frame] = read(req(action=action, id=rid, **MINIMAL[action]))
    assert not isinstance(frame, RequestError)
    assert frame.id == rid
    assert type(frame.id) is type(rid)


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("rid", IDS)
def test_id_is_echoed_in_errors(action: str, rid: JsonScalar) -> None:
    [error] = read(req(action=action, id=rid, bogus=1, **MINIMAL[action]))
    assert isinstance(error, RequestError)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.id == rid
    assert type(error.id) is type(rid)


# ---------------------------------------------------------------------------
# Bad requests: the line, the code, and words the error text must contain.

LONG: Final = "a" * 200

ERRORS: Final = [
    # bad_json: not JSON, or JSON the broker will not take apart.
    pytest.param(b"hello", ErrorCode.BAD_JSON, "not valid JSON", id="garbage"),
    pytest.param(b'{"action":"ping"', ErrorCode.BAD_JSON, "not valid JSON", id="truncated"),
    pytest.param(b'{"action":"pi', ErrorCode.BAD_JSON, "not valid JSON", id="truncated-string"),
    pytest.param(b'{"action":"ping",}', ErrorCode.BAD_JSON, "not valid JSON", id="trailing-comma"),
    pytest.param(b"{'action':'ping'}", ErrorCode.BAD_JSON, "not valid JSON", id="single-quotes"),
    pytest.param(b"{action:ping}", ErrorCode.BAD_JSON, "not valid JSON", id="bare-words"),
    pytest.param(b"\x00", ErrorCode.BAD_JSON, "not valid JSON", id="nul-byte"),
    pytest.param(
        b'{"action":"ping"} {"action":"ping"}',
        ErrorCode.BAD_JSON,
        "not valid JSON",
        id="two-objects-on-one-line",
    ),
    pytest.param(
        b'{"action":"ping","id":"a\x01b"}',
        ErrorCode.BAD_JSON,
        "not valid JSON",
        id="raw-control-character-in-string",
    ),
    pytest.param(
        b'{"action":"ping","id":"\xff"}', ErrorCode.BAD_JSON, "UTF-8", id="invalid-utf8-byte"
    ),
    pytest.param(
        b'{"action":"ping","id":"\xc0\xaf"}',
        ErrorCode.BAD_JSON,
        "UTF-8",
        id="overlong-utf8",
    ),
    pytest.param(
        b'{"action":"ping","id":"\xed\xa0\x80"}',
        ErrorCode.BAD_JSON,
        "UTF-8",
        id="utf8-encoded-surrogate",
    ),
    pytest.param(
        b'{"action":"ping","id":"\xe6\x97"}',
        ErrorCode.BAD_JSON,
        "UTF-8",
        id="truncated-utf8-sequence",
    ),
    pytest.param(
        b'\xef\xbb\xbf{"action":"ping"}', ErrorCode.BAD_JSON, "not valid JSON", id="utf8-bom"
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":NaN}',
        ErrorCode.BAD_JSON,
        "not valid JSON",
        id="nan",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":Infinity}',
        ErrorCode.BAD_JSON,
        "not valid JSON",
        id="infinity",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":-Infinity}',
        ErrorCode.BAD_JSON,
        "not valid JSON",
        id="minus-infinity",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":1e400}',
        ErrorCode.BAD_JSON,
        "double",
        id="float-overflow",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":-1e400}',
        ErrorCode.BAD_JSON,
        "double",
        id="negative-float-overflow",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":1' + b"0" * 400 + b"}",
        ErrorCode.BAD_JSON,
        "double",
        id="400-digit-integer",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":1' + b"0" * 5000 + b"}",
        ErrorCode.BAD_JSON,
        "double",
        id="5000-digit-integer",
    ),
    # A lone surrogate is well-formed JSON text but no Unicode string: orjson refuses
    # it while decoding, so both backends answer bad_json (it could never be encoded
    # into a delivery or an error reply).
    pytest.param(
        b'{"action":"publish","topic":"t","message":"\\ud800"}',
        ErrorCode.BAD_JSON,
        "surrogate",
        id="lone-high-surrogate-in-message",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":"x\\udc00"}',
        ErrorCode.BAD_JSON,
        "surrogate",
        id="lone-low-surrogate-in-message",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":"\\ude00\\ud83d"}',
        ErrorCode.BAD_JSON,
        "surrogate",
        id="surrogate-pair-reversed",
    ),
    pytest.param(
        b'{"action":"ping","id":"\\ud800"}',
        ErrorCode.BAD_JSON,
        "surrogate",
        id="lone-surrogate-in-id",
    ),
    pytest.param(
        b'{"action":"ping","\\ud800":1}',
        ErrorCode.BAD_JSON,
        "surrogate",
        id="lone-surrogate-in-key",
    ),
    pytest.param(b"[" * 100_000, ErrorCode.BAD_JSON, "depth", id="deep-array"),
    pytest.param(b'{"a":' * 100_000, ErrorCode.BAD_JSON, "depth", id="deep-object"),
    pytest.param(
        b'{"action":"publish","topic":"t","message":' + b"[" * 5000 + b"]" * 5000 + b"}",
        ErrorCode.BAD_JSON,
        "depth",
        id="deep-message",
    ),
    # bad_request: valid JSON, but not a request.
    pytest.param(b"[]", ErrorCode.BAD_REQUEST, "object, not an array", id="array"),
    pytest.param(
        b'[{"action":"ping"}]', ErrorCode.BAD_REQUEST, "object, not an array", id="array-of-request"
    ),
    pytest.param(b'"ping"', ErrorCode.BAD_REQUEST, "object, not a string", id="string"),
    pytest.param(b"1", ErrorCode.BAD_REQUEST, "object, not a number", id="int"),
    pytest.param(b"-1.5", ErrorCode.BAD_REQUEST, "object, not a number", id="float"),
    pytest.param(b"true", ErrorCode.BAD_REQUEST, "object, not a boolean", id="true"),
    pytest.param(b"null", ErrorCode.BAD_REQUEST, "object, not null", id="null"),
    pytest.param(b"{}", ErrorCode.BAD_REQUEST, "no 'action'", id="empty-object"),
    pytest.param(b'{"id":1}', ErrorCode.BAD_REQUEST, "no 'action'", id="missing-action"),
    pytest.param(b'{"action":null}', ErrorCode.BAD_REQUEST, "no 'action'", id="action-null"),
    pytest.param(
        b'{"action":1}', ErrorCode.BAD_REQUEST, "'action' must be a string", id="action-int"
    ),
    pytest.param(
        b'{"action":true}', ErrorCode.BAD_REQUEST, "'action' must be a string", id="action-bool"
    ),
    pytest.param(
        b'{"action":["ping"]}',
        ErrorCode.BAD_REQUEST,
        "'action' must be a string",
        id="action-array",
    ),
    pytest.param(
        b'{"action":{"ping":1}}',
        ErrorCode.BAD_REQUEST,
        "'action' must be a string",
        id="action-object",
    ),
    pytest.param(
        b'{"action":"ping","id":{"a":1}}',
        ErrorCode.BAD_REQUEST,
        "'id' must be a string, number or boolean",
        id="id-object",
    ),
    pytest.param(
        b'{"action":"ping","id":[1]}',
        ErrorCode.BAD_REQUEST,
        "'id' must be a string, number or boolean",
        id="id-array",
    ),
    # unknown fields, one per action
    pytest.param(
        b'{"action":"publish","topic":"t","message":1,"durable":"d"}',
        ErrorCode.BAD_REQUEST,
        "unknown field 'durable' in publish",
        id="publish-unknown-field",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","message":1}',
        ErrorCode.BAD_REQUEST,
        "unknown field 'message' in subscribe",
        id="subscribe-unknown-field",
    ),
    pytest.param(
        b'{"action":"unsubscribe","topic":"t","ack":"auto"}',
        ErrorCode.BAD_REQUEST,
        "unknown field 'ack' in unsubscribe",
        id="unsubscribe-unknown-field",
    ),
    pytest.param(
        b'{"action":"ack","message_id":"m","requeue":true}',
        ErrorCode.BAD_REQUEST,
        "unknown field 'requeue' in ack",
        id="ack-unknown-field",
    ),
    pytest.param(
        b'{"action":"nack","message_id":"m","topic":"t"}',
        ErrorCode.BAD_REQUEST,
        "unknown field 'topic' in nack",
        id="nack-unknown-field",
    ),
    pytest.param(
        b'{"action":"ping","topic":"t"}',
        ErrorCode.BAD_REQUEST,
        "unknown field 'topic' in ping; allowed fields: action, id",
        id="ping-unknown-field",
    ),
    pytest.param(
        b'{"action":"status","verbose":true}',
        ErrorCode.BAD_REQUEST,
        "unknown field 'verbose' in status",
        id="status-unknown-field",
    ),
    pytest.param(
        b'{"action":"ping","ID":1}',
        ErrorCode.BAD_REQUEST,
        "unknown field 'ID'",
        id="field-names-are-case-sensitive",
    ),
    # publish fields
    pytest.param(
        b'{"action":"publish","message":1}',
        ErrorCode.BAD_REQUEST,
        "publish needs a 'topic'",
        id="publish-missing-topic",
    ),
    pytest.param(
        b'{"action":"publish","topic":null,"message":1}',
        ErrorCode.BAD_REQUEST,
        "publish needs a 'topic'",
        id="publish-topic-null",
    ),
    pytest.param(
        b'{"action":"publish","topic":1,"message":1}',
        ErrorCode.BAD_REQUEST,
        "'topic' must be a string, not a number",
        id="publish-topic-int",
    ),
    pytest.param(
        b'{"action":"publish","topic":true,"message":1}',
        ErrorCode.BAD_REQUEST,
        "'topic' must be a string, not a boolean",
        id="publish-topic-bool",
    ),
    pytest.param(
        b'{"action":"publish","topic":["t"],"message":1}',
        ErrorCode.BAD_REQUEST,
        "'topic' must be a string, not an array",
        id="publish-topic-array",
    ),
    pytest.param(
        b'{"action":"publish","topic":{"t":1},"message":1}',
        ErrorCode.BAD_REQUEST,
        "'topic' must be a string, not an object",
        id="publish-topic-object",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t"}',
        ErrorCode.BAD_REQUEST,
        "publish needs a 'message'",
        id="publish-missing-message",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":1,"mode":"fanout"}',
        ErrorCode.BAD_REQUEST,
        '\'mode\' must be "pubsub" or "queue"',
        id="publish-mode-unknown",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":1,"mode":"QUEUE"}',
        ErrorCode.BAD_REQUEST,
        "'mode' must be",
        id="publish-mode-is-case-sensitive",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":1,"mode":1}',
        ErrorCode.BAD_REQUEST,
        "'mode' must be",
        id="publish-mode-int",
    ),
    pytest.param(
        b'{"action":"publish","topic":"t","message":1,"mode":null}',
        ErrorCode.BAD_REQUEST,
        "'mode' must be",
        id="publish-mode-null",
    ),
    # subscribe fields
    pytest.param(
        b'{"action":"subscribe"}',
        ErrorCode.BAD_REQUEST,
        "subscribe needs a 'topic'",
        id="subscribe-missing-topic",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":1.5}',
        ErrorCode.BAD_REQUEST,
        "'topic' must be a string, not a number",
        id="subscribe-topic-float",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","mode":["queue"]}',
        ErrorCode.BAD_REQUEST,
        "'mode' must be",
        id="subscribe-mode-array",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","ack":"yes"}',
        ErrorCode.BAD_REQUEST,
        '\'ack\' must be "auto" or "manual"',
        id="subscribe-ack-unknown",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","ack":true}',
        ErrorCode.BAD_REQUEST,
        "'ack' must be",
        id="subscribe-ack-bool",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","ack":null}',
        ErrorCode.BAD_REQUEST,
        "'ack' must be",
        id="subscribe-ack-null",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","mode":"queue","ack":"MANUAL"}',
        ErrorCode.BAD_REQUEST,
        "'ack' must be",
        id="subscribe-ack-is-case-sensitive",
    ),
    *(
        pytest.param(
            b'{"action":"subscribe","topic":"t","mode":"queue","prefetch":' + raw + b"}",
            ErrorCode.BAD_REQUEST,
            "'prefetch' must be an integer from 1 to 65535",
            id=f"subscribe-prefetch-{name}",
        )
        for name, raw in [
            ("zero", b"0"),
            ("negative", b"-1"),
            ("65536", b"65536"),
            ("huge", b"18446744073709551615"),
            ("string", b'"10"'),
            ("float", b"1.5"),
            ("integral-float", b"10.0"),
            ("true", b"true"),
            ("false", b"false"),
            ("array", b"[10]"),
        ]
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","durable":1}',
        ErrorCode.BAD_REQUEST,
        "durable name must be a string, not a number",
        id="subscribe-durable-int",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","durable":true}',
        ErrorCode.BAD_REQUEST,
        "durable name must be a string, not a boolean",
        id="subscribe-durable-bool",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","durable":""}',
        ErrorCode.BAD_REQUEST,
        "durable name must not be empty",
        id="subscribe-durable-empty",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","durable":"a b"}',
        ErrorCode.BAD_REQUEST,
        "durable name must not contain whitespace",
        id="subscribe-durable-space",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","durable":"$d"}',
        ErrorCode.BAD_REQUEST,
        "durable name must not start with '$'",
        id="subscribe-durable-reserved",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","durable":"' + b"d" * 256 + b'"}',
        ErrorCode.BAD_REQUEST,
        "durable name is 256 characters long",
        id="subscribe-durable-too-long",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","ack":"manual"}',
        ErrorCode.BAD_REQUEST,
        'manual acks need mode "queue" or a durable subscription',
        id="subscribe-manual-ack-plain-pubsub",
    ),
    pytest.param(
        b'{"action":"subscribe","topic":"t","mode":"queue","durable":"d"}',
        ErrorCode.BAD_REQUEST,
        "'durable' applies to pub/sub subscriptions",
        id="subscribe-durable-queue",
    ),
    # unsubscribe fields
    pytest.param(
        b'{"action":"unsubscribe"}',
        ErrorCode.BAD_REQUEST,
        "unsubscribe needs a 'topic'",
        id="unsubscribe-missing-topic",
    ),
    pytest.param(
        b'{"action":"unsubscribe","topic":[]}',
        ErrorCode.BAD_REQUEST,
        "'topic' must be a string, not an array",
        id="unsubscribe-topic-array",
    ),
    pytest.param(
        b'{"action":"unsubscribe","topic":"t","mode":"both"}',
        ErrorCode.BAD_REQUEST,
        "'mode' must be",
        id="unsubscribe-mode-unknown",
    ),
    pytest.param(
        b'{"action":"unsubscribe","topic":"t","mode":"queue","durable":"d"}',
        ErrorCode.BAD_REQUEST,
        "'durable' applies to pub/sub subscriptions",
        id="unsubscribe-durable-queue",
    ),
    pytest.param(
        b'{"action":"unsubscribe","topic":"t","durable":5}',
        ErrorCode.BAD_REQUEST,
        "durable name must be a string",
        id="unsubscribe-durable-int",
    ),
    # ack / nack fields
    *(
        pytest.param(
            b'{"action":"' + action.encode() + b'"' + raw + b"}",
            ErrorCode.BAD_REQUEST,
            f"{action} needs a 'message_id' string",
            id=f"{action}-message-id-{name}",
        )
        for action in ("ack", "nack")
        for name, raw in [
            ("missing", b""),
            ("null", b',"message_id":null'),
            ("int", b',"message_id":7'),
            ("empty", b',"message_id":""'),
            ("array", b',"message_id":["m"]'),
        ]
    ),
    *(
        pytest.param(
            b'{"action":"nack","message_id":"m","requeue":' + raw + b"}",
            ErrorCode.BAD_REQUEST,
            "'requeue' must be true or false",
            id=f"nack-requeue-{name}",
        )
        for name, raw in [
            ("string", b'"false"'),
            ("zero", b"0"),
            ("one", b"1"),
            ("null", b"null"),
        ]
    ),
    pytest.param(
        b'{"action":"nack","message_id":"m","reason":42}',
        ErrorCode.BAD_REQUEST,
        "'reason' must be a string, not a number",
        id="nack-reason-number",
    ),
    pytest.param(
        b'{"action":"nack","message_id":"m","reason":"' + b"r" * 1001 + b'"}',
        ErrorCode.BAD_REQUEST,
        "'reason' is 1001 characters long; the most is 1000",
        id="nack-reason-too-long",
    ),
    pytest.param(
        b'{"action":"ack","message_id":"' + b"m" * 129 + b'"}',
        ErrorCode.UNKNOWN_MESSAGE,
        "no message has an id that long",
        id="ack-message-id-too-long",
    ),
    # msg's ids are ASCII letters, digits and '-'; replies splice them in unescaped.
    *(
        pytest.param(
            req(action=action, message_id=message_id),
            ErrorCode.UNKNOWN_MESSAGE,
            "no message has an id like that",
            id=f"{action}-message-id-{name}",
        )
        for action in ("ack", "nack")
        for name, message_id in [
            ("quote", 'a"b'),
            ("backslash", "a\\b"),
            ("space", "a b"),
            ("newline", "a\nb"),
            ("non-ascii", "mé-1"),
            ("unicode-digit", "m-\u0663"),
            ("underscore", "m_1"),
            ("only-dashes", "--"),
        ]
    ),
    # unknown_action
    *(
        pytest.param(
            req(action=action),
            ErrorCode.UNKNOWN_ACTION,
            f"unknown action {action!r}; expected one of "
            "publish, subscribe, unsubscribe, ack, nack, ping, status",
            id=f"unknown-action-{name}",
        )
        for name, action in [
            ("word", "pub"),
            ("empty", ""),
            ("uppercase", "PING"),
            ("capitalised", "Publish"),
            ("leading-space", " ping"),
            ("trailing-space", "ping "),
            ("unicode", "pïng"),
            ("dunder", "__class__"),
        ]
    ),
    pytest.param(
        req(action=LONG),
        ErrorCode.UNKNOWN_ACTION,
        f"unknown action '{LONG[:64]}...'",
        id="unknown-action-clipped",
    ),
    # invalid_topic: the naming rule
    *(
        pytest.param(
            req(action="publish", topic=topic, message=1),
            ErrorCode.INVALID_TOPIC,
            problem,
            id=f"topic-{name}",
        )
        for name, topic, problem in [
            ("empty", "", "topic '' must not be empty"),
            ("256-chars", "x" * 256, "is 256 characters long; the limit is 255"),
            ("256-code-points", "é" * 256, "is 256 characters long; the limit is 255"),
            ("space", "a b", "topic 'a b' must not contain whitespace"),
            ("only-space", " ", "must not contain whitespace"),
            ("leading-space", " a", "must not contain whitespace"),
            ("trailing-space", "a ", "must not contain whitespace"),
            ("tab", "a\tb", "must not contain whitespace"),
            ("newline-escape", "a\nb", "must not contain whitespace"),
            ("carriage-return", "a\rb", "must not contain whitespace"),
            ("nul", "a\x00b", "control"),
            ("escape-char", "a\x1bb", "control"),
            ("delete", "a\x7fb", "control"),
            ("next-line", "a\x85b", "control"),
            ("no-break-space", "a\xa0b", "whitespace"),
            ("em-space", "a\u2003b", "whitespace"),
            ("ideographic-space", "a\u3000b", "whitespace"),
            ("line-separator", "a\u2028b", "whitespace"),
            ("paragraph-separator", "a\u2029b", "whitespace"),
            ("zero-width-space", "a\u200bb", "format characters"),
            ("zero-width-joiner", "a\u200db", "format characters"),
            ("word-joiner", "a\u2060b", "format characters"),
            ("byte-order-mark", "\ufeffa", "format characters"),
            ("right-to-left-override", "a\u202eb", "format characters"),
            ("star", "*", "must not contain '*' (reserved for wildcards)"),
            ("star-inside", "a.*.b", "must not contain '*'"),
            ("gt", ">", "must not contain '>' (reserved for wildcards)"),
            ("gt-suffix", "a.>", "must not contain '>'"),
            ("dollar", "$", "must not start with '$' (reserved for the broker)"),
            ("dollar-name", "$sys", "must not start with '$'"),
            ("publish-to-dead-letter", "$dead.jobs", "must not start with '$'"),
        ]
    ),
    pytest.param(
        req(action="publish", topic="$dead.jobs", message=1, mode="queue"),
        ErrorCode.INVALID_TOPIC,
        "must not start with '$'",
        id="topic-queue-publish-to-dead-letter",
    ),
    pytest.param(
        req(action="subscribe", topic="$dead.jobs"),
        ErrorCode.INVALID_TOPIC,
        "must not start with '$'",
        id="topic-pubsub-subscribe-to-dead-letter",
    ),
    pytest.param(
        req(action="unsubscribe", topic="$dead.jobs"),
        ErrorCode.INVALID_TOPIC,
        "must not start with '$'",
        id="topic-pubsub-unsubscribe-from-dead-letter",
    ),
    *(
        pytest.param(
            req(action="subscribe", topic=topic, mode="queue"),
            ErrorCode.INVALID_TOPIC,
            problem,
            id=f"topic-queue-subscribe-{name}",
        )
        for name, topic, problem in [
            ("dead-letter-of-nothing", "$dead.", "dead-letter queue whose queue name must not be"),
            ("dead-letter-of-dead-letter", "$dead.$dead.q", "queue name must not start with '$'"),
            ("dead-letter-of-bad-name", "$dead.a b", "queue name must not contain whitespace"),
            ("dead-letter-of-wildcard", "$dead.*", "queue name must not contain '*'"),
            ("other-reserved", "$deadq", "must not start with '$'"),
            ("dead-letter-wrong-case", "$DEAD.q", "must not start with '$'"),
            ("bad-name", "a>b", "must not contain '>'"),
        ]
    ),
    pytest.param(
        req(action="publish", topic="*" + LONG, message=1),
        ErrorCode.INVALID_TOPIC,
        f"topic '*{LONG[:63]}...' must not contain '*'",
        id="topic-clipped-in-text",
    ),
]


@pytest.mark.parametrize(("line", "code", "words"), ERRORS)
def test_bad_request_line_is_an_error(line: bytes, code: ErrorCode, words: str) -> None:
    [error] = read(line)
    assert isinstance(error, RequestError)
    assert error.code is code
    assert words in error.text
    assert len(error.text) < 300, "error texts quote at most a clipped part of the input"


def test_every_error_code_the_codec_emits_has_a_case() -> None:
    codes = {case.values[1] for case in ERRORS}
    assert codes == {
        ErrorCode.BAD_JSON,
        ErrorCode.BAD_REQUEST,
        ErrorCode.UNKNOWN_ACTION,
        ErrorCode.INVALID_TOPIC,
        ErrorCode.UNKNOWN_MESSAGE,
    }


@pytest.mark.parametrize(
    ("line", "error"),
    [
        pytest.param(
            b'{"action":"nope","id":5}',
            RequestError(ErrorCode.UNKNOWN_ACTION, "", 5),
            id="unknown-action",
        ),
        pytest.param(
            b'{"action":"nack","id":"n","message_id":"m-1","requeue":"no"}',
            RequestError(ErrorCode.BAD_REQUEST, "", "n", "m-1"),
            id="nack-echoes-message-id",
        ),
        pytest.param(
            b'{"action":"ack","message_id":"' + b"m" * 129 + b'"}',
            RequestError(ErrorCode.UNKNOWN_MESSAGE, "", None, "m" * 129),
            id="unknown-message-echoes-message-id",
        ),
        pytest.param(
            b'{"action":"ack","id":1,"message_id":2}',
            RequestError(ErrorCode.BAD_REQUEST, "", 1, None),
            id="non-string-message-id-not-echoed",
        ),
        pytest.param(
            b'{"action":"ping","id":{"x":1}}',
            RequestError(ErrorCode.BAD_REQUEST, "", None),
            id="bad-id-not-echoed",
        ),
        pytest.param(
            b'{"action":"publish","id":false,"topic":"a b","message":1}',
            RequestError(ErrorCode.INVALID_TOPIC, "", False),
            id="invalid-topic",
        ),
    ],
)
def test_error_echoes_what_it_can(line: bytes, error: RequestError) -> None:
    [got] = read(line)
    assert isinstance(got, RequestError)
    assert (got.code, got.id, got.message_id) == (error.code, error.id, error.message_id)
    assert type(got.id) is type(error.id)
    assert got.reply is True


@pytest.mark.parametrize(
    ("line", "code"),
    [
        pytest.param(
            b'{"action":"publish","id":3,"topic":"a b","reply":false,"message":1}',
            ErrorCode.INVALID_TOPIC,
            id="invalid-topic",
        ),
        pytest.param(
            b'{"action":"publish","id":3,"topic":"t","reply":false}',
            ErrorCode.BAD_REQUEST,
            id="no-message",
        ),
        pytest.param(
            b'{"action":"publish","id":3,"topic":"t","reply":false,"message":1,"x":1}',
            ErrorCode.BAD_REQUEST,
            id="unknown-field",
        ),
        pytest.param(
            b'{"action":"publish","id":3,"topic":"t","mode":"x","reply":false,"message":1}',
            ErrorCode.BAD_REQUEST,
            id="bad-mode",
        ),
    ],
)
def test_error_of_a_publish_that_asked_for_no_reply_says_so(line: bytes, code: ErrorCode) -> None:
    # Else a client that counts replies would take it for its next request's.
    [got] = read(line)
    assert isinstance(got, RequestError)
    assert (got.code, got.id, got.reply) == (code, 3, False)
    assert json.loads(encode_error(got.code, got.text, got.id, got.message_id, got.reply)) == {
        "type": "error",
        "id": 3,
        "reply": False,
        "error": got.text,
        "code": code.value,
    }


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b'{"action":"publish","topic":"t","reply":null,"message":1}', id="null"),
        pytest.param(b'{"action":"publish","topic":"t","reply":0,"message":1}', id="zero"),
        pytest.param(b'{"action":"publish","topic":"t","reply":"false","message":1}', id="string"),
        pytest.param(b'{"action":"subscribe","topic":"t","reply":false}', id="not-a-publish"),
        pytest.param(b'{"action":"ping","reply":false}', id="ping"),
    ],
)
def test_reply_is_a_publish_boolean(line: bytes) -> None:
    # Only a publish may ask for no reply, and only with false: anything else is an
    # error answered like any other (a client that asked otherwise gets its reply).
    [got] = read(line)
    assert isinstance(got, RequestError)
    assert got.code is ErrorCode.BAD_REQUEST
    assert got.reply is True


# ---------------------------------------------------------------------------
# parse_request on its own: any decoded value, never an exception.


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="none"),
        pytest.param(0, id="zero"),
        pytest.param("x", id="str"),
        pytest.param([], id="list"),
        pytest.param({"action": "publish", "topic": "t", "message": {1, 2}}, id="unencodable"),
    ],
)
def test_parse_request_turns_any_value_into_an_error(value: object) -> None:
    error = parse_request(value)
    assert isinstance(error, RequestError)
    assert error.code is ErrorCode.BAD_REQUEST


def test_deep_nesting_leaves_the_reader_usable() -> None:
    reader = RequestReader()
    out = reader.feed(b"[" * 100_000 + b"\n" + b'{"a":' * 100_000 + b'\n{"action":"ping"}\n')
    assert len(out) == 3
    assert [item.code for item in out[:2] if isinstance(item, RequestError)] == [
        ErrorCode.BAD_JSON,
        ErrorCode.BAD_JSON,
    ]
    assert_frames(out[2:], [Ping()])
