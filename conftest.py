"""Repository-wide pytest set-up.

The seed README's test instructions install only pytest and pytest-asyncio. The
suite is configured for pytest-timeout (every test is bounded); when that plugin is
missing, its ini setting is registered here so the run still works, unbounded.
"""

from __future__ import annotations

import importlib.util

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    if importlib.util.find_spec("pytest_timeout") is None:
        parser.addini("timeout", "per-test timeout (needs pytest-timeout)", default="0")
