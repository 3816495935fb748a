"""Broker-wide counters and the message rates derived from them.

Counters are plain integers bumped on the hot path. Rates are computed once per tick
(about a second) from the change in each counter since the previous tick, so reading
them costs nothing and a burst shows up within a second.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Counters", "Rates"]


@dataclass(slots=True)
class Counters:
    """Totals since the broker started."""

    published: int = 0
    delivered: int = 0
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    """Queue messages moved to their ``$dead.`` queue (nacked without requeue, or
    delivered ``max_deliveries`` times)."""
    rejected: int = 0
    """Publishes refused (storage full or failing, bad input is not counted)."""
    errors: int = 0
    """Error replies of any kind."""
    connections: int = 0
    """Connections accepted."""


@dataclass(slots=True)
class Rates:
    """Per-second rates over the last tick interval."""

    published: float = 0.0
    delivered: float = 0.0
    acked: float = 0.0
    _last: tuple[int, int, int] = (0, 0, 0)
    _last_time: float | None = None

    def update(self, counters: Counters, now: float) -> None:
        """Recompute the rates from ``counters`` as they stand at ``now``."""
        current = (counters.published, counters.delivered, counters.acked)
        if self._last_time is not None and now > self._last_time:
            elapsed = now - self._last_time
            self.published = (current[0] - self._last[0]) / elapsed
            self.delivered = (current[1] - self._last[1]) / elapsed
            self.acked = (current[2] - self._last[2]) / elapsed
        self._last = current
        self._last_time = now

    def as_dict(self) -> dict[str, float]:
        return {
            "published_per_s": round(self.published, 1),
            "delivered_per_s": round(self.delivered, 1),
            "acked_per_s": round(self.acked, 1),
        }
