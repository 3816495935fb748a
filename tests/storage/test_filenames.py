"""Queue and topic names as directory names: safe, distinct, and short enough."""

from __future__ import annotations

import random
import re

import pytest

from msg.storage.filenames import MAX_ENCODED, encode_name, segment_file_name, segment_number

SAFE = re.compile(r"[a-z0-9_.%~A-F-]+")
DEVICES = (
    {"con", "prn", "aux", "nul"}
    | {f"com{d}" for d in "0123456789"}
    | {f"lpt{d}" for d in "0123456789"}
)


def decode(encoded: str) -> str:
    return re.sub(
        r"(%[0-9A-F]{2})+",
        lambda m: bytes.fromhex(m.group(0).replace("%", "")).decode("utf-8", "surrogatepass"),
        encoded,
    )


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("orders", "orders"),
        ("a.b-c_d", "a.b-c_d"),
        ("News", "%4Eews"),
        ("../../x", "%2E.%2F..%2Fx"),
        ("/abs", "%2Fabs"),
        ("a\\b", "a%5Cb"),
        ("con", "%63on"),
        ("nul.txt", "%6Eul.txt"),
        ("CON", "%43%4F%4E"),
        ("trailing.", "trailing%2E"),
        ("é", "%C3%A9"),
        ("$dead.q", "%24dead.q"),
        ("%41", "%2541"),
    ],
)
def test_examples(name: str, encoded: str) -> None:
    assert encode_name(name) == encoded
    assert decode(encoded) == name


def names() -> list[str]:
    rng = random.Random(7)
    alphabet = "aAzZ09._-/\\%~$ é日😀\x00:"
    made = ["", ".", "..", "x" * 255, "x" * 254 + "y", "é" * 255, "日" * 255]
    made += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    made += [d.upper() for d in DEVICES] + list(DEVICES) + [d + ".txt" for d in DEVICES]
    return list(dict.fromkeys(made))


def test_every_encoding_is_a_safe_distinct_path_component() -> None:
    encoded = {name: encode_name(name) for name in names()}
    for name, result in encoded.items():
        assert SAFE.fullmatch(result), (name, result)
        assert result not in (".", "..")
        assert not result.startswith(".")
        assert not result.endswith(".")
        assert len(result) <= MAX_ENCODED + 40
        assert result.split(".")[0] not in DEVICES
        if "~" not in result:
            assert decode(result) == name
    # Distinct, also for file systems that ignore case.
    assert len({r.casefold() for r in encoded.values()}) == len(encoded)


def test_long_names_are_hashed_without_collisions() -> None:
    long = ["é" * 255, "é" * 254 + "e", "e" + "é" * 254, "x" * 255]
    results = [encode_name(n) for n in long]
    assert len(set(results)) == len(long)
    assert all("~" in r for r in results[:3])
    assert "~" in encode_name("x" * 255)


def test_segment_names_sort_numerically() -> None:
    numbers = [0, 9, 10, 123456789, 2**63]
    file_names = [segment_file_name(n) for n in numbers]
    assert sorted(file_names) == file_names
    assert [segment_number(f) for f in file_names] == numbers
    for other in (
        "meta.json",
        "cursors.log",
        "12.log",
        "0000000000000000000a.log",
        "x" * 20 + ".log",
    ):
        assert segment_number(other) is None
