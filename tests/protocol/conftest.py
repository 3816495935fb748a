from __future__ import annotations

from types import ModuleType

import pytest

from msg.protocol import codec
from tests.protocol.backends import BACKENDS, load_jsonlib


@pytest.fixture(params=BACKENDS)
def json_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Run the test with the codec using each JSON backend in turn."""
    module = load_jsonlib(request.param)
    for name in ("DecodeError", "EncodeError", "dumps", "loads"):
        monkeypatch.setattr(codec, name, getattr(module, name))
    return module
