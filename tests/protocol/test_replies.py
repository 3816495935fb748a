"""Frames to bytes: the broker's replies and the client's requests.

Each encoder is checked twice: against exact bytes for a simple case (the wire format
is a contract), and by decoding its output with the standard library for a table of
ids, texts, topics and payloads (the output is always one valid JSON line).
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any, Final, cast

import pytest

from msg.protocol.codec import (
    RequestReader,
    decode_reply,
    delivery_prefix,
    encode_ack,
    encode_delivery,
    encode_error,
    encode_reply,
    encode_request,
)
from msg.protocol.codes import ErrorCode
from msg.protocol.frames import JsonScalar, Mode, Publish, ReplyType, RequestError
from tests.protocol.test_codec import CANONICAL, ERRORS, IDS, SPELLINGS

pytestmark = pytest.mark.usefixtures("json_backend")


def decode(line: bytes) -> dict[str, Any]:
    """One reply line, decoded by the standard library; it must end in one newline."""
    assert line.endswith(b"\n")
    assert b"\n" not in line[:-1]
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def assert_same_json(got: object, want: object) -> None:
    """Equal, with the same types and the same key order (True is not 1)."""
    assert got == want
    assert repr(got) == repr(want)


# ---------------------------------------------------------------------------
# ack


@pytest.mark.parametrize(
    ("rid", "message_id", "line"),
    [
        pytest.param(None, "m-1", b'{"type":"ack","message_id":"m-1"}\n', id="no-id"),
        pytest.param("r", "m-1", b'{"type":"ack","id":"r","message_id":"m-1"}\n', id="str-id"),
        pytest.param(0, "m-1", b'{"type":"ack","id":0,"message_id":"m-1"}\n', id="zero-id"),
        pytest.param(False, "m-1", b'{"type":"ack","id":false,"message_id":"m-1"}\n', id="false"),
    ],
)
def test_encode_ack_bytes(rid: JsonScalar, message_id: str, line: bytes) -> None:
    assert encode_ack(rid, message_id) == line


@pytest.mark.parametrize("rid", IDS)
def test_encode_ack_echoes_id(rid: JsonScalar) -> None:
    assert_same_json(
        decode(encode_ack(rid, "Ab9-1")), {"type": "ack", "id": rid, "message_id": "Ab9-1"}
    )


# ---------------------------------------------------------------------------
# error


@pytest.mark.parametrize(
    ("args", "line"),
    [
        pytest.param(
            (ErrorCode.BAD_JSON, "not valid JSON"),
            b'{"type":"error","error":"not valid JSON","code":"bad_json"}\n',
            id="code-and-text",
        ),
        pytest.param(
            (ErrorCode.UNKNOWN_MESSAGE, "gone", 7, "m-1"),
            b'{"type":"error","id":7,"error":"gone","code":"unknown_message","message_id":"m-1"}\n',
            id="every-field",
        ),
        pytest.param(
            (ErrorCode.INVALID_TOPIC, "topic 'é' \"x\"\n", "i"),
            '{"type":"error","id":"i","error":"topic \'é\' \\"x\\"\\n",'
            '"code":"invalid_topic"}\n'.encode(),
            id="unicode-and-escapes",
        ),
    ],
)
def test_encode_error_bytes(args: tuple[Any, ...], line: bytes) -> None:
    assert encode_error(*args) == line


@pytest.mark.parametrize("code", list(ErrorCode))
@pytest.mark.parametrize("rid", IDS)
def test_encode_error_fields(code: ErrorCode, rid: JsonScalar) -> None:
    assert_same_json(
        decode(encode_error(code, "why ☂", rid, "m-1")),
        {"type": "error", "id": rid, "error": "why ☂", "code": code.value, "message_id": "m-1"},
    )


def test_every_request_error_can_be_sent() -> None:
    """The codec's own error texts and echoed fields always encode."""
    for case in ERRORS:
        [error] = RequestReader().feed(cast(bytes, case.values[0]) + b"\n")
        assert isinstance(error, RequestError)
        reply = decode(encode_error(error.code, error.text, error.id, error.message_id))
        assert (reply["type"], reply["code"], reply["error"]) == ("error", error.code, error.text)


def test_every_request_id_can_be_acked() -> None:
    for case in [*CANONICAL, *SPELLINGS]:
        [frame] = RequestReader().feed(cast(bytes, case.values[0]) + b"\n")
        assert not isinstance(frame, RequestError)
        assert_same_json(decode(encode_ack(frame.id, "m-1")).get("id"), frame.id)


# ---------------------------------------------------------------------------
# delivery


def test_delivery_bytes() -> None:
    prefix = delivery_prefix("t", Mode.PUBSUB)
    assert prefix == b'{"type":"message","topic":"t","mode":"pubsub","message":'
    assert encode_delivery(prefix, b'{"a":1}', "m-1") == (
        b'{"type":"message","topic":"t","mode":"pubsub","message":{"a":1},"message_id":"m-1"}\n'
    )


def test_redelivery_bytes() -> None:
    prefix = delivery_prefix("jobs", Mode.QUEUE)
    assert encode_delivery(prefix, b"1", "m-1", attempt=3) == (
        b'{"type":"message","topic":"jobs","mode":"queue","message":1,"message_id":"m-1",'
        b'"redelivered":true,"attempt":3}\n'
    )


def test_durable_delivery_bytes() -> None:
    assert delivery_prefix("t", Mode.PUBSUB, "d1") == (
        b'{"type":"message","topic":"t","mode":"pubsub","durable":"d1","message":'
    )


TOPICS: Final = [
    pytest.param("t", id="ascii"),
    pytest.param("日本語.événements", id="unicode"),
    pytest.param('q"uote\\back', id="quote-and-backslash"),
    pytest.param("😀" * 255, id="255-astral-code-points"),
    pytest.param("$dead.jobs", id="dead-letter"),
]

MESSAGES: Final = [
    pytest.param({"a": [1, 2.5, None, True, False, "x"]}, id="object"),
    pytest.param([], id="empty-array"),
    pytest.param('héllo\n"wörld" \u2028 😀', id="unicode-string"),
    pytest.param("\x00\x1f\x7f", id="control-characters"),
    pytest.param(-12, id="int"),
    pytest.param(1e-7, id="small-float"),
    pytest.param(None, id="null"),
]


@pytest.mark.parametrize("attempt", [1, 2, 17])
@pytest.mark.parametrize("durable", [None, "d", "dürable"])
@pytest.mark.parametrize("topic", TOPICS)
def test_delivery_fields(topic: str, durable: str | None, attempt: int) -> None:
    mode = Mode.PUBSUB if durable is not None else Mode.QUEUE
    frame = decode(encode_delivery(delivery_prefix(topic, mode, durable), b"[1]", "m-9", attempt))
    want: dict[str, Any] = {"type": "message", "topic": topic, "mode": mode.value}
    if durable is not None:
        want["durable"] = durable
    want |= {"message": [1], "message_id": "m-9"}
    if attempt > 1:
        want |= {"redelivered": True, "attempt": attempt}
    assert_same_json(frame, want)


@pytest.mark.parametrize("message", MESSAGES)
def test_published_message_is_delivered_unchanged(message: object) -> None:
    [publish] = RequestReader().feed(encode_request("publish", topic="t", message=message))
    assert isinstance(publish, Publish)
    prefix = delivery_prefix(publish.topic, publish.mode)
    frame = decode(encode_delivery(prefix, publish.payload, "m-1"))
    assert_same_json(frame["message"], message)


# ---------------------------------------------------------------------------
# other replies, requests, and reading replies


def test_encode_reply() -> None:
    assert encode_reply({"type": "pong", "id": 1}) == b'{"type":"pong","id":1}\n'
    status = {"type": "status", "queues": {"jobs": {"ready": 2}}, "uptime": 1.5, "é": "☂"}
    assert_same_json(decode(encode_reply(status)), status)


def test_encode_request_leaves_out_none() -> None:
    line = encode_request("subscribe", topic="t", mode=None, durable=None, prefetch=5)
    assert line == b'{"action":"subscribe","topic":"t","prefetch":5}\n'


def test_encode_request_keeps_a_null_message() -> None:
    line = encode_request("publish", id=None, topic="t", message=None)
    assert line == b'{"action":"publish","topic":"t","message":null}\n'
    assert RequestReader().feed(line) == [Publish("t", b"null")]


@pytest.mark.parametrize("rid", IDS)
def test_encode_request_keeps_id(rid: JsonScalar) -> None:
    assert_same_json(decode(encode_request("ping", id=rid)), {"action": "ping", "id": rid})


@pytest.mark.parametrize("reply_type", list(ReplyType))
def test_decode_reply(reply_type: ReplyType) -> None:
    line = f'{{"type":"{reply_type.value}","id":1,"x":"é"}}\n'.encode()
    assert_same_json(decode_reply(line), {"type": reply_type.value, "id": 1, "x": "é"})


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"[]\n", id="array"),
        pytest.param(b'"ack"\n', id="string"),
        pytest.param(b"null\n", id="null"),
        pytest.param(b"{}\n", id="no-type"),
        pytest.param(b'{"type":1}\n', id="type-not-a-string"),
        pytest.param(b'{"type":null}\n', id="type-null"),
        pytest.param(b'{"type":"ack"\n', id="truncated"),
        pytest.param(b"\xff\n", id="invalid-utf8"),
        pytest.param(b'{"type":"ack","id":NaN}\n', id="nan"),
        pytest.param(b'{"type":"message","message":"\\ud800"}\n', id="lone-surrogate"),
        pytest.param(b'{"type":"ack","x":' + b"[" * 100_000 + b"\n", id="deep-nesting"),
    ],
)
def test_decode_reply_rejects(line: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (any ValueError is the contract)
        decode_reply(line)


def test_replies_agree_across_backends(json_backend: ModuleType) -> None:
    """The bytes on the wire do not depend on which JSON library the broker has."""
    reply = encode_error(ErrorCode.BAD_REQUEST, "é ☂ \u2028 \x01", 1.5, "m-1")
    assert reply == (
        b'{"type":"error","id":1.5,"error":"\xc3\xa9 \xe2\x98\x82 \xe2\x80\xa8 \\u0001",'
        b'"code":"bad_request","message_id":"m-1"}\n'
    )
    assert json_backend.dumps(1e16) == b"1e+16"
