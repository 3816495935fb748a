"""msg.jsonlib: orjson and the standard library, held to one behaviour.

Every table runs against both backends (a private copy of the module is loaded per
backend, see tests/protocol/backends.py), and the agreement tests compare the two
directly.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import ModuleType
from typing import Any, Final

import pytest

import msg.jsonlib
from tests.protocol.backends import BACKENDS, load_jsonlib


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> ModuleType:
    return load_jsonlib(request.param)


def both() -> tuple[ModuleType, ModuleType]:
    return load_jsonlib("orjson"), load_jsonlib("json")


def assert_same(got: object, want: object) -> None:
    """Equal with the same types (1 is not 1.0 nor True) and key order."""
    assert got == want
    assert repr(got) == repr(want)


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


# ---------------------------------------------------------------------------
# Decoding

REFUSED_LOADS: Final = [
    pytest.param(b"\xff", id="invalid-utf8-byte"),
    pytest.param(b'"\xc3"', id="truncated-utf8"),
    pytest.param(b'"\xc0\xaf"', id="overlong-utf8"),
    pytest.param(b'"\xed\xa0\x80"', id="utf8-encoded-surrogate"),
    pytest.param(b'"\xf4\x90\x80\x80"', id="beyond-unicode"),
    pytest.param(b"\xef\xbb\xbf{}", id="utf8-bom"),
    pytest.param(b'\x00"\x00a', id="utf16-bytes"),
    pytest.param(b"NaN", id="nan"),
    pytest.param(b"[NaN]", id="nan-in-array"),
    pytest.param(b"Infinity", id="infinity"),
    pytest.param(b"-Infinity", id="minus-infinity"),
    pytest.param(b"1e400", id="float-overflow"),
    pytest.param(b"-1e400", id="negative-float-overflow"),
    pytest.param(b"1" + b"0" * 400, id="400-digit-int"),
    pytest.param(b"-1" + b"0" * 5000, id="5000-digit-int"),
    pytest.param(b'"\\ud800"', id="lone-high-surrogate"),
    pytest.param(b'"\\udfff"', id="lone-low-surrogate"),
    pytest.param(b'"\\ude00\\ud83d"', id="reversed-pair"),
    pytest.param(b'"\\ud83d x"', id="high-then-text"),
    pytest.param(b'{"\\ud800":1}', id="lone-surrogate-key"),
    pytest.param(b'[1,{"a":["\\uDC00"]}]', id="lone-surrogate-nested-uppercase"),
    pytest.param('"\ud800"', id="str-holding-surrogate"),
    pytest.param(b"[" * 100_000, id="deep-arrays"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep-arrays-closed"),
    pytest.param(b'{"a":' * 100_000, id="deep-objects"),
    pytest.param(b"", id="empty"),
    pytest.param(b" \n", id="whitespace"),
    pytest.param(b"1 2", id="two-values"),
    pytest.param(b"[1,]", id="trailing-comma"),
    pytest.param(b"{'a':1}", id="single-quotes"),
    pytest.param(b'"a\x01"', id="raw-control-character"),
    pytest.param(b"01", id="leading-zero"),
    pytest.param(b"undefined", id="undefined"),
]


@pytest.mark.parametrize("data", REFUSED_LOADS)
def test_loads_refuses(backend: ModuleType, data: bytes | str) -> None:
    with pytest.raises(backend.DecodeError):
        backend.loads(data)


def test_decode_error_is_a_value_error(backend: ModuleType) -> None:
    assert issubclass(backend.DecodeError, ValueError)


LOADS: Final = [
    pytest.param(b'{"a":[1,2.5,null,true,false,"x"],"b":{}}', id="object"),
    pytest.param(b' \t\r\n{ "a" : 1 } \n', id="whitespace"),
    pytest.param(b'{"a":1,"a":2}', id="duplicate-key"),
    pytest.param(b'"\\u00e9\\ud83d\\ude00\\/\\"\\\\\\n"', id="escapes"),
    pytest.param(b'"\\\\ud800"', id="escaped-backslash-not-surrogate"),
    pytest.param('"é😀"'.encode(), id="utf8"),
    pytest.param('"é"', id="str-input"),
    pytest.param(b"18446744073709551615", id="max-uint64"),
    pytest.param(b"18446744073709551616", id="uint64-plus-one"),
    pytest.param(b"-9223372036854775808", id="min-int64"),
    pytest.param(b"-9223372036854775809", id="min-int64-minus-one"),
    pytest.param(b"100000000000000000000", id="21-digit-int"),
    pytest.param(b"-0", id="minus-zero-int"),
    pytest.param(b"-0.0", id="minus-zero-float"),
    pytest.param(b"1E2", id="exponent"),
    pytest.param(b"1e-400", id="underflow"),
    pytest.param(b"5e-324", id="smallest-subnormal"),
    pytest.param(b"1.7976931348623157e308", id="largest-double"),
    pytest.param(b"[" * 500 + b"]" * 500, id="nested-500"),
]


@pytest.mark.parametrize("data", LOADS)
def test_loads_agree(data: bytes | str) -> None:
    fast, pure = both()
    assert_same(pure.loads(data), fast.loads(data))


@pytest.mark.parametrize(
    ("data", "value"),
    [
        pytest.param(b"18446744073709551615", 2**64 - 1, id="max-uint64-is-int"),
        pytest.param(b"18446744073709551616", 2.0**64, id="beyond-is-float"),
        pytest.param(b"-9223372036854775809", -(2.0**63), id="below-is-float"),
        pytest.param(b"-0", 0, id="minus-zero-int"),
        pytest.param(b"1E2", 100.0, id="exponent-is-float"),
        pytest.param(b'"\\ud83d\\ude00"', "😀", id="surrogate-pair"),
    ],
)
def test_loads_values(backend: ModuleType, data: bytes, value: object) -> None:
    assert_same(backend.loads(data), value)


# ---------------------------------------------------------------------------
# Encoding


class Unencodable:
    pass


def circular() -> list[Any]:
    value: list[Any] = []
    value.append(value)
    return value


REFUSED_DUMPS: Final = [
    pytest.param(lambda: "\ud800", id="lone-surrogate"),
    pytest.param(lambda: {"k": ["x\udc00"]}, id="nested-lone-surrogate"),
    pytest.param(lambda: {"\ud800": 1}, id="lone-surrogate-key"),
    pytest.param(lambda: {1, 2}, id="set"),
    pytest.param(lambda: Unencodable(), id="object"),
    pytest.param(lambda: b"bytes", id="bytes"),
    pytest.param(circular, id="circular"),
    pytest.param(lambda: nested(100_000), id="deep"),
]


@pytest.mark.parametrize("make", REFUSED_DUMPS)
def test_dumps_refuses(backend: ModuleType, make: Any) -> None:
    value = make()
    with pytest.raises(backend.EncodeError):
        backend.dumps(value)
    # orjson's error is a TypeError, the standard library's kind is ValueError.
    with pytest.raises(TypeError):
        backend.dumps(value)


DUMPS: Final = [
    pytest.param(
        {"a": 1, "b": [True, False, None], "c": {}},
        b'{"a":1,"b":[true,false,null],"c":{}}',
        id="object",
    ),
    pytest.param((1, "two"), b'[1,"two"]', id="tuple"),
    pytest.param("é😀\u2028", '"é😀\u2028"'.encode(), id="non-ascii-raw"),
    pytest.param("\x00\x1f\x7f", b'"\\u0000\\u001f\x7f"', id="control-characters"),
    pytest.param('"\\/\n\t', b'"\\"\\\\/\\n\\t"', id="escapes"),
    pytest.param("</script>", b'"</script>"', id="no-html-escaping"),
    pytest.param(1.0, b"1.0", id="integral-float"),
    pytest.param(0.1, b"0.1", id="float"),
    pytest.param(-0.0, b"-0.0", id="minus-zero"),
    pytest.param(1e16, b"1e+16", id="large-float"),
    pytest.param(1e300, b"1e+300", id="huge-float"),
    pytest.param(2.5e-10, b"2.5e-10", id="tiny-float"),
    pytest.param(2**63, b"9223372036854775808", id="beyond-int64"),
    pytest.param(2**64 - 1, b"18446744073709551615", id="max-uint64"),
    pytest.param(-(2**63), b"-9223372036854775808", id="min-int64"),
    pytest.param(True, b"true", id="true"),
    pytest.param(None, b"null", id="null"),
    pytest.param(math.nan, b"null", id="nan-is-null"),
    pytest.param(math.inf, b"null", id="infinity-is-null"),
    pytest.param({"x": [1.5, -math.inf]}, b'{"x":[1.5,null]}', id="nested-infinity"),
    pytest.param(nested(200), b"[" * 201 + b"]" * 201, id="nested-200"),
]


@pytest.mark.parametrize(("value", "data"), DUMPS)
def test_dumps(backend: ModuleType, value: object, data: bytes) -> None:
    assert backend.dumps(value) == data


@pytest.mark.parametrize("value", [1e-5, 1e-7, -1e-9, 1.5e-8])
def test_small_floats_are_spelt_differently_but_mean_the_same(value: float) -> None:
    fast, pure = both()
    assert fast.loads(fast.dumps(value)) == pure.loads(pure.dumps(value)) == value


@pytest.mark.parametrize(("value", "data"), DUMPS)
def test_round_trip(backend: ModuleType, value: object, data: bytes) -> None:
    decoded = backend.loads(backend.dumps(value))
    assert backend.dumps(decoded) == data


# ---------------------------------------------------------------------------
# Choosing the backend


@pytest.mark.parametrize(
    ("setting", "implementation"),
    [
        pytest.param("1", "json", id="set"),
        pytest.param("yes", "json", id="any-value"),
        pytest.param("0", "orjson", id="zero"),
        pytest.param("", "orjson", id="empty"),
        pytest.param(None, "orjson", id="unset"),
    ],
)
def test_msg_pure_json_is_read_at_import(setting: str | None, implementation: str) -> None:
    if implementation == "orjson":
        load_jsonlib("orjson")  # skips when orjson is not installed
    env = {key: value for key, value in os.environ.items() if key != "MSG_PURE_JSON"}
    if setting is not None:
        env["MSG_PURE_JSON"] = setting
    result = subprocess.run(
        [sys.executable, "-c", "import msg.jsonlib as j; print(j.IMPLEMENTATION)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert result.stdout.strip() == implementation


def test_process_backend_is_one_of_the_two() -> None:
    assert msg.jsonlib.IMPLEMENTATION in BACKENDS
