"""msg's throughput benchmark: one command, a table, and optionally JSON.

    python benchmarks/throughput.py [--quick] [--fsync always|everysec|never]
        [--storage file|memory] [--messages N] [--payload BYTES] [--json OUT]

See docs/benchmarks.md for how to read the output.

Workloads
---------
A. pub/sub, 1 publisher -> 1 subscriber: messages *delivered* per second. Run twice:
   against msg, and against ``benchmarks/relay.py``, a minimal asyncio JSON-lines
   relay that speaks the same subset of the protocol (the "CPython ceiling").
C. queue, 1 producer -> 4 consumers with manual acks (``prefetch`` 256 each; every
   consumer acks every message): messages *acked* per second (an ack counts once the
   broker has confirmed it).

(The letters leave room for the fuller suite planned later.)

Method
------
- Every run starts a fresh server process (a new, empty data dir for msg) and one
  load-generator process (``benchmarks/loadgen.py``), and stops both afterwards. On
  Linux the server is pinned to the first allowed CPU and the generator to the second
  (``os.sched_setaffinity``, applied to every thread), so they never compete for a core.
- The generator is built not to be the bottleneck (raw sockets, pre-encoded requests,
  a bounded window of pipelined publishes, C-level counting and parsing; see its
  docstring). Both processes' CPU time over the timed window is reported, as a
  percentage of one core: a generator near 100% means the figure is client-bound and
  says nothing about msg.
- Every message carries a sequence number; the generator reports how many were lost
  (never delivered) and duplicated (delivered more than once).
- The machine is shared and noisy, so each of msg's figures is also given as a ratio
  to the relay's figure from the same repetition (the relay runs immediately before
  msg). With ``--repeat`` > 1 the workloads are interleaved (relay, A, C, relay, A,
  C, ...) and the table shows medians; the JSON keeps every run.
- Bounds: each run ends after N messages, or on a per-workload wall-time timeout
  (reported as a failure), and the generator process is killed if it outlives that
  by more than a grace period. The relay is given ``RELAY_FACTOR`` times as many
  messages as msg, because it is that much faster and a run of a few milliseconds
  would mostly measure start-up.

Exit status: 0 if every run completed with no loss and no duplicates, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent
LOADGEN: Final = BENCH_DIR / "loadgen.py"
RELAY: Final = BENCH_DIR / "relay.py"

RELAY_FACTOR: Final = 5
GENERATOR_GRACE: Final = 30.0
"""Seconds a generator may outlive its own timeout (pre-encoding, checking)."""
START_TIMEOUT: Final = 30.0

_LISTENING: Final = re.compile(r"listening on (\S+?):(\d+)(.*)")
_PROBLEM: Final = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    kind: str  # loadgen --workload
    target: str  # "relay" or "msg"
    unit: str


WORKLOADS: Final = (
    Workload("A-relay", "A pub/sub 1->1", "pubsub", "relay", "delivered"),
    Workload("A", "A pub/sub 1->1", "pubsub", "msg", "delivered"),
    Workload("C", "C queue 1->4 manual ack", "queue", "msg", "acked"),
)


# ----------------------------------------------------------------------
# Processes


def pin(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (best effort; no-op off Linux)."""
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


class Server:
    """msg or the relay, as a child process on a free port."""

    def __init__(self, command: list[str], cpus: set[int] | None) -> None:
        self.command = command
        self.cpus = cpus
        self.log_lines: list[str] = []
        self.port = 0
        self.banner = ""
        self._listening = threading.Event()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        pin(self.process.pid, cpus)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            line = line.rstrip("\n")
            self.log_lines.append(line)
            if not self._listening.is_set():
                match = _LISTENING.search(line)
                if match:
                    self.port = int(match.group(2))
                    self.banner = match.group(3).strip()
                    self._listening.set()
        self._listening.set()  # exited: stop waiting

    def wait_listening(self, timeout: float) -> None:
        if not self._listening.wait(timeout) or not self.port:
            tail = "\n".join(self.log_lines[-15:])
            self.stop()
            raise RuntimeError(f"{self.command[1:3]} did not start; log tail:\n{tail}")
        pin(self.pid, self.cpus)  # again, for any thread started meanwhile

    def alive(self) -> bool:
        return self.process.poll() is None

    def problems(self) -> list[str]:
        return [line for line in self.log_lines if _PROBLEM.search(line)]

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.log_lines.append(f"(benchmark: no exit {timeout:.0f} s after SIGTERM; killed)")
            return None
        self._reader.join(5.0)
        return status


def run_generator(
    workload: Workload,
    server: Server,
    messages: int,
    options: argparse.Namespace,
    cpus: set[int] | None,
) -> dict[str, Any]:
    """Run loadgen.py once against ``server``; return its JSON result."""
    command = [
        sys.executable,
        str(LOADGEN),
        "--workload",
        workload.kind,
        "--port",
        str(server.port),
        "--messages",
        str(messages),
        "--payload",
        str(options.payload),
        "--window",
        str(options.window),
        "--consumers",
        str(options.consumers),
        "--prefetch",
        str(options.prefetch),
        "--timeout",
        str(options.timeout),
        "--broker-pid",
        str(server.pid),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    pin(process.pid, cpus)
    try:
        out, err = process.communicate(timeout=options.timeout + GENERATOR_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        return {"status": "hung", "error": "generator killed after its timeout + grace"}
    lines = out.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"status": "error", "error": f"generator printed no result; stderr: {err[-500:]}"}
    return result


# ----------------------------------------------------------------------
# Runs


@dataclass
class Run:
    workload: Workload
    repetition: int
    result: dict[str, Any]
    server_problems: list[str] = field(default_factory=list)
    server_exit: int | None = 0
    banner: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.result.get("status") == "ok"
            and self.result.get("lost", 1) == 0
            and self.result.get("duplicated", 1) == 0
        )


def server_command(target: str, options: argparse.Namespace, data_dir: Path) -> list[str]:
    if target == "relay":
        return [sys.executable, str(RELAY), "--host", "127.0.0.1", "--port", "0"]
    return [
        sys.executable,
        "-m",
        "msg",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--storage",
        options.storage,
        "--fsync",
        options.fsync,
    ]


def run_one(
    workload: Workload,
    repetition: int,
    options: argparse.Namespace,
    data_root: Path,
    cpus: tuple[set[int] | None, set[int] | None],
) -> Run:
    data_dir = Path(tempfile.mkdtemp(prefix=f"{workload.key}-{repetition}-", dir=data_root))
    messages = options.messages * (RELAY_FACTOR if workload.target == "relay" else 1)
    try:
        server = Server(server_command(workload.target, options, data_dir), cpus[0])
        try:
            server.wait_listening(START_TIMEOUT)
        except RuntimeError as exc:
            return Run(workload, repetition, {"status": "no-start", "error": str(exc)})
        try:
            result = run_generator(workload, server, messages, options, cpus[1])
            if not server.alive():
                result["status"] = "server-died"
        finally:
            status = server.stop()
        return Run(workload, repetition, result, server.problems(), status, server.banner)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


# ----------------------------------------------------------------------
# Report


@dataclass
class Row:
    workload: Workload
    rate: float | None
    rate_min: float | None
    rate_max: float | None
    ratio: float | None
    broker_cpu: float | None
    generator_cpu: float | None
    lost: int
    duplicated: int
    status: str
    max_stall: float


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: list[Run]) -> list[Row]:
    relay_rate: dict[int, float] = {
        r.repetition: float(r.result["rate"])
        for r in runs
        if r.workload.target == "relay" and r.ok and r.result.get("rate")
    }
    rows = []
    for workload in WORKLOADS:
        mine = [r for r in runs if r.workload is workload]
        if not mine:
            continue
        rates = [float(r.result["rate"]) for r in mine if r.ok and r.result.get("rate")]
        ratios = [
            float(r.result["rate"]) / relay_rate[r.repetition]
            for r in mine
            if r.ok and r.result.get("rate") and r.repetition in relay_rate
        ]
        statuses = sorted({str(r.result.get("status")) for r in mine})
        rows.append(
            Row(
                workload,
                _median(rates),
                min(rates) if rates else None,
                max(rates) if rates else None,
                _median(ratios),
                _median([r.result.get("broker_cpu_percent") for r in mine]),
                _median([r.result.get("generator_cpu_percent") for r in mine]),
                sum(int(r.result.get("lost", 0)) for r in mine),
                sum(int(r.result.get("duplicated", 0)) for r in mine),
                "ok" if statuses == ["ok"] else ",".join(statuses),
                max(float(r.result.get("max_stall_seconds", 0.0)) for r in mine),
            )
        )
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def render_table(rows: list[Row], repeat: int) -> str:
    header = (
        "workload",
        "target",
        "msgs/s",
        "min-max" if repeat > 1 else "",
        "vs relay",
        "broker CPU",
        "gen CPU",
        "lost",
        "dup",
        "max stall",
        "status",
    )
    table = [header]
    for row in rows:
        spread = f"{_fmt(row.rate_min, ',.0f')}-{_fmt(row.rate_max, ',.0f')}" if repeat > 1 else ""
        ratio = "1 (ref)" if row.workload.target == "relay" else _fmt(row.ratio, ".3f")
        if row.workload.kind != "pubsub" and row.ratio is not None:
            ratio += " *"
        table.append(
            (
                f"{row.workload.label} ({row.workload.unit})",
                row.workload.target,
                _fmt(row.rate, ",.0f"),
                spread,
                ratio,
                _fmt(row.broker_cpu, ".0f", "%"),
                _fmt(row.generator_cpu, ".0f", "%"),
                str(row.lost),
                str(row.duplicated),
                f"{row.max_stall:.2f} s",
                row.status,
            )
        )
    keep = [i for i, name in enumerate(header) if name]
    widths = {i: max(len(line[i]) for line in table) for i in keep}
    lines = ["  ".join(line[i].ljust(widths[i]) for i in keep).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * widths[i] for i in keep))
    return "\n".join(lines)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("orjson", "uvloop"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def filesystem_of(path: Path) -> str:
    """The file system type holding ``path`` (from /proc/mounts), or "unknown"."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def choose_cpus(enabled: bool) -> tuple[set[int] | None, set[int] | None, str]:
    if not enabled:
        return None, None, "not pinned (--no-pin)"
    if not hasattr(os, "sched_getaffinity"):
        return None, None, "not pinned (no sched_setaffinity on this platform)"
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None, f"not pinned (only CPU {allowed} available)"
    return (
        {allowed[0]},
        {allowed[1]},
        f"server pinned to CPU {allowed[0]}, generator to CPU {allowed[1]} ({os.cpu_count()} CPUs)",
    )


# ----------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="msg throughput benchmark (see docs/benchmarks.md)",
    )
    parser.add_argument("--quick", action="store_true", help="small run, well under a minute")
    parser.add_argument("--fsync", choices=["always", "everysec", "never"], default="always")
    parser.add_argument("--storage", choices=["file", "memory"], default="file")
    parser.add_argument(
        "--messages", type=int, help="messages per msg run (default 200000; --quick 50000)"
    )
    parser.add_argument("--payload", type=int, default=100, help="message bytes (default 100)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write results as JSON")
    parser.add_argument(
        "--repeat", type=int, help="repetitions, interleaved (default 3; --quick 1)"
    )
    parser.add_argument("--window", type=int, default=10_000, help="unacked publishes in flight")
    parser.add_argument("--consumers", type=int, default=4, help="queue consumers (C)")
    parser.add_argument("--prefetch", type=int, default=256, help="credit per consumer (C)")
    parser.add_argument("--timeout", type=float, help="seconds per run (default 120; --quick 20)")
    parser.add_argument(
        "--workloads", default="A,C", help="comma-separated subset of A,C (default A,C)"
    )
    parser.add_argument("--data-root", type=Path, help="where data dirs go (default: temp)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    options = parser.parse_args(argv)
    quick = options.quick
    if options.messages is None:
        options.messages = 50_000 if quick else 200_000
    if options.repeat is None:
        options.repeat = 1 if quick else 3
    if options.timeout is None:
        options.timeout = 20.0 if quick else 120.0
    if options.messages < 1 or options.repeat < 1 or options.timeout <= 0:
        parser.error("--messages, --repeat and --timeout must be positive")
    if options.payload < 10:
        parser.error("--payload must be at least 10 (the sequence number)")
    wanted = {w.strip().upper() for w in options.workloads.split(",") if w.strip()}
    if not wanted <= {"A", "C"}:
        parser.error("--workloads takes A and/or C")
    options.selected = [
        w for w in WORKLOADS if w.key.split("-")[0] in wanted or (w.target == "relay")
    ]
    return options


def notes_for(rows: list[Row], runs: list[Run]) -> list[str]:
    """The lines under the table: how to read it, then anything that went wrong."""
    notes = [
        "msgs/s: median over repetitions; timed from the first publish to the last "
        "delivery (A) / confirmed ack (C).",
        "vs relay: msg's rate / the relay's (workload A) in the same repetition.",
        "CPU: busy time over the timed window, % of one core.",
    ]
    if any(r.workload.kind == "queue" for r in rows):
        notes.append(
            "* C is compared with the relay's pub/sub figure only to cancel machine speed; "
            "the relay has no queues."
        )
    if any(row.status != "ok" for row in rows):
        notes.append(
            "lost: messages missing when the run ended; after a timeout they may only be late."
        )
    for row in rows:
        if row.generator_cpu is not None and row.generator_cpu > 80:
            notes.append(
                f"! {row.workload.label} ({row.workload.target}): generator CPU "
                f"{row.generator_cpu:.0f}%: the figure may be client-bound."
            )
    for run in runs:
        res = run.result
        tag = f"{run.workload.label} ({run.workload.target}, run {run.repetition + 1})"
        if res.get("first_error"):
            notes.append(f"! {tag}: error frame: {res['first_error']}")
        if res.get("error"):
            notes.append(f"! {tag}: {res['error']}")
        if res.get("connections_closed"):
            notes.append(f"! {tag}: the server closed {res['connections_closed']} connection(s)")
        if run.server_exit != 0:
            notes.append(f"! {tag}: server exit status {run.server_exit}")
        for line in run.server_problems[:3]:
            notes.append(f"! {tag}: server log: {line}")
        if len(run.server_problems) > 3:
            notes.append(f"! {tag}: ... {len(run.server_problems) - 3} more problem lines")
        published = res.get("publish_seconds")
        if run.workload.kind == "queue" and published and res.get("messages"):
            share = 100 * res.get("progress_when_published", 0) / res["messages"]
            notes.append(
                f"  {tag}: all publishes acked after {published:.2f} s of "
                f"{res.get('total_seconds', 0):.2f} s; consumers had acked {share:.0f}% by then."
            )
    return notes


def json_document(
    options: argparse.Namespace,
    started: datetime.datetime,
    found: dict[str, str],
    pinning: str,
    rows: list[Row],
    runs: list[Run],
) -> dict[str, Any]:
    """Everything measured, for --json: the summary rows and every run in full."""
    return {
        "started": started.isoformat(timespec="seconds"),
        "versions": found,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pinning": pinning,
        "settings": {
            "quick": options.quick,
            "storage": options.storage,
            "fsync": options.fsync,
            "messages": options.messages,
            "relay_messages": options.messages * RELAY_FACTOR,
            "payload": options.payload,
            "window": options.window,
            "consumers": options.consumers,
            "prefetch": options.prefetch,
            "repeat": options.repeat,
            "timeout": options.timeout,
        },
        "summary": [
            {
                "workload": row.workload.key,
                "label": row.workload.label,
                "target": row.workload.target,
                "msgs_per_s": row.rate,
                "min": row.rate_min,
                "max": row.rate_max,
                "ratio_to_relay": row.ratio,
                "broker_cpu_percent": row.broker_cpu,
                "generator_cpu_percent": row.generator_cpu,
                "lost": row.lost,
                "duplicated": row.duplicated,
                "max_stall_seconds": row.max_stall,
                "status": row.status,
            }
            for row in rows
        ],
        "runs": [
            {
                "workload": run.workload.key,
                "target": run.workload.target,
                "repetition": run.repetition + 1,
                "server": run.banner,
                "server_exit": run.server_exit,
                "server_problems": run.server_problems,
                **run.result,
            }
            for run in runs
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    server_cpus, generator_cpus, pinning = choose_cpus(not options.no_pin)
    data_root = Path(tempfile.mkdtemp(prefix="msg-bench-", dir=options.data_root))
    started = datetime.datetime.now(datetime.UTC)
    found = versions()
    storage = options.storage
    if options.storage == "file":
        storage += f", fsync {options.fsync}, data on {filesystem_of(data_root)}"
    print(
        f"msg throughput benchmark, {started:%Y-%m-%d %H:%M} UTC; Python {found['python']}, "
        f"orjson {found['orjson']}, uvloop {found['uvloop']}"
    )
    print(
        f"storage {storage}; payload {options.payload} B; "
        f"N={options.messages:,} per msg run (relay {options.messages * RELAY_FACTOR:,}); "
        f"window {options.window:,}; prefetch {options.prefetch}; repeat {options.repeat}"
    )
    print(pinning)
    runs: list[Run] = []
    began = time.monotonic()
    try:
        for repetition in range(options.repeat):
            for workload in options.selected:
                cpus = (server_cpus, generator_cpus)
                run = run_one(workload, repetition, options, data_root, cpus)
                runs.append(run)
                res = run.result
                error = f"  ({res['error']})" if res.get("error") else ""
                print(
                    f"  [{repetition + 1}/{options.repeat}] {workload.label:<24} "
                    f"{workload.target:<5} {_fmt(res.get('rate'), ',.0f'):>9} msgs/s  "
                    f"{res.get('status')}{error}",
                    flush=True,
                )
    finally:
        shutil.rmtree(data_root, ignore_errors=True)
    rows = summarise(runs)
    print()
    print(render_table(rows, options.repeat))
    print()
    print("\n".join(notes_for(rows, runs)))
    print(f"total time {time.monotonic() - began:.1f} s")
    if options.json is not None:
        document = json_document(options, started, found, pinning, rows, runs)
        options.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {options.json}")
    return 0 if runs and all(run.ok for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
