"""The client is IO glue over the protocol: it never imports the broker's rings."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import msg.client

FORBIDDEN = ("msg.core", "msg.storage", "msg.persistence", "msg.broker", "msg.config")
CLIENT_DIR = Path(msg.client.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_client_source_imports_no_broker_ring() -> None:
    files = sorted(CLIENT_DIR.glob("*.py"))
    assert files
    for path in files:
        bad = sorted(n for n in _imports(path) if n.startswith(FORBIDDEN))
        assert not bad, f"{path.name} imports {bad}"


def test_importing_the_client_loads_no_broker_ring() -> None:
    code = (
        "import sys, msg.client\n"
        f"print(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == "[]"
