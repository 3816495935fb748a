"""The rings of the architecture, checked: which package may import which.

protocol imports no other ring; the core imports protocol and the storage seam's
value types, never IO; storage never imports protocol or core; the client never
imports the broker's internals. A violation here is a design regression, not a style
nit: it is how a god class starts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MSG = Path(__file__).resolve().parents[1] / "msg"

# package -> imports it must never make (module prefixes)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "protocol": (
        "msg.core",
        "msg.storage",
        "msg.persistence",
        "msg.broker",
        "msg.client",
        "asyncio",
        "socket",
    ),
    "core": (
        "msg.storage",
        "msg.broker",
        "msg.client",
        "asyncio",
        "socket",
        "os",
        "time",
        "threading",
    ),
    "storage": ("msg.protocol", "msg.core", "msg.broker", "msg.client"),
    "client": ("msg.core", "msg.storage", "msg.persistence", "msg.broker"),
}
SINGLE_FILES: dict[str, tuple[str, ...]] = {
    "persistence.py": ("msg.protocol", "msg.core", "msg.broker", "msg.client", "msg.storage"),
    "errors.py": ("msg",),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _cases() -> list[tuple[Path, tuple[str, ...]]]:
    cases = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((MSG / package).rglob("*.py")):
            cases.append((path, forbidden))
    for name, forbidden in SINGLE_FILES.items():
        cases.append((MSG / name, forbidden))
    return cases


@pytest.mark.parametrize(("path", "forbidden"), _cases(), ids=lambda v: getattr(v, "name", ""))
def test_module_respects_its_ring(path: Path, forbidden: tuple[str, ...]) -> None:
    bad = sorted(
        name
        for name in _imports(path)
        for prefix in forbidden
        if name == prefix or name.startswith(prefix + ".")
    )
    assert not bad, f"{path.relative_to(MSG.parent)} imports {bad}"


def test_every_ring_has_modules() -> None:
    for package in FORBIDDEN:
        assert list((MSG / package).glob("*.py")), package
