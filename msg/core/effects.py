"""What the core asks the IO layer to do.

The core never awaits. When it needs storage it appends a :class:`StoreCall` to its
list of effects: the operation to run against the store, and the core method that
takes the result. The server runs the calls in the order they were made (the store
contract needs that order) and feeds each result back, which may produce more
effects. Frames to send sit in each session's :class:`~msg.core.outbound.Outbound`;
connections to close are listed with a reason.

Store calls are batches: every publish of one loop iteration goes into one ``append``
call, every ack into one ``settle`` call, so a group commit covers them all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from msg.persistence import Store

__all__ = ["Close", "StoreCall"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoreCall(Generic[T]):
    """One storage operation and where its outcome goes."""

    name: str
    """The operation, for logs: "append", "claim", ..."""
    run: Callable[[Store], Awaitable[T]]
    done: Callable[[T], None]
    failed: Callable[[BaseException], None]
    """Called instead of ``done`` if the store raised: it did not keep its contract."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close a connection after writing what is queued for it."""

    session_id: int
    reason: str


AnyStoreCall = StoreCall[Any]
