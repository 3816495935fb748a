"""msg.storage stays below the protocol, the core, the broker and the client."""

from __future__ import annotations

import ast
from pathlib import Path

import msg.storage

FORBIDDEN = ("msg.protocol", "msg.core", "msg.broker", "msg.client")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_storage_imports_no_outer_ring() -> None:
    package = Path(msg.storage.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert modules
    for module in modules:
        for name in imported_modules(module):
            assert not name.startswith(FORBIDDEN), f"{module.name} imports {name}"
