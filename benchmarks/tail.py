"""How a D run's slow messages come: alone, or in episodes of consecutive ones.

Run a latency measurement with ``--samples-out``, then read the file::

    python -m benchmarks.loadgen --driver nats --workload latency --port 4222 \\
        --duration 10 --samples-out /tmp/nats.json
    python -m benchmarks.tail /tmp/nats.json [--slow-us 1000] [--show 3]

A p99 alone cannot tell a broker that was held up once from one that could not keep
up for a while. An *episode* is a stretch of messages slower than ``--slow-us`` with
at most two faster ones in between. After a single stall (the host took the CPU away
for a few milliseconds) the backlog drains at once: each message is about one send
interval faster than the one before, and the episode is as long as the stall in
intervals. A broker that falls behind while the machine is slowed (its work per
message no longer fits between sends) stays slow for tens of messages. For each
episode the tool can print every message's latency and how late the generator sent
it (both in µs), which shows which of the two it was.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def episodes(latencies: list[int], slow_ns: int, gap: int = 3) -> list[list[int]]:
    """Indexes of slow messages, grouped into runs at most ``gap - 1`` apart."""
    found: list[list[int]] = []
    for i, value in enumerate(latencies):
        if value <= slow_ns:
            continue
        if found and i - found[-1][-1] <= gap:
            found[-1].append(i)
        else:
            found.append([i])
    return found


def summary(samples: dict[str, list[int]], slow_us: float) -> dict[str, Any]:
    """Percentiles, and how the messages slower than ``slow_us`` are grouped."""
    latencies = samples["latency_ns"]
    late = samples["send_late_ns"]
    ordered = sorted(latencies)
    slow = episodes(latencies, int(slow_us * 1000))
    lengths = sorted(len(e) for e in slow)
    slow_count = sum(lengths)
    sent_late = sum(1 for e in slow for i in e if i < len(late) and late[i] > slow_us * 500)
    return {
        "samples": len(latencies),
        "p50_us": ordered[len(ordered) // 2] / 1000 if ordered else None,
        "p99_us": ordered[len(ordered) * 99 // 100] / 1000 if ordered else None,
        "slow": slow_count,
        "episodes": len(slow),
        "longest": lengths[-5:],
        "slow_sent_late": sent_late,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("samples", type=Path, help="a loadgen --samples-out file")
    parser.add_argument("--slow-us", type=float, default=1000.0, help="slow above this")
    parser.add_argument("--show", type=int, default=0, help="print the N longest episodes")
    options = parser.parse_args()
    samples = json.loads(options.samples.read_text())
    result = summary(samples, options.slow_us)
    print(json.dumps(result))
    latencies, late = samples["latency_ns"], samples["send_late_ns"]
    slow = sorted(episodes(latencies, int(options.slow_us * 1000)), key=len)
    for episode in slow[len(slow) - options.show :] if options.show else []:
        start, end = max(0, episode[0] - 2), min(len(latencies), episode[-1] + 3)
        print(
            f"from message {start} (latency/sent late, us): "
            + " ".join(f"{latencies[i] // 1000}/{late[i] // 1000}" for i in range(start, end))
        )


if __name__ == "__main__":
    main()
