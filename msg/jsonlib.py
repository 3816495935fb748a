"""JSON encoding and decoding, with orjson when it is installed.

Everything in msg that turns JSON into Python values or back goes through
:func:`loads` and :func:`dumps`, so the choice of library is made once, here.
orjson is several times faster than the standard library for the small objects msg
moves; the standard library is always available and behaves the same for every
value the protocol allows.

Both paths produce compact UTF-8 and refuse the same things: invalid UTF-8, NaN and
infinities, numbers that overflow a double, and strings holding lone surrogates.
Nesting deeper than about a thousand levels fails too: orjson stops at 1024 levels,
the standard library raises ``RecursionError`` near its recursion limit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, Final

__all__ = ["IMPLEMENTATION", "DecodeError", "EncodeError", "dumps", "loads"]

# MSG_PURE_JSON=1 forces the standard library even when orjson is installed, so the
# pure path can be tested and benchmarked on a machine that has the fast extra.
_force_stdlib = os.environ.get("MSG_PURE_JSON", "") not in ("", "0")

DecodeError: type[ValueError]
EncodeError: type[Exception]
loads: Callable[[bytes | str], Any]
dumps: Callable[[Any], bytes]

try:
    if _force_stdlib:
        raise ImportError("MSG_PURE_JSON is set")
    import orjson
except ImportError:

    def _reject_constant(name: str) -> Any:
        # NaN and Infinity are not JSON; orjson refuses them too.
        raise ValueError(f"{name} is not valid JSON")

    def _finite_float(text: str) -> float:
        value = float(text)
        if value in (_INF, -_INF):
            raise ValueError(f"number {text[:40]} does not fit a double")
        return value

    _INF = float("inf")
    _decode = json.JSONDecoder(parse_float=_finite_float, parse_constant=_reject_constant).decode
    # ensure_ascii=False, then a strict UTF-8 encode: a lone surrogate such as
    # "\ud800" then fails here, as it does in orjson, instead of being passed on.
    _encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

    def _stdlib_loads(data: bytes | str) -> Any:
        if isinstance(data, bytes):
            # Strict UTF-8: json.loads(bytes) would also guess UTF-16/32.
            data = data.decode("utf-8")
        return _decode(data)

    def _stdlib_dumps(value: Any) -> bytes:
        return _encode(value).encode("utf-8")

    DecodeError = ValueError
    EncodeError = ValueError
    loads = _stdlib_loads
    dumps = _stdlib_dumps
    IMPLEMENTATION: Final[str] = "json"
else:
    DecodeError = orjson.JSONDecodeError
    EncodeError = orjson.JSONEncodeError
    loads = orjson.loads
    dumps = orjson.dumps
    IMPLEMENTATION = "orjson"  # type: ignore[misc]
