"""Fixtures that start real broker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from msg.testing import BrokerProcess


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def broker(data_dir: Path) -> Iterator[BrokerProcess]:
    """A broker with the default file storage in a temporary data dir."""
    with BrokerProcess(data_dir) as process:
        yield process
