"""Fixtures for the client tests: real brokers in child processes, and clients of them.

Every broker these tests start takes its storage flags from :func:`broker_args`, so
switching the whole suite to another backend is a one-line change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from msg.client import Backoff, Client
from msg.testing import BrokerProcess
from tests.client.proxy import Proxy

# Reconnect tests cut connections on purpose; a short backoff keeps them quick while
# still going through the real reconnect path.
FAST_BACKOFF = Backoff(base=0.01, cap=0.2)


@pytest.fixture
def broker_args() -> list[str]:
    """Storage flags for every broker started by these tests: the default file store."""
    return []


@pytest.fixture
def broker(tmp_path: Path, broker_args: list[str]) -> Iterator[BrokerProcess]:
    """A broker on a free port, with its own data directory."""
    with BrokerProcess(tmp_path / "data", args=broker_args) as process:
        yield process


@pytest.fixture
async def client(broker: BrokerProcess) -> AsyncIterator[Client]:
    """A client connected straight to ``broker``."""
    async with await Client.connect(broker.host, broker.port, request_timeout=10.0) as c:
        yield c


@pytest.fixture
async def other(broker: BrokerProcess) -> AsyncIterator[Client]:
    """A second client of ``broker`` (a publisher for another's subscriptions)."""
    async with await Client.connect(broker.host, broker.port) as c:
        yield c


@pytest.fixture
async def proxy(broker: BrokerProcess) -> AsyncIterator[Proxy]:
    """A TCP proxy in front of ``broker`` that a test can cut, hold and re-target."""
    async with Proxy(broker.address) as p:
        yield p


@pytest.fixture
async def proxied(proxy: Proxy) -> AsyncIterator[Client]:
    """A client that reaches the broker through ``proxy``, reconnecting quickly."""
    async with await Client.connect(
        proxy.host, proxy.port, backoff=FAST_BACKOFF, request_timeout=10.0
    ) as c:
        yield c
