"""Repository-wide pytest set-up.

- ``--slow`` selects the long versions of the durability tests (hundreds of crash
  rounds instead of tens); CI runs the short ones. Tests read it through the ``slow``
  fixture and scale their counts, so the same test runs either way.
- The seed README's test instructions install only pytest and pytest-asyncio. The
  suite is configured for pytest-timeout (every test is bounded); when that plugin is
  missing, its ini setting is registered here so the run still works, unbounded.
"""

from __future__ import annotations

import importlib.util

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        default=False,
        help="run the long versions of the durability tests (CI runs the short ones)",
    )
    if importlib.util.find_spec("pytest_timeout") is None:
        parser.addini("timeout", "per-test timeout (needs pytest-timeout)", default="0")


@pytest.fixture
def slow(request: pytest.FixtureRequest) -> bool:
    """Whether ``--slow`` was given: run the long version of this test."""
    return bool(request.config.getoption("--slow"))
