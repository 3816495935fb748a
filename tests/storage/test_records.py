"""The record format: building records, and sorting damaged bytes into good and bad."""

from __future__ import annotations

import json
import zlib

import pytest

from msg.storage import records


def line(body: bytes) -> bytes:
    return b'%b,"crc":"%08x"}' % (body, zlib.crc32(body))


def pub(seq: int, payload: bytes = b'{"k":1}', **extra: object) -> bytes:
    return b"".join(records.pub_parts(seq, f"id{seq}", 12.5, payload, **extra))  # type: ignore[arg-type]


def test_pub_record_is_json_with_checksum() -> None:
    raw = pub(7, b'{"a":[1,2,"\\n"]}')
    assert raw.endswith(b"\n")
    assert raw.count(b"\n") == 1
    record = json.loads(raw)
    assert record == {
        "op": "pub",
        "seq": 7,
        "id": "id7",
        "ts": 12.5,
        "msg": {"a": [1, 2, "\n"]},
        "crc": record["crc"],
    }
    assert int(record["crc"], 16) == zlib.crc32(raw[: raw.index(b',"crc":')])
    assert records.valid(raw[:-1])


def test_pub_round_trip_with_attempt_and_reason() -> None:
    raw = pub(3, b"[1]", attempt=2, reason='he said "no",\n"msg":')
    header, payload = records.parse_pub(raw[:-1])
    assert payload == b"[1]"
    assert header == {
        "op": "pub",
        "seq": 3,
        "id": "id3",
        "ts": 12.5,
        "att": 2,
        "why": 'he said "no",\n"msg":',
    }


def test_hostile_message_id_cannot_break_the_record() -> None:
    parts = records.pub_parts(1, 'x","msg":{"evil":1},"crc":"0', 1.0, b"2")
    raw = b"".join(parts)[:-1]
    assert records.valid(raw)
    header, payload = records.parse_pub(raw)
    assert header["id"] == 'x","msg":{"evil":1},"crc":"0'
    assert payload == b"2"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (records.ack_record, {"op": "ack", "seq": 5}),
        (records.consume_record, {"op": "con", "seq": 5}),
        (records.dead_record, {"op": "dead", "seq": 5}),
    ],
)
def test_short_records(make: object, expected: dict[str, object]) -> None:
    raw = make(5)  # type: ignore[operator]
    record = json.loads(raw)
    del record["crc"]
    assert record == expected
    assert records.valid(raw[:-1])


def test_cursor_and_requeue_records() -> None:
    assert json.loads(records.requeue_record(4, 3))["att"] == 3
    assert json.loads(records.cursor_record('a"b', 9))["name"] == 'a"b'
    assert json.loads(records.cursor_delete_record("c"))["op"] == "del"


GOOD = [pub(i) for i in range(4)]
CLEAN = b"".join(GOOD)
OFFSETS = [sum(len(r) for r in GOOD[:i]) for i in range(4)]


@pytest.mark.parametrize(
    ("data", "good", "corrupt", "torn"),
    [
        (b"", 0, [], None),
        (CLEAN, 4, [], None),
        (CLEAN[:-1], 3, [], OFFSETS[3]),  # the last newline is missing
        (CLEAN + b"\x00" * 100, 4, [], len(CLEAN)),
        (CLEAN + b"junk\nmore junk\n", 4, [], len(CLEAN)),
        (GOOD[0] + b"junk\n" + GOOD[1], 2, [(OFFSETS[1], 5)], None),
        (
            GOOD[0] + GOOD[1].replace(b"id1", b"idX") + GOOD[2],
            2,
            [(OFFSETS[1], len(GOOD[1]))],
            None,
        ),
        # A damaged newline: both records survive, the damaged byte is reported.
        (GOOD[0][:-1] + b"J" + GOOD[1], 2, [(OFFSETS[1] - 1, 1)], None),
        (GOOD[0] + b"\n" + GOOD[1], 2, [(OFFSETS[1], 1)], None),
    ],
    ids=[
        "empty",
        "clean",
        "no-newline",
        "zeros",
        "junk-lines",
        "junk-middle",
        "bad-crc",
        "newline",
        "blank",
    ],
)
def test_scan(data: bytes, good: int, corrupt: list[tuple[int, int]], torn: int | None) -> None:
    scan = records.scan(data)
    assert len(scan.records) == good
    assert scan.corrupt == corrupt
    assert scan.torn == torn
    for record, offset in zip(scan.records, scan.offsets, strict=True):
        assert data[offset : offset + len(record)] == record


def test_valid_rejects_near_misses() -> None:
    body = b'{"op":"ack","seq":1'
    assert records.valid(line(body))
    assert not records.valid(line(body)[:-1])
    assert not records.valid(line(body).replace(b'"crc"', b'"CRC"'))
    assert not records.valid(line(body).upper())
    assert not records.valid(b"")
    assert not records.valid(b'"}' * 20)


def test_meta_round_trip_and_rejections() -> None:
    assert records.parse_meta(records.meta_bytes("queue", "a/b")) == ("queue", "a/b")
    for bad in (b"", b"[]", b'{"v":2,"kind":"queue","name":"x"}', b'{"v":1,"kind":1,"name":"x"}'):
        with pytest.raises(ValueError, match=r".+"):
            records.parse_meta(bad)


@pytest.mark.parametrize(
    ("message_ids", "payloads"),
    [
        (["a", "b", "c"], [b"1", b'{"k":[1,2]}', b'"s"']),
        (["plain", 'quo"te', "back\\slash"], [b"1", b"2", b"3"]),
        (["new\nline", "tab\there", "\x00"], [b"1", b"2", b"3"]),
        (["ünïcödé", "日本語", "😀"], [b"[1]", b"[2]", b"[3]"]),
        (["m0", "m1"], [b'{\n  "a": 1\n}', b"[\n]"]),
        (["", "x"], [b"null", b"0"]),
        ([], []),
        (["del\x7f", "unit\x1fsep", "ok"], [b"1", b"2", b"3"]),
        ([f"run-{n}" for n in range(1000)], [b'"%d"' % n for n in range(1000)]),
    ],
    ids=[
        "plain",
        "escaped",
        "control",
        "unicode",
        "newline-payload",
        "empty-id",
        "empty",
        "del-and-unit-separator",
        "a-thousand",
    ],
)
def test_pub_batch_writes_what_pub_parts_writes(
    message_ids: list[str], payloads: list[bytes]
) -> None:
    for published_at in (1000.0, 1732712345.123, 1e-7):
        seqs = range(40, 40 + len(message_ids))
        data, sizes, payload_bytes = records.pub_batch(seqs, message_ids, payloads, published_at)
        one_by_one = [
            b"".join(records.pub_parts(seq, message_id, published_at, payload))
            for seq, message_id, payload in zip(seqs, message_ids, payloads, strict=True)
        ]
        assert data == b"".join(one_by_one)
        assert sizes == [len(raw) for raw in one_by_one]
        assert payload_bytes == sum(map(len, payloads))
        for raw in one_by_one:
            assert raw.count(b"\n") == 1
            assert records.valid(raw[:-1])
        # A lone message takes a path of its own.
        for seq, message_id, payload, raw in zip(
            seqs, message_ids, payloads, one_by_one, strict=True
        ):
            assert records.pub_batch([seq], [message_id], [payload], published_at) == (
                raw,
                [len(raw)],
                len(payload),
            )


def test_pub_batch_refuses_an_id_json_cannot_hold() -> None:
    with pytest.raises((TypeError, ValueError)):
        records.pub_batch(range(2), ["ok", "\ud800"], [b"1", b"2"], 1.0)
    with pytest.raises((TypeError, ValueError)):
        records.pub_batch([1], ["\ud800"], [b"1"], 1.0)


def test_batched_short_records_match_single_ones() -> None:
    seqs = [0, 7, 2**40]
    assert records.seq_records(b"ack", seqs) == [records.ack_record(s) for s in seqs]
    assert records.seq_records(b"con", seqs) == [records.consume_record(s) for s in seqs]
    assert records.seq_records(b"dead", seqs) == [records.dead_record(s) for s in seqs]
    pairs = [(0, 1), (9, 12)]
    assert records.requeue_records(pairs) == [records.requeue_record(s, a) for s, a in pairs]
