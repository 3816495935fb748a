"""Per-connection outbound frames, kept in the order the connection must see them.

Replies go out in request order, and a subscription's messages never overtake the
reply that confirmed it. Some replies can only be written once storage has finished
(a publish is acked when it is durable), so each request that waits on storage
*reserves* a :class:`Slot`; whatever is sent after an unfilled slot is held behind it,
and filling the slot releases everything up to the next unfilled one.

In the common case nothing is held and :meth:`Outbound.send` is one list append.
"""

from __future__ import annotations

from collections import deque

__all__ = ["Outbound", "Slot"]


class Slot:
    """A place in the outbound order for a reply that is not known yet."""

    __slots__ = ("frame",)

    def __init__(self) -> None:
        self.frame: bytes | None = None


class Outbound:
    """Frames for one connection: ``ready`` to write now, ``held`` behind a slot."""

    __slots__ = ("held", "ready", "unfilled")

    def __init__(self) -> None:
        self.ready: list[bytes] = []
        self.held: deque[bytes | Slot] = deque()
        self.unfilled = 0
        """Slots reserved and not yet filled: the connection's requests in progress."""

    def send(self, frame: bytes) -> None:
        """Queue ``frame`` after everything queued before it."""
        if self.held:
            self.held.append(frame)
        else:
            self.ready.append(frame)

    def reserve(self) -> Slot:
        """Reserve the next place in the order for a reply that comes later."""
        slot = Slot()
        self.held.append(slot)
        self.unfilled += 1
        return slot

    def fill(self, slot: Slot, frame: bytes) -> None:
        """Put ``frame`` in ``slot`` and release what no longer waits."""
        slot.frame = frame
        self.unfilled -= 1
        held = self.held
        ready = self.ready
        while held:
            head = held[0]
            if type(head) is Slot:
                answer = head.frame
                if answer is None:
                    return
                if answer:  # empty: publishes that asked for no reply, all stored
                    ready.append(answer)
            else:
                ready.append(head)  # type: ignore[arg-type]
            held.popleft()

    def take(self) -> list[bytes]:
        """Remove and return the frames that can be written now."""
        ready = self.ready
        self.ready = []
        return ready

    def held_frames(self) -> int:
        """How many frames (and slots) wait behind an unfilled slot."""
        return len(self.held)
