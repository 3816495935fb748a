"""Durability tests: ``--slow`` runs long versions, so their time limit scales too.

A test marked ``@pytest.mark.slow_timeout(seconds)`` keeps the suite's ordinary
``timeout`` in a normal run and gets ``seconds`` under ``pytest --slow`` (hundreds of
crash rounds do not fit the default minute). pytest-timeout reads the ``timeout``
marker when the test starts, after collection, so setting it here takes effect.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow_timeout(seconds): the test's time limit under pytest --slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--slow"):
        return
    for item in items:
        marker = item.get_closest_marker("slow_timeout")
        if marker is not None:
            item.add_marker(pytest.mark.timeout(marker.args[0]))
