"""Message ids.

msg makes every message id itself (the storage seam relies on it: an id is stable
across redeliveries and backends). An id is a per-run prefix plus a counter, so making
one is a string concatenation. The prefix comes from outside the core (the server
builds it from the clock and a random number), which keeps the core free of clocks
and randomness and keeps ids unique across restarts.
"""

from __future__ import annotations

import itertools
from typing import Final, Protocol

__all__ = ["IdSource", "SequentialIds"]


class IdSource(Protocol):
    """Something that makes unique message ids."""

    def next_id(self) -> str:
        """A new id, never returned before (by this source or an earlier run)."""
        ...

    def next_ids(self, count: int) -> list[str]:
        """``count`` new ids at once (the publishes of one read)."""
        ...


class SequentialIds:
    """Ids of the form ``<prefix>-<n>``: unique if the prefix is unique per run.

    ``n`` is written in base 10 so that ids of one run sort by length, then value,
    in publish order, which is easy to follow when reading logs.
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self, prefix: str) -> None:
        if not prefix or not all(c.isascii() and (c.isalnum() or c == "-") for c in prefix):
            raise ValueError("an id prefix is ASCII letters, digits and '-'")
        self._prefix = prefix + "-"
        self._counter = itertools.count(1)

    def next_id(self) -> str:
        return self._prefix + str(next(self._counter))

    def next_ids(self, count: int) -> list[str]:
        if count == 1:  # a lone publish (a quiet moment): the shortest path
            return [self._prefix + str(next(self._counter))]
        first = next(self._counter)
        # Skip the counter ahead; count >= 1, and the first number is already taken.
        self._counter = itertools.count(first + count)
        prefix = self._prefix
        ids: list[str] = []
        number = first
        end = first + count
        # A thousand consecutive numbers share all digits but the last three: each
        # block is one join of ready-made three-digit endings and one split, with no
        # int-to-text conversion per id (measured: under half the cost of formatting).
        while number < end:
            block_end = min(end, (number // 1000 + 1) * 1000)
            if number < 1000:
                ids += [prefix + str(n) for n in range(number, block_end)]
            else:
                head = prefix + str(number // 1000)
                low = number % 1000
                endings = _ENDINGS[low : low + block_end - number]
                ids += (head + ("\n" + head).join(endings)).split("\n")
            number = block_end
        return ids


_ENDINGS: Final = [f"{n:03d}" for n in range(1000)]
