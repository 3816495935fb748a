"""Turning queue and topic names into directory names that are always safe.

Theory of operation
-------------------
A name is whatever a client sent: ``../../x``, ``/abs``, ``CON``, ``nul.txt``,
``a\\b``, emoji, 255 characters of anything. :func:`encode_name` maps every name to a
directory name that

- is a single path component, never ``.`` or ``..``, and uses only ``[a-z0-9_.%~-]``,
  so it cannot escape the data directory on any system;
- is injective: the encoding can be decoded, except for the hashed form below, whose
  ``~`` marker no plain encoding produces;
- stays distinct on case-insensitive file systems: upper-case letters are
  percent-encoded (``News`` becomes ``%4Eews``), and escapes always use upper-case
  hex, so no two encodings differ only in case; on Unicode-normalising file systems
  (macOS) every non-ASCII byte is already an escape;
- avoids Windows' reserved device names (``con``, ``nul.txt``, ``com1``) and trailing
  dots, which Windows strips;
- fits the 255-byte limit of common file systems: an encoding longer than
  :data:`MAX_ENCODED` keeps a readable prefix and appends ``~`` and a SHA-256 of the
  name.

The true name is kept in the directory's ``meta.json``; :func:`decode_name` exists
only to rebuild a ``meta.json`` that a crash tore.
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = ["MAX_ENCODED", "decode_name", "encode_name", "segment_file_name", "segment_number"]

# Well below the 255-byte file-name limit of ext4, XFS, APFS and NTFS, leaving room for
# suffixes (".tmp", ".broken-N") that the store may add next to a directory name.
MAX_ENCODED: Final = 200
# A readable head for hashed names; the hash alone makes them unique.
_HASHED_PREFIX: Final = 120
# 128 bits of SHA-256: collisions are out of reach for any number of names.
_HASH_HEX: Final = 32

_PLAIN: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_-.")
_ESCAPES: Final = tuple(f"%{byte:02X}" for byte in range(256))
_WINDOWS_DEVICES: Final = frozenset(
    ["con", "prn", "aux", "nul"]
    + [f"com{d}" for d in "0123456789"]
    + [f"lpt{d}" for d in "0123456789"]
)

SEGMENT_SUFFIX: Final = ".log"
# Enough digits for any 64-bit number, so names sort in numeric order as text.
_SEGMENT_DIGITS: Final = 20


def encode_name(name: str) -> str:
    """The directory name for ``name`` (see the module docstring for the guarantees)."""
    # surrogatepass: a lone surrogate must still map somewhere unique, not crash.
    raw = name.encode("utf-8", "surrogatepass")
    parts = [chr(byte) if byte in _PLAIN else _ESCAPES[byte] for byte in raw]
    # A leading dot would make ".", "..", or a hidden file; a trailing one Windows drops.
    if parts and parts[0] == ".":
        parts[0] = _ESCAPES[ord(".")]
    if parts and parts[-1] == ".":
        parts[-1] = _ESCAPES[ord(".")]
    encoded = "".join(parts)
    if encoded.split(".", 1)[0] in _WINDOWS_DEVICES:
        # Escape the first letter: "con" -> "%63on"; decoding still gives back "con".
        encoded = _ESCAPES[ord(encoded[0])] + encoded[1:]
    if not encoded or len(encoded) > MAX_ENCODED:
        digest = hashlib.sha256(raw).hexdigest()[:_HASH_HEX]
        head = encoded[:_HASHED_PREFIX]
        # Do not cut an escape in half: it would read as a different byte.
        cut = head.rfind("%", len(head) - 2)
        if cut != -1:
            head = head[:cut]
        encoded = f"{head}~{digest}"
    return encoded


def decode_name(encoded: str) -> str | None:
    """The name whose encoding is ``encoded``; None for a hashed (or foreign) one."""
    if "~" in encoded:
        return None
    raw = bytearray()
    at = 0
    while at < len(encoded):
        char = encoded[at]
        if char == "%":
            try:
                raw.append(int(encoded[at + 1 : at + 3], 16))
            except ValueError:
                return None
            at += 3
        else:
            raw += char.encode("ascii", "replace")
            at += 1
    try:
        name = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    # Only an exact round trip counts: anything else is not a directory msg made.
    return name if encode_name(name) == encoded else None


def segment_file_name(number: int) -> str:
    return f"{number:0{_SEGMENT_DIGITS}d}{SEGMENT_SUFFIX}"


def segment_number(file_name: str) -> int | None:
    """The number of a segment file name, or None if it is not one."""
    stem = file_name[: -len(SEGMENT_SUFFIX)]
    if (
        file_name.endswith(SEGMENT_SUFFIX)
        and len(stem) == _SEGMENT_DIGITS
        and stem.isascii()
        and stem.isdigit()
    ):
        return int(stem)
    return None
