"""The seed README's two example scripts, run verbatim against a real broker.

The scripts connect to ``localhost:8888``; the tests run the broker on a free port, so
the only change made to the scripts' text is that port number. The subscribe script
ends with its run line commented out ("Run in another script or terminal"), so the
test appends exactly that line, uncommented.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from msg.testing import BrokerProcess

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _script(name: str, port: int, tmp_path: Path, suffix: str = "") -> Path:
    source = (EXAMPLES / name).read_text()
    assert source.count("'localhost', 8888") == 1
    path = tmp_path / name
    path.write_text(source.replace("'localhost', 8888", f"'localhost', {port}") + suffix)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_publish_example_gets_an_ack_with_a_message_id(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    script = _script("publish.py", broker.port, tmp_path)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30, env=_env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ACK: ")
    assert '"type":"ack"' in result.stdout
    assert '"message_id":"' in result.stdout


def test_subscribe_example_receives_what_the_publish_example_sends(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    subscriber = subprocess.Popen(
        [
            sys.executable,
            str(_script("subscribe.py", broker.port, tmp_path, "asyncio.run(subscribe())\n")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert subscriber.stdout is not None
        # The first thing the subscriber reads is its subscribe ack.
        first = subscriber.stdout.readline()
        assert first.startswith("Received: {'type': 'ack'"), first
        publisher = subprocess.run(
            [sys.executable, str(_script("publish.py", broker.port, tmp_path))],
            capture_output=True,
            text=True,
            timeout=30,
            env=_env(),
        )
        assert publisher.returncode == 0, publisher.stderr
        received = subscriber.stdout.readline()
        assert received.startswith("Received: {'type': 'message'"), received
        assert "'message': 'Hello, world!'" in received
        assert "'topic': 'news'" in received
    finally:
        subscriber.kill()
        subscriber.communicate(timeout=10)
