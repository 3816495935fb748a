"""JSON encoding and decoding, with orjson when it is installed.

Everything in msg that turns JSON into Python values or back goes through
:func:`loads` and :func:`dumps`, so the choice of library is made once, here.
orjson is several times faster than the standard library for the small objects msg
moves; the standard library is always available and behaves the same for every
value the protocol allows.

Both paths produce compact UTF-8, byte for byte the same except that some small
floats are spelt differently (``1e-07`` for ``1e-7``, the same number), and decode
the same way. They refuse the same inputs: invalid UTF-8, NaN and infinities, numbers
that overflow a double, and strings holding lone surrogates (escaped or not).
Integers outside the 64-bit range (-2**63 to 2**64-1) decode as floats, as orjson
decodes them. Encoding writes NaN and infinities as ``null`` (as orjson and
JavaScript's ``JSON.stringify`` do) and refuses lone surrogates with
:data:`EncodeError`.

Nesting deeper than about a thousand levels fails to decode with :data:`DecodeError`
("depth limit exceeded"): orjson stops at 1024 levels, the standard library near its
recursion limit. Known differences left in place because closing them would cost
every call a walk over the value: orjson refuses to *encode* more than 254 levels of
nesting, integers outside the 64-bit range and non-string dict keys, where the
standard library encodes them.
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
    import math
    import re

    def _reject_constant(name: str) -> Any:
        # NaN and Infinity are not JSON; orjson refuses them too.
        raise ValueError(f"{name} is not valid JSON")

    def _finite_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text[:40]} does not fit a double")
        return value

    _INT_MIN: Final = -(2**63)
    _INT_MAX: Final = 2**64 - 1

    def _int(text: str) -> int | float:
        # orjson decodes integers outside [-2**63, 2**64-1] as doubles (and refuses
        # those that overflow one); so does this, so both paths give the same value.
        # JSON has no leading zeros, so more than 20 characters is always out of range
        # (and int() is never asked to convert more than 4300 digits).
        if len(text) <= 20:
            value = int(text)
            if _INT_MIN <= value <= _INT_MAX:
                return value
        return _finite_float(text)

    _decode = json.JSONDecoder(
        parse_float=_finite_float, parse_int=_int, parse_constant=_reject_constant
    ).decode
    # ensure_ascii=False, then a strict UTF-8 encode: a lone surrogate such as
    # "\ud800" then fails here, as it does in orjson, instead of being passed on.
    _encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
    # Any escape of a surrogate half; the exact check below runs only when one is present.
    _SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")

    class _StdlibEncodeError(TypeError, ValueError):
        """orjson's JSONEncodeError is a TypeError; the standard library raises ValueError
        for the same values. This is both, so either ``except`` clause catches it."""

    def _stdlib_loads(data: bytes | str) -> Any:
        if isinstance(data, bytes):
            # Strict UTF-8: json.loads(bytes) would also guess UTF-16/32.
            text = data.decode("utf-8")
        else:
            text = data
            text.encode("utf-8")  # a str holding a lone surrogate is not UTF-8 either
        try:
            value = _decode(text)
            if _SURROGATE_ESCAPE.search(text) is not None:
                # "\ud800" is a lone surrogate once decoded; orjson refuses it, and it
                # could never be encoded again. A paired escape re-encodes fine.
                _encode(value).encode("utf-8")
        except RecursionError:
            raise ValueError("depth limit exceeded") from None
        except UnicodeEncodeError:
            raise ValueError("string holds a lone surrogate escape") from None
        return value

    def _stdlib_dumps(value: Any) -> bytes:
        try:
            try:
                text = _encode(value)
            except ValueError:
                # NaN or an infinity: orjson writes null; so does this (the slow way,
                # as it never happens for values msg decoded itself).
                text = _encode(_finite_only(value))
            return text.encode("utf-8")
        except RecursionError:
            raise _StdlibEncodeError("Recursion limit reached") from None
        except (TypeError, ValueError) as exc:
            raise _StdlibEncodeError(str(exc)) from None

    def _finite_only(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: _finite_only(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [_finite_only(item) for item in value]
        return value

    DecodeError = ValueError
    EncodeError = _StdlibEncodeError
    loads = _stdlib_loads
    dumps = _stdlib_dumps
    IMPLEMENTATION: Final[str] = "json"
else:
    DecodeError = orjson.JSONDecodeError
    EncodeError = orjson.JSONEncodeError
    loads = orjson.loads
    dumps = orjson.dumps
    IMPLEMENTATION = "orjson"  # type: ignore[misc]
