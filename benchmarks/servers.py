"""Brokers under test: start each one fresh, pin it, find its pid, stop it.

Every broker the suite can start itself runs as a child process on a free loopback
port in a temporary directory, pinned to the broker CPU: msg (with or without the
``fast`` extra), the reference relay, ``redis-server`` (plain, or with
``--appendonly yes --appendfsync always``), ``nats-server -js``, ``mosquitto`` and the
amqtt broker. A peer whose binary is missing falls back to the shared service on its
standard port, if one answers there. RabbitMQ is only used as the shared service on
5672; its ``beam.smp`` is found by the listening socket, pinned to the broker CPU for
the run and given its previous affinity back afterwards (nothing persists).
Anything that cannot be had raises :class:`UnavailableError` with the reason, which the
suite reports as a skipped peer.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent
START_TIMEOUT: Final = 30.0

_LISTENING: Final = re.compile(r"listening on (\S+?):(\d+)(.*)")
_PROBLEM: Final = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")
SHARED_PORTS: Final = {"redis": 6379, "nats": 4222, "mosquitto": 1883, "rabbitmq": 5672}


class UnavailableError(Exception):
    """This broker cannot be run here (the message says why)."""


def pin(pid: int, cpus: set[int] | None) -> dict[int, set[int]]:
    """Pin every thread of ``pid`` to ``cpus``; return the previous affinities."""
    before: dict[int, set[int]] = {}
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        return before
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    return before


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def reachable(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_listening_on(port: int) -> int | None:
    """The pid of the process with a listening TCP socket on ``port`` (needs /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                        inodes.add(fields[9])
        except (OSError, StopIteration, ValueError, IndexError):
            continue
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in targets:
                        return int(entry)
    return None


def command_version(command: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else ""


class Server:
    """A broker for one measurement: port, pid (for CPU and RSS), version, stop()."""

    port = 0
    pid = 0
    version = ""
    banner = ""
    note = ""

    def alive(self) -> bool:
        return True

    def problems(self) -> list[str]:
        return []

    def stop(self) -> int | None:
        return 0


class ChildServer(Server):
    """A broker we start: a child process on a free port in its own temp dir."""

    def __init__(
        self,
        command: list[str],
        cpus: set[int] | None,
        *,
        port: int = 0,
        env: dict[str, str] | None = None,
        workdir: Path | None = None,
        log_port: bool = False,
    ) -> None:
        self.command = command
        self.cpus = cpus
        self.port = port
        self.workdir = workdir
        self.log_lines: list[str] = []
        self._listening = threading.Event()
        self._log_port = log_port
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"

        def pin_self() -> None:  # before exec: runtimes size their thread pools by it
            if cpus is not None and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, cpus)

        self.process = subprocess.Popen(
            command,
            preexec_fn=pin_self,
            cwd=workdir or REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
        )
        self.pid = self.process.pid
        pin(self.pid, cpus)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        try:
            self._wait(START_TIMEOUT)
        except UnavailableError:
            self.stop()
            raise

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            if len(self.log_lines) < 5000:
                self.log_lines.append(line)
            if self._log_port and not self._listening.is_set():
                match = _LISTENING.search(line)
                if match:
                    self.port = int(match.group(2))
                    self.banner = match.group(0)
                    self._listening.set()
        self._listening.set()

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._log_port:
            self._listening.wait(timeout)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.port and reachable(self.port):
                pin(self.pid, self.cpus)  # again, for threads started meanwhile
                return
            time.sleep(0.05)
        tail = "\n".join(self.log_lines[-10:])
        raise UnavailableError(f"{Path(self.command[0]).name} did not start: {tail[-400:]}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def problems(self) -> list[str]:
        return [line for line in self.log_lines if _PROBLEM.search(line)]

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL; return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(20.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.log_lines.append("(benchmark: no exit 20 s after SIGTERM; killed)")
            status = None
        self._reader.join(5.0)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return status


class SharedServer(Server):
    """A service already running on this machine: used as is, pinned for the run only."""

    def __init__(self, name: str, port: int, cpus: set[int] | None) -> None:
        if not reachable(port):
            raise UnavailableError(f"nothing listening on 127.0.0.1:{port}")
        self.port = port
        self.pid = pid_listening_on(port) or 0
        self.note = f"shared service on port {port}"
        if not self.pid:
            self.note += " (pid not found: no broker CPU figure, not pinned)"
        self._restore = pin(self.pid, cpus) if self.pid else {}

    def alive(self) -> bool:
        return reachable(self.port)

    def stop(self) -> int | None:
        for tid, cpus in self._restore.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)
        return 0


def start(
    kind: str,
    cpus: set[int] | None,
    *,
    fsync: str = "always",
    pure: bool = False,
    durable: bool = False,
    msg_tree: Path | None = None,
    data_root: Path | None = None,
) -> Server:
    """Start (or attach to) the broker ``kind``; raise :class:`UnavailableError` if we can't."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=data_root))
    pure_env = {"MSG_PURE_JSON": "1", "MSG_LOOP": "asyncio"} if pure else {}
    python = sys.executable
    try:
        if kind == "msg":
            tree = str(msg_tree or REPO_ROOT)
            env = {"PYTHONPATH": tree} | pure_env
            command = [python, "-m", "msg", "serve", "--host", "127.0.0.1", "--port", "0"]
            command += ["--data-dir", str(workdir / "data"), "--fsync", fsync]
            return ChildServer(command, cpus, env=env, workdir=workdir, log_port=True)
        if kind == "relay":
            env = {"PYTHONPATH": str(REPO_ROOT)} | pure_env
            command = [python, "-m", "benchmarks.relay", "--host", "127.0.0.1", "--port", "0"]
            return ChildServer(command, cpus, env=env, workdir=workdir, log_port=True)
        if kind == "redis":
            binary = shutil.which("redis-server")
            if binary is None:
                if durable:
                    raise UnavailableError(
                        "redis-server not installed (needed for appendfsync always)"
                    )
                return SharedServer(kind, SHARED_PORTS[kind], cpus)
            port = free_port()
            command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            command += ["--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning"]
            if durable:
                command += ["--appendonly", "yes", "--appendfsync", "always"]
            else:
                command += ["--appendonly", "no"]
            return ChildServer(command, cpus, port=port, workdir=workdir)
        if kind == "nats":
            binary = shutil.which("nats-server")
            if binary is None:
                return SharedServer(kind, SHARED_PORTS[kind], cpus)
            port = free_port()
            command = [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(workdir)]
            return ChildServer(command, cpus, port=port, workdir=workdir)
        if kind == "mosquitto":
            binary = shutil.which("mosquitto") or (
                "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
            )
            if binary is None:
                return SharedServer(kind, SHARED_PORTS[kind], cpus)
            port = free_port()
            config = workdir / "mosquitto.conf"
            config.write_text(
                f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 100000\n"
            )
            return ChildServer([binary, "-c", str(config)], cpus, port=port, workdir=workdir)
        if kind == "amqtt":
            script = Path(python).parent / "amqtt"
            if not script.exists():
                raise UnavailableError("amqtt is not installed (pip install 'msg[bench]')")
            port = free_port()
            config = workdir / "amqtt.yaml"
            config.write_text(
                "listeners:\n  default:\n    type: tcp\n"
                f"    bind: 127.0.0.1:{port}\n"
                "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                "    allow_anonymous: true\n"
            )
            return ChildServer([str(script), "-c", str(config)], cpus, port=port, workdir=workdir)
        if kind == "rabbitmq":
            shutil.rmtree(workdir, ignore_errors=True)
            return SharedServer(kind, SHARED_PORTS[kind], cpus)
    except UnavailableError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    raise UnavailableError(f"unknown broker {kind}")


def versions() -> dict[str, str]:
    """Versions of everything measured (as far as they can be found without a broker)."""
    found: dict[str, str] = {"python": sys.version.split()[0]}
    for name in ("orjson", "uvloop", "amqtt", "matplotlib"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["redis"] = command_version(["redis-server", "--version"], r"v=(\S+)")
    found["nats"] = command_version(["nats-server", "--version"], r"v(\d\S*)")
    found["mosquitto"] = command_version(
        ["mosquitto", "-h"] if shutil.which("mosquitto") else ["/usr/sbin/mosquitto", "-h"],
        r"mosquitto version (\S+)",
    )
    return found
