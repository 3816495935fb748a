"""Both JSON backends of :mod:`msg.jsonlib`, side by side in one process.

``msg.jsonlib`` picks its backend once, at import, from ``MSG_PURE_JSON``. Reloading
it (and everything that imported from it) mid-session would leave other modules
holding the old objects, so instead each backend is loaded as a separate, private
copy of the module, and tests patch the names a module under test imported.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import pytest

import msg.jsonlib

BACKENDS = ("orjson", "json")
"""The values of ``IMPLEMENTATION``: the fast path and the standard-library path."""


@functools.cache
def load_jsonlib(implementation: str) -> ModuleType:
    """A private copy of msg.jsonlib that uses ``implementation``; skip if unavailable."""
    if implementation == "orjson" and importlib.util.find_spec("orjson") is None:
        pytest.skip("orjson is not installed")
    spec = importlib.util.spec_from_file_location(
        f"_msg_jsonlib_{implementation}", msg.jsonlib.__file__
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MSG_PURE_JSON", "1" if implementation == "json" else "0")
        spec.loader.exec_module(module)
    loaded = module.IMPLEMENTATION
    assert loaded == implementation
    return module
