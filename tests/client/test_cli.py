"""The pub, sub and status commands, run as subprocesses against a real broker."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from msg.cli import format_status
from msg.client import SyncClient
from msg.testing import BrokerProcess

# A command that talks to a local broker takes well under a second; this only bounds a hang.
COMMAND_TIMEOUT = 30.0


@pytest.fixture
def env(broker: BrokerProcess) -> dict[str, str]:
    """The environment a user would have: the broker's address in MSG_HOST/MSG_PORT."""
    return {**os.environ, "MSG_HOST": broker.host, "MSG_PORT": str(broker.port)}


@pytest.fixture
def client(broker: BrokerProcess) -> Iterator[SyncClient]:
    with SyncClient.connect(broker.host, broker.port) as c:
        yield c


def msg(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "msg", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def test_pub_then_sub(env: dict[str, str], client: SyncClient) -> None:
    published = [
        msg(env, "pub", "jobs", '{"a": 1}', "--queue"),
        msg(env, "pub", "jobs", "hello world", "--queue"),  # not JSON: a string
        msg(env, "pub", "jobs", "42", "--queue"),  # JSON: a number
        msg(env, "pub", "jobs", "42", "--queue", "--string"),  # forced string
    ]
    for result in published:
        assert result.returncode == 0, result.stderr
    ids = [result.stdout.strip() for result in published]
    result = msg(env, "sub", "jobs", "--queue", "--ack", "manual", "--count", "4")
    assert result.returncode == 0, result.stderr
    frames = [json.loads(line) for line in result.stdout.splitlines()]
    assert [f["message"] for f in frames] == [{"a": 1}, "hello world", 42, "42"]
    assert [f["message_id"] for f in frames] == ids
    assert all(f["type"] == "message" and f["mode"] == "queue" for f in frames)
    # Manual mode acked each one after printing it.
    queue = client.status()["queues"]["jobs"]
    assert queue["depth"] == 0
    assert queue["unacked"] == 0
    assert queue["acked"] == 4


def test_pub_lines_from_stdin(env: dict[str, str], client: SyncClient) -> None:
    lines = ['{"n": 1}', "plain text", "", "[1, 2]", "last line without newline"]
    result = msg(env, "pub", "lines", "-", "--queue", stdin="\n".join(lines))
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    assert len(ids) == 4  # the blank line is skipped
    with client.subscribe("lines", queue=True) as sub:
        got = [sub.next(timeout=5) for _ in ids]
    assert [m.data for m in got] == [{"n": 1}, "plain text", [1, 2], "last line without newline"]
    assert [m.message_id for m in got] == ids


def test_pub_many_lines_from_stdin_is_pipelined(env: dict[str, str], client: SyncClient) -> None:
    count = 20_000
    result = msg(env, "pub", "bulk", "-", "--queue", stdin="".join(f"{n}\n" for n in range(count)))
    assert result.returncode == 0, result.stderr
    assert len(set(result.stdout.split())) == count
    assert client.status()["queues"]["bulk"]["depth"] == count


def test_sub_durable(env: dict[str, str], client: SyncClient) -> None:
    client.subscribe("events", durable="cli").unsubscribe()  # create the cursor
    client.publish_many("events", ["one", "two"])
    result = msg(env, "sub", "events", "--durable", "cli", "--ack", "manual", "--count", "2")
    assert result.returncode == 0, result.stderr
    frames = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(f["message"], f["durable"]) for f in frames] == [("one", "cli"), ("two", "cli")]
    assert client.status()["topics"]["events"]["durable"]["cli"]["pending"] == 0


def test_sub_stops_cleanly_on_ctrl_c(env: dict[str, str], client: SyncClient) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "msg", "sub", "work", "--queue"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        client.publish("work", "first", queue=True)
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(COMMAND_TIMEOUT), "sub printed nothing"
        line = process.stdout.readline()  # printed and flushed as soon as it came
        assert json.loads(line)["message"] == "first"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    assert "Traceback" not in stderr


def test_status(env: dict[str, str], client: SyncClient) -> None:
    client.publish("orders", {"id": 1}, queue=True)
    with client.subscribe("prices"):
        table = msg(env, "status")
        raw = msg(env, "status", "--json")
    assert table.returncode == 0, table.stderr
    assert raw.returncode == 0, raw.stderr
    status = json.loads(raw.stdout)
    assert status["type"] == "status"
    assert status["queues"]["orders"]["depth"] == 1
    assert status["topics"]["prices"]["subscribers"] == 1
    lines = table.stdout.splitlines()
    assert lines[0].startswith("msg ")
    assert " up " in lines[0]
    assert any(line.split()[:2] == ["orders", "1"] for line in lines)  # name, depth
    assert any(line.split()[:2] == ["prices", "1"] for line in lines)  # name, subscribers
    assert any(line.startswith("QUEUE") and "DEPTH" in line for line in lines)
    assert any(line.startswith("TOPIC") and "SUBSCRIBERS" in line for line in lines)


def test_flags_override_environment(broker: BrokerProcess) -> None:
    env = {**os.environ, "MSG_HOST": "203.0.113.1", "MSG_PORT": "1"}  # nowhere
    result = msg(env, "status", "--host", broker.host, "--port", str(broker.port))
    assert result.returncode == 0, result.stderr


def test_errors_are_one_clear_line(env: dict[str, str], broker: BrokerProcess) -> None:
    refused = msg(env, "pub", "$reserved", "x")
    assert refused.returncode == 1
    assert "invalid_topic" in refused.stderr
    assert "Traceback" not in refused.stderr
    from_stdin = msg(env, "pub", "$reserved", "-", stdin="a\nb\n")
    assert from_stdin.returncode == 1
    assert "invalid_topic" in from_stdin.stderr
    assert "Traceback" not in from_stdin.stderr
    assert "Exception" not in from_stdin.stderr
    manual = msg(env, "sub", "plain", "--ack", "manual", "--count", "1")
    assert manual.returncode == 1
    assert "bad_request" in manual.stderr
    broker.stop()
    for args in (["pub", "t", "1"], ["sub", "t"], ["status"]):
        down = msg(env, *args)
        assert down.returncode == 1
        assert "cannot connect" in down.stderr
        assert "Traceback" not in down.stderr
    bad_port = msg({**env, "MSG_PORT": "eighty"}, "status")
    assert bad_port.returncode == 2
    assert "MSG_PORT" in bad_port.stderr


def test_works_without_orjson_and_uvloop(env: dict[str, str]) -> None:
    pure = {**env, "MSG_PURE_JSON": "1", "MSG_LOOP": "asyncio"}
    result = msg(pure, "pub", "pure", '{"é": [1, 2.5, null]}', "--queue")
    assert result.returncode == 0, result.stderr
    result = msg(pure, "sub", "pure", "--queue", "--count", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["message"] == {"é": [1, 2.5, None]}


def test_format_status_handles_an_empty_broker() -> None:
    text = format_status({"type": "status", "version": "0.1.0", "uptime": 3725.5, "connections": 0})
    assert "up 1h 2m 5s" in text
    assert "no queues" in text
    assert "no topics" in text
