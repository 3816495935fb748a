"""The README's seed examples stay exactly the scripts in examples/ (which the
integration tests run against a real broker)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_examples_are_the_example_scripts_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks[0] == (ROOT / "examples" / "publish.py").read_text()
    assert blocks[1] == (ROOT / "examples" / "subscribe.py").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    first_screen = (ROOT / "README.md").read_text().splitlines()[:25]
    commands = [line for line in first_screen if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert commands[0].endswith("python -m msg")
    assert commands[1].endswith("pytest")
