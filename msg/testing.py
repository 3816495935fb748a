"""Run a real msg broker in a child process, for tests (msg's own and yours).

    with BrokerProcess(data_dir=tmp_path) as broker:
        client = await Client.connect(broker.host, broker.port)

The broker listens on a free port (``--port 0``); :meth:`BrokerProcess.start` waits
for its "listening on" log line and reads the port from it, so there are no fixed
ports and no sleeps. Everything the broker logs is collected in :attr:`log_lines`
(a background thread drains the pipe, so the broker never blocks on it), and
:meth:`wait_for_log` waits for a line matching a pattern.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from msg.errors import MsgError

__all__ = ["BrokerProcess"]

_LISTENING = re.compile(r"listening on (\S+?):(\d+)")


class BrokerProcess:
    """A broker child process on 127.0.0.1 and a free port."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        start_timeout: float = 20.0,
        rlimit_nofile: int | None = None,
    ) -> None:
        """``data_dir``: where the broker keeps its data; by default a new temporary
        directory, kept across restarts of this object and removed when its ``with``
        block ends (never the broker's own default, ``./.msg_data`` in the current
        directory). ``rlimit_nofile``: the broker's soft limit on open files (``ulimit
        -n``), set before it starts (POSIX only), to test it running out of descriptors."""
        self._own_data_dir = data_dir is None
        self.data_dir = (
            Path(tempfile.mkdtemp(prefix="msg-broker-")) if data_dir is None else Path(data_dir)
        )
        self.args = list(args)
        self.env = env
        self.rlimit_nofile = rlimit_nofile
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.log_lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._log_changed = threading.Condition()
        self._reader: threading.Thread | None = None

    def __enter__(self) -> BrokerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        command = [sys.executable, "-m", "msg", "serve", "--host", self.host, "--port", "0"]
        command += ["--data-dir", str(self.data_dir)]
        command += self.args
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_lines = []
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_nofile_setter(self.rlimit_nofile),
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        try:
            line = self.wait_for_log(_LISTENING.pattern, timeout=self.start_timeout)
        except BaseException:
            self._signal(signal.SIGKILL, 20.0)
            raise
        match = _LISTENING.search(line)
        assert match is not None
        self.port = int(match.group(2))

    def _drain(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        stderr = self.process.stderr
        for line in stderr:
            with self._log_changed:
                self.log_lines.append(line.rstrip("\n"))
                self._log_changed.notify_all()
        stderr.close()
        with self._log_changed:
            self._log_changed.notify_all()

    def wait_for_log(self, pattern: str, *, timeout: float = 10.0, start: int = 0) -> str:
        """Wait for a log line (from index ``start`` on) matching regex ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._log_changed:
            while True:
                for line in self.log_lines[start:]:
                    if regex.search(line):
                        return line
                exited = self.process is not None and self.process.poll() is not None
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (exited and not self._reader_alive()):
                    tail = "\n".join(self.log_lines[-20:])
                    raise MsgError(f"broker log never matched {pattern!r}; last lines:\n{tail}")
                self._log_changed.wait(min(remaining, 0.5))

    def _reader_alive(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: a graceful shutdown. Returns the exit status."""
        return self._signal(signal.SIGTERM, timeout)

    def interrupt(self, timeout: float = 20.0) -> int:
        """SIGINT (Ctrl-C) and wait. Returns the exit status."""
        return self._signal(signal.SIGINT, timeout)

    def kill(self) -> int:
        """SIGKILL: the broker gets no chance to clean up."""
        return self._signal(signal.SIGKILL, 20.0)

    def _signal(self, signum: int, timeout: float) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        if self._reader is not None:
            self._reader.join(5.0)
        return status

    def restart(self) -> None:
        """Start again on the same data dir (after stop or kill); the port changes."""
        self.start()


def _nofile_setter(soft: int | None) -> Callable[[], None] | None:
    """What the child runs before exec to lower its RLIMIT_NOFILE (None: nothing)."""
    if soft is None:
        return None
    if sys.platform == "win32":
        raise MsgError("rlimit_nofile needs a POSIX system")
    import resource

    # Read here, not in the child: between fork and exec only simple calls are safe.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits = (soft, hard)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    return lower
