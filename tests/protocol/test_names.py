"""The naming rule for topics, queues and durable subscriptions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from msg.protocol import names
from msg.protocol.names import (
    DEAD_LETTER_PREFIX,
    MAX_NAME_LENGTH,
    dead_letter_queue,
    name_problem,
)

WHITESPACE_ETC = "must not contain whitespace, control or format characters"

# (name, problem when publishing, problem when subscribing); None means allowed, a
# string is text the problem must contain.
NAMES = [
    # allowed
    pytest.param("t", None, None, id="one-char"),
    pytest.param("x" * MAX_NAME_LENGTH, None, None, id="longest"),
    pytest.param("😀" * MAX_NAME_LENGTH, None, None, id="longest-astral"),
    pytest.param("orders.eu-west/2024", None, None, id="punctuation"),
    pytest.param("..", None, None, id="dot-dot"),
    pytest.param("a/../../etc/passwd", None, None, id="path-like"),
    pytest.param("C:\\x", None, None, id="backslash"),
    pytest.param('q"uote', None, None, id="quote"),
    pytest.param("日本語", None, None, id="cjk"),
    pytest.param("Straße", None, None, id="non-ascii-letter"),
    pytest.param("a$b", None, None, id="dollar-inside"),
    pytest.param("a#b+c", None, None, id="mqtt-wildcards-are-plain"),
    pytest.param("CON", None, None, id="windows-device-name"),
    # length
    pytest.param("", "must not be empty", "must not be empty", id="empty"),
    pytest.param(
        "x" * (MAX_NAME_LENGTH + 1),
        "is 256 characters long; the limit is 255",
        "is 256 characters long",
        id="too-long",
    ),
    pytest.param("é" * 256, "is 256 characters long", "is 256", id="too-long-code-points"),
    # invisible or confusable characters
    *(
        pytest.param(f"a{char}b", WHITESPACE_ETC, WHITESPACE_ETC, id=name)
        for name, char in [
            ("space", " "),
            ("tab", "\t"),
            ("newline", "\n"),
            ("carriage-return", "\r"),
            ("vertical-tab", "\v"),
            ("form-feed", "\f"),
            ("nul", "\x00"),
            ("unit-separator", "\x1f"),
            ("delete", "\x7f"),
            ("next-line", "\x85"),
            ("no-break-space", "\xa0"),
            ("ogham-space", "\u1680"),
            ("em-space", "\u2003"),
            ("narrow-no-break-space", "\u202f"),
            ("ideographic-space", "\u3000"),
            ("line-separator", "\u2028"),
            ("paragraph-separator", "\u2029"),
            ("zero-width-space", "\u200b"),
            ("zero-width-non-joiner", "\u200c"),
            ("zero-width-joiner", "\u200d"),
            ("left-to-right-mark", "\u200e"),
            ("right-to-left-override", "\u202e"),
            ("word-joiner", "\u2060"),
            ("byte-order-mark", "\ufeff"),
            ("soft-hyphen", "\xad"),
            ("lone-surrogate", "\ud800"),
            ("private-use", "\ue000"),
            ("unassigned", "\u0378"),
        ]
    ),
    pytest.param(" ", WHITESPACE_ETC, WHITESPACE_ETC, id="only-space"),
    # reserved
    pytest.param("*", "must not contain '*' (reserved", "'*'", id="star"),
    pytest.param("a.*", "must not contain '*'", "'*'", id="star-suffix"),
    pytest.param(">", "must not contain '>' (reserved", "'>'", id="gt"),
    pytest.param("a.>", "must not contain '>'", "'>'", id="gt-suffix"),
    pytest.param("$", "must not start with '$' (reserved", "must not start with '$'", id="dollar"),
    pytest.param("$sys.x", "must not start with '$'", "must not start with '$'", id="dollar-name"),
    pytest.param("$dead", "must not start with '$'", "must not start with '$'", id="dead-no-dot"),
    pytest.param(
        "$deadq", "must not start with '$'", "must not start with '$'", id="dead-no-dot-2"
    ),
    pytest.param("$DEAD.q", "must not start with '$'", "must not start with '$'", id="dead-caps"),
    # dead-letter queues: consumed, never published to
    pytest.param("$dead.jobs", "must not start with '$'", None, id="dead-letter"),
    pytest.param(
        "$dead." + "q" * MAX_NAME_LENGTH, "is 261 characters long", None, id="dead-letter-long"
    ),
    pytest.param(
        "$dead.",
        "must not start with '$'",
        "names a dead-letter queue whose queue name must not be empty",
        id="dead-letter-of-nothing",
    ),
    pytest.param(
        "$dead.$dead.q",
        "must not start with '$'",
        "queue name must not start with '$'",
        id="dead-letter-of-dead-letter",
    ),
    pytest.param("$dead.a b", WHITESPACE_ETC, "queue name " + WHITESPACE_ETC, id="dead-bad"),
    pytest.param(
        "$dead.>", "must not contain '>'", "queue name must not contain '>'", id="dead-gt"
    ),
]


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    """Every case sees the rule itself, not names remembered from other tests."""
    saved = dict(names._known_good)
    names._known_good.clear()
    yield
    names._known_good.clear()
    names._known_good.update(saved)


@pytest.mark.parametrize(("name", "publishing", "subscribing"), NAMES)
def test_name_problem(name: str, publishing: str | None, subscribing: str | None) -> None:
    for _ in range(2):  # a second time, after the first may have cached the answer
        got = name_problem(name)
        assert got is None if publishing is None else publishing in (got or "")
        got = name_problem(name, subscribing=True)
        assert got is None if subscribing is None else subscribing in (got or "")


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        pytest.param(None, "null", id="null"),
        pytest.param(True, "a boolean", id="bool"),
        pytest.param(1, "a number", id="int"),
        pytest.param(1.5, "a number", id="float"),
        pytest.param(["t"], "an array", id="list"),
        pytest.param({"t": 1}, "an object", id="dict"),
        pytest.param(b"t", "bytes", id="bytes"),
    ],
)
@pytest.mark.parametrize("subscribing", [False, True])
def test_name_must_be_a_string(value: object, kind: str, subscribing: bool) -> None:
    assert name_problem(value, subscribing=subscribing) == f"must be a string, not {kind}"


def test_subscribing_to_a_dead_letter_queue_does_not_allow_publishing_to_it() -> None:
    assert name_problem("$dead.jobs", subscribing=True) is None
    assert name_problem("$dead.jobs") is not None


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(names, "_KNOWN_GOOD_MAX", 4)
    for i in range(20):
        assert name_problem(f"topic-{i}") is None
        assert len(names._known_good) <= 4
    assert name_problem("topic-0") is None


def test_dead_letter_queue_name() -> None:
    assert DEAD_LETTER_PREFIX == "$dead."
    assert dead_letter_queue("jobs") == "$dead.jobs"
    assert name_problem(dead_letter_queue("jobs"), subscribing=True) is None
