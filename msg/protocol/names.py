"""The rule for topic and queue names.

A name is 1 to 255 characters (Unicode code points, not bytes) of printable text:
no whitespace of any kind, no control or format characters (which would make names
that look alike on screen but differ), no unpaired surrogates. Names are
case-sensitive; topics and queues are separate namespaces, so a topic and a queue may
share a name.

Reserved, so that they can get a meaning later without breaking anyone:

- a leading ``$`` marks names the broker owns. ``$dead.<queue>`` holds the messages
  of ``<queue>`` that were rejected (nack without requeue). Clients may subscribe to
  them but not publish to them.
- ``*`` and ``>`` anywhere, kept for wildcard subscriptions (as in NATS subjects).

Everything else is allowed, including ``/``, ``.``, ``..`` and ``\\``: the storage
layer encodes names before they touch the file system, so a name is never a path.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEAD_LETTER_PREFIX",
    "MAX_NAME_LENGTH",
    "VALID_NAMES",
    "dead_letter_queue",
    "name_problem",
]

# Same bound as an AMQP shortstr (RabbitMQ queue names) and as most file systems'
# file names; long enough for any name a person would type.
MAX_NAME_LENGTH: Final = 255
RESERVED_PREFIX: Final = "$"
DEAD_LETTER_PREFIX: Final = "$dead."
_WILDCARDS: Final = ("*", ">")

# Names repeat on every publish; remember the good ones rather than re-check them.
# Bounded so a client inventing names cannot grow it forever. The codec's fast path
# looks names up here directly; a name not found goes through name_problem().
VALID_NAMES: dict[str, None] = {}
_known_good = VALID_NAMES
_KNOWN_GOOD_MAX: Final = 65_536


def dead_letter_queue(queue: str) -> str:
    """The name of the queue that holds ``queue``'s rejected messages."""
    return DEAD_LETTER_PREFIX + queue


def name_problem(name: object, *, subscribing: bool = False) -> str | None:
    """Say what is wrong with ``name`` as a topic or queue name, or None if it is fine.

    ``subscribing`` allows the reserved ``$dead.`` names, which may be consumed but not
    published to.
    """
    if type(name) is str and name in _known_good:
        return None
    if subscribing and isinstance(name, str) and name.startswith(DEAD_LETTER_PREFIX):
        problem = name_problem(name[len(DEAD_LETTER_PREFIX) :])
        return None if problem is None else f"names a dead-letter queue whose queue name {problem}"
    if not isinstance(name, str):
        return f"must be a string, not {_json_type(name)}"
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
    if not name.isprintable() or " " in name:
        return "must not contain whitespace, control or format characters"
    for wildcard in _WILDCARDS:
        if wildcard in name:
            return f"must not contain {wildcard!r} (reserved for wildcards)"
    if name.startswith(RESERVED_PREFIX):
        return f"must not start with {RESERVED_PREFIX!r} (reserved for the broker)"
    if len(_known_good) >= _KNOWN_GOOD_MAX:
        _known_good.clear()
    _known_good[name] = None
    return None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
