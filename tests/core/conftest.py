"""The router harness as a fixture, for the core tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.core.harness import Harness


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    # Whatever a test did, every request that was answered "later" has been answered.
    harness.pump()
    for session_id in harness.received:
        assert harness.router.pending_replies(session_id) == 0
