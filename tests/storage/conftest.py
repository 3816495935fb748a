"""Fixtures shared by the storage tests: every backend, built and closed the same way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import pytest

from msg.persistence import Retention, Store
from msg.storage.filestore import FileStore
from msg.storage.memory import MemoryStore

# Small segments so the contract suite also exercises rolling, segment deletion and
# segment-granular retention in the file store.
CONTRACT_SEGMENT_BYTES = 2048
DEFAULT_RETENTION = Retention()


class StoreFactory(Protocol):
    async def __call__(
        self, *, retention: Retention = ..., max_queue_messages: int | None = None
    ) -> Store: ...


@pytest.fixture(params=["memory", "file"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Build opened stores of the parametrized backend; all are closed afterwards."""
    opened: list[Store] = []

    async def make(
        *, retention: Retention = DEFAULT_RETENTION, max_queue_messages: int | None = None
    ) -> Store:
        store: Store
        if request.param == "memory":
            store = MemoryStore(retention, max_queue_messages)
        else:
            store = FileStore(
                tmp_path / f"data{len(opened)}",
                retention=retention,
                max_queue_messages=max_queue_messages,
                segment_bytes=CONTRACT_SEGMENT_BYTES,
            )
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> Store:
    return await make_store()
