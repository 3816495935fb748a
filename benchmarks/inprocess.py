"""The broker's own work per message, measured in one process: no sockets, no peer.

Run: ``python -m benchmarks.inprocess pubsub`` (or ``queue``), or with
``--instructions`` to count CPU instructions per message under valgrind's callgrind.

Why it exists
-------------
On a shared VM the throughput of the same code moves by 10-20% between runs, so a
change worth a few percent cannot be seen in msgs/s. Instructions executed are
repeatable: callgrind counts the same total for the same code and input whatever else
the machine is doing. This script runs a real :class:`~msg.broker.server.Server` (real
router, real file store, real event loop) and feeds its connections directly: a
publisher's reads of ``--per-read`` publish lines, and for ``queue`` four manual-ack
consumers that ack everything delivered to them after each read. What the broker writes
goes into memory; for ``pubsub`` it also times each read from its hand-over to its
first delivery's write (with ``--per-read 1``: a lone message's path to the wire,
warm). ``--instructions`` runs it twice under callgrind, with a few reads and with
``--reads`` more, and divides the difference by the extra messages, so start-up and
imports cancel out.

Compare two trees with ``--tree DIR`` (an exported ``git archive HEAD msg``, as for
the suite's ``--msg-tree``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_STAMP = re.compile(rb'"message_id":"([^"]+)"')
_PAYLOAD = b'"@%010d' + b"x" * 88 + b'"'


class MemoryTransport:
    """Stands in for a socket: keeps what the broker writes, never pushes back."""

    def __init__(self) -> None:
        self.written = 0
        self.chunks: list[bytes] = []
        self.first_write_ns = 0
        """When the first write since the last take() came (perf_counter_ns)."""

    def write(self, data: bytes) -> None:
        if not self.chunks:
            self.first_write_ns = time.perf_counter_ns()
        self.written += len(data)
        self.chunks.append(data)

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


async def _turns(count: int) -> None:
    """Let the loop run its callbacks and store calls (fsync never: no thread waits)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def run(workload: str, reads: int, per_read: int, fsync: str) -> dict[str, Any]:
    from msg.broker.server import Server
    from msg.config import Config
    from msg.persistence import FsyncPolicy

    with tempfile.TemporaryDirectory() as data_dir:
        server = Server(
            Config(port=0, data_dir=Path(data_dir), fsync=FsyncPolicy(fsync)), tune_process=True
        )
        await server.start()
        try:
            publisher = server._new_connection()
            publisher_out = MemoryTransport()
            publisher.connection_made(publisher_out)  # type: ignore[arg-type]
            consumers = []
            if workload == "pubsub":
                subscribe = b'{"action":"subscribe","topic":"bench"}\n'
                line = b'{"action":"publish","topic":"bench","message":%b}\n'
                count = 1
            else:
                subscribe = (
                    b'{"action":"subscribe","topic":"jobs","mode":"queue",'
                    b'"ack":"manual","prefetch":256}\n'
                )
                line = b'{"action":"publish","topic":"jobs","mode":"queue","message":%b}\n'
                count = 4
            for _ in range(count):
                connection = server._new_connection()
                transport = MemoryTransport()
                connection.connection_made(transport)  # type: ignore[arg-type]
                connection.data_received(subscribe)
                consumers.append((connection, transport))
            await _turns(20)
            for _, transport in consumers:
                transport.take()
            reads_data = [
                b"".join(line % (_PAYLOAD % (r * per_read + i)) for i in range(per_read))
                for r in range(reads)
            ]
            delivered = 0
            to_delivery: list[int] = []
            started, cpu = time.perf_counter(), time.process_time()
            for data in reads_data:
                read_ns = time.perf_counter_ns()
                publisher.data_received(data)
                if workload == "pubsub":
                    to_delivery.append(consumers[0][1].first_write_ns - read_ns)
                await _turns(6)
                publisher_out.take()
                for connection, transport in consumers:
                    out = transport.take()
                    if workload == "queue":
                        ids = _STAMP.findall(
                            b"\n".join(
                                frame
                                for frame in out.split(b"\n")
                                if frame.startswith(b'{"type":"message"')
                            )
                        )
                        delivered += len(ids)
                        connection.data_received(
                            b"".join(b'{"action":"ack","message_id":"%b"}\n' % i for i in ids)
                        )
                    else:
                        delivered += out.count(b'{"type":"message"')
                await _turns(6)
            await _turns(50)
            cpu = time.process_time() - cpu
            wall = time.perf_counter() - started
        finally:
            await server.stop()
    messages = reads * per_read
    result: dict[str, Any] = {
        "workload": workload,
        "messages": messages,
        "delivered": delivered,
        "cpu_us_per_message": round(1e6 * cpu / messages, 3),
        "wall_us_per_message": round(1e6 * wall / messages, 3),
    }
    if to_delivery:
        # From handing a read to the broker to its first delivery's write: the path
        # a lone message takes at low rates (--per-read 1), warm caches.
        ordered = sorted(to_delivery)
        result["read_to_delivery_us_p50"] = round(ordered[len(ordered) // 2] / 1000, 2)
        result["read_to_delivery_us_p90"] = round(ordered[len(ordered) * 9 // 10] / 1000, 2)
    return result


def _callgrind_total(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}/callgrind.out",
                sys.executable,
                "-m",
                "benchmarks.inprocess",
                *argv,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no callgrind total in: {done.stderr[-500:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("workload", choices=["pubsub", "queue"])
    parser.add_argument("--reads", type=int, default=300, help="publisher reads to time")
    parser.add_argument("--per-read", type=int, default=1000, help="publishes per read")
    parser.add_argument("--fsync", choices=["never", "always"], default="never")
    parser.add_argument("--tree", help="import msg from this directory")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instructions per message under callgrind (--reads 20 is plenty)",
    )
    options = parser.parse_args()
    if options.tree:
        sys.path.insert(0, os.path.abspath(options.tree))
    if options.instructions:
        common = [options.workload, "--per-read", str(options.per_read), "--fsync", options.fsync]
        if options.tree:
            common += ["--tree", options.tree]
        few, many = 5, 5 + options.reads
        base = _callgrind_total([*common, "--reads", str(few)])
        total = _callgrind_total([*common, "--reads", str(many)])
        per_message = (total - base) / (options.reads * options.per_read)
        print(
            json.dumps(
                {"workload": options.workload, "instructions_per_message": round(per_message)}
            )
        )
        return
    # On the loop the broker's command line would pick, by its own helper (which every
    # commit's msg has, so --tree may point to any of them).
    from msg.cli import _run

    print(json.dumps(_run(run(options.workload, options.reads, options.per_read, options.fsync))))


if __name__ == "__main__":
    main()
