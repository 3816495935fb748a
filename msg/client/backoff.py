"""How long to wait before the next reconnect attempt.

A :class:`Backoff` is a small pure object: ``compute(failures)`` maps the number of
consecutive failed attempts to a delay in seconds. The delay doubles with each
failure up to a cap, and half of it is random ("equal jitter"), so a broker restart
does not see every client of a fleet come back in the same millisecond, while no
client retries in a tight loop either.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

__all__ = ["DEFAULT_BACKOFF_BASE", "DEFAULT_BACKOFF_CAP", "Backoff"]

# The first retry comes quickly: most drops are a broker restart or a proxy blip that
# is over within a fraction of a second.
DEFAULT_BACKOFF_BASE: Final = 0.05
# nats.py waits 2 s between attempts and redis-py caps its exponential backoff at
# 10 s; 5 s bounds how long a client stays away after the broker is back.
DEFAULT_BACKOFF_CAP: Final = 5.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with equal jitter and a cap.

    ``compute(n)`` is ``d/2 + random() * d/2`` where ``d = min(cap, base * 2**n)``.
    ``random`` returns a float in [0, 1); pass a constant function for tests.
    """

    base: float = DEFAULT_BACKOFF_BASE
    cap: float = DEFAULT_BACKOFF_CAP
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (0 <= self.base < math.inf and 0 <= self.cap < math.inf):
            raise ValueError("backoff base and cap must be finite, non-negative seconds")
        if self.base > self.cap:
            raise ValueError("backoff base must not exceed its cap")

    def compute(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (0 for the first retry)."""
        if failures < 0:
            raise ValueError("failures must be >= 0")
        # 2**n overflows a float near n=1024; the cap is reached long before that.
        ceiling = self.cap if failures >= 64 else min(self.cap, self.base * 2.0**failures)
        half = ceiling / 2
        return half + self.random() * half
