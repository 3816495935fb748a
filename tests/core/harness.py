"""Drive the router against a real MemoryStore with no event loop.

The memory store never suspends, so each store call's coroutine can be run to
completion with one ``send(None)``. The harness plays the server: it runs the
router's store calls in order, collects every session's frames, and tells the router
each socket drained (unless a test says a client stopped reading).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Generator
from typing import Any, TypeVar, cast

from msg.core.effects import AnyStoreCall
from msg.core.ids import SequentialIds
from msg.core.router import Router
from msg.protocol.codec import parse_request
from msg.protocol.frames import Request, RequestError
from msg.storage.memory import MemoryStore

T = TypeVar("T")


def run_now(awaitable: Awaitable[T]) -> T:
    """Run an awaitable that completes without suspending; fail if it suspends."""
    generator = cast(Generator[Any, None, T], awaitable.__await__())
    try:
        generator.send(None)
    except StopIteration as stop:
        return cast(T, stop.value)
    raise AssertionError("the store call suspended; the harness cannot run it")


def run_call(harness: Harness, call: AnyStoreCall) -> None:
    """Run one store call against the harness's store and hand back its result."""
    try:
        result = run_now(call.run(harness.store))
    except AssertionError:
        raise
    except Exception as exc:
        call.failed(exc)
    else:
        call.done(result)


class Harness:
    """A router, a memory store, and the frames each session received."""

    def __init__(self, *, now: float = 1000.0, **router_options: Any) -> None:
        self.now = now
        self.store = MemoryStore()
        self.router = Router(ids=SequentialIds("t"), now=now, **router_options)
        self.router.recovered(run_now(self.store.open()))
        self.received: dict[int, list[dict[str, Any]]] = {}
        self.stalled: set[int] = set()
        self._next_session = 0

    def connect(self, peer: str = "test") -> int:
        self._next_session += 1
        session_id = self._next_session
        self.router.connect(session_id, peer)
        self.received[session_id] = []
        return session_id

    def disconnect(self, session_id: int) -> None:
        self.router.disconnect(session_id)
        self.pump()

    def send(self, session_id: int, *requests: dict[str, Any]) -> list[dict[str, Any]]:
        """Hand the requests to the router as one batch and return the replies.

        Delivered messages stay in ``received`` for :meth:`messages`.
        """
        frames = self.exchange(session_id, *requests)
        self.received[session_id].extend(f for f in frames if f["type"] == "message")
        return [f for f in frames if f["type"] != "message"]

    def exchange(self, session_id: int, *requests: dict[str, Any]) -> list[dict[str, Any]]:
        """Like :meth:`send`, but return every new frame, messages included, in order."""
        before = len(self.received[session_id])
        frames: list[Request | RequestError] = [parse_request(r) for r in requests]
        self.router.handle(session_id, frames, self.now)
        self.pump()
        new = self.received[session_id][before:]
        del self.received[session_id][before:]
        return new

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.router.tick(self.now)
        self.pump()

    def pump(self) -> None:
        """Run store calls and collect output until nothing is left to do."""
        # In the server's order: write first, then run the store calls.
        for _ in range(10_000):
            dirty = self.router.take_dirty()
            for session in dirty:
                for chunk in session.out.take():
                    # A chunk is one or more complete lines (a reply run joins several).
                    assert chunk.endswith(b"\n")
                    for line in chunk.splitlines():
                        self.received.setdefault(session.id, []).append(json.loads(line))
                if session.id not in self.stalled:
                    self.router.drained(session.id)
            calls = self.router.take_calls()
            if not calls and not dirty:
                return
            for call in calls:
                run_call(self, call)
        raise AssertionError("the router never went quiet")

    def take(self, session_id: int) -> list[dict[str, Any]]:
        """Frames received by ``session_id`` since the last take."""
        frames = self.received[session_id]
        self.received[session_id] = []
        return frames

    def messages(self, session_id: int) -> list[dict[str, Any]]:
        """Take only the delivered messages."""
        return [f for f in self.take(session_id) if f["type"] == "message"]


def publish(topic: str, message: Any, mode: str = "pubsub", **extra: Any) -> dict[str, Any]:
    """A publish request."""
    return {"action": "publish", "topic": topic, "message": message, "mode": mode, **extra}


def subscribe(topic: str, mode: str = "pubsub", **extra: Any) -> dict[str, Any]:
    """A subscribe request."""
    return {"action": "subscribe", "topic": topic, "mode": mode, **extra}
