"""The queue message lifecycle table."""

from __future__ import annotations

import pytest

from msg.persistence import Delivery
from msg.storage.index import LIFECYCLE, Entry, Event, LifecycleError, State, step


def test_every_state_but_done_can_move() -> None:
    sources = {state for state, _ in LIFECYCLE}
    assert sources == set(State) - {State.DONE}
    assert State.DONE not in sources


def test_the_documented_diagram_holds() -> None:
    assert LIFECYCLE[State.READY, Event.CLAIM] is State.IN_FLIGHT
    assert LIFECYCLE[State.IN_FLIGHT, Event.RELEASE] is State.READY
    assert LIFECYCLE[State.IN_FLIGHT, Event.RECLAIM] is State.READY
    settling = LIFECYCLE[State.IN_FLIGHT, Event.SETTLE]
    assert LIFECYCLE[settling, Event.ACK] is State.DONE
    assert LIFECYCLE[settling, Event.REQUEUE] is State.READY
    assert LIFECYCLE[settling, Event.DEAD] is State.DONE
    # Nobody can release or reclaim a message while its settle is being made durable.
    assert (settling, Event.RECLAIM) not in LIFECYCLE
    assert LIFECYCLE[settling, Event.RELEASE] is not State.READY


def test_a_transition_not_in_the_table_is_refused() -> None:
    entry = Entry(0, Delivery("q", "c", "m", b"1", 0.0, 1), state=State.PENDING)
    with pytest.raises(LifecycleError, match="claim"):
        step(entry, Event.CLAIM)  # still pending
    step(entry, Event.COMMIT)
    step(entry, Event.CLAIM)
    assert entry.state is State.IN_FLIGHT
