"""PNG charts from a suite results document (JSON): throughput bars, latency CDF,
scaling curves.

    python -m benchmarks.charts benchmarks/results/RUN.json [--out PREFIX]

The suite calls :func:`write_all` after every full run; ``--out docs/benchmarks/x``
writes the committed charts. Needs matplotlib (``pip install 'msg[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# matplotlib comes with the ``bench`` extra only; without it this module is not used,
# but it must still type-check (CI installs ``dev`` and ``fast``, not ``bench``).
import matplotlib  # type: ignore[import-not-found,unused-ignore]

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

_LABELS = {
    "msg": "msg",
    "msg-noreply": "msg (no reply per publish)",
    "msg-pure": "msg (no fast extra)",
    "relay": "ceiling relay",
    "relay-pure": "relay (stdlib)",
    "redis": "Redis",
    "nats": "NATS",
    "mosquitto": "Mosquitto",
    "rabbitmq": "RabbitMQ",
    "amqtt": "amqtt",
}
_COLORS = {
    "msg": "#d62728",
    "msg-noreply": "#8c1c13",
    "msg-pure": "#ff9896",
    "relay": "#7f7f7f",
    "relay-pure": "#c7c7c7",
    "redis": "#1f77b4",
    "nats": "#2ca02c",
    "mosquitto": "#9467bd",
    "rabbitmq": "#ff7f0e",
    "amqtt": "#8c564b",
}


def throughput(document: dict[str, Any], path: Path) -> Path:
    summary: dict[str, dict[str, dict[str, Any]]] = document["summary"]
    workloads = [w for w in ("A", "B", "C", "E") if w in summary]
    keys = [k for k in _LABELS if any(k in summary[w] for w in workloads)]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        values = [summary[w].get(key, {}).get("rate") or 0 for w in workloads]
        xs = [x + i * width for x in range(len(workloads))]
        ax.bar(xs, values, width, label=_LABELS[key], color=_COLORS[key])
    ax.set_xticks([x + width * (len(keys) - 1) / 2 for x in range(len(workloads))])
    names = {
        "A": "A pub/sub 1->1",
        "B": "B fan-out 1->10\n(deliveries/s)",
        "C": "C queue 1->4, acks",
        "E": "E durable queue, acks",
    }
    ax.set_xticklabels([names[w] for w in workloads])
    ax.set_yscale("log")
    ax.set_ylabel("messages/s (log)")
    ax.set_title(f"Throughput, 100-byte messages ({document['mode']}, {document['started'][:10]})")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def latency(document: dict[str, Any], path: Path) -> Path:
    cells: dict[str, dict[str, Any]] = document["summary"].get("D", {})
    fig, ax = plt.subplots(figsize=(9, 5))
    for key, cell in cells.items():
        cdf = cell.get("cdf_us")
        if not cdf:
            continue
        xs = [x for x, _ in cdf]
        ys = [y for _, y in cdf]
        ax.plot(
            xs,
            ys,
            label=f"{_LABELS.get(key, key)} (p99 {cell.get('p99_us')} us)",
            color=_COLORS.get(key),
        )
    ax.set_xscale("log")
    ax.set_xlabel("one-way latency, microseconds (log)")
    ax.set_ylabel("fraction of messages")
    ax.set_title("D: latency CDF at 1,000 msgs/s, pub/sub 1->1")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def scaling(document: dict[str, Any], path: Path) -> Path | None:
    runs: list[dict[str, Any]] = document["runs"]
    curves = [
        ("subscribers", "subscribers (fan-out)", "deliveries/s", "rate"),
        ("payload", "payload bytes", "msgs/s", "rate"),
        ("topics", "topics (1 subscriber to all)", "msgs/s", "rate"),
        ("backlog", "backlog depth (queue)", "msgs/s", "drain_rate"),
        ("idle", "idle connections", "broker RSS, MiB", "rss"),
    ]
    present = [c for c in curves if any(r["workload"] == c[0] for r in runs)]
    if not present:
        return None
    columns = min(3, len(present))
    rows = -(-len(present) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(present) :]:
        ax.set_visible(False)
    for ax, (curve, xlabel, ylabel, field) in zip(axes, present, strict=False):
        mine = [r for r in runs if r["workload"] == curve]
        for key in dict.fromkeys(r["target"] for r in mine):
            series = [r for r in mine if r["target"] == key]
            if field == "rss":
                points = [
                    (p["connections"], p["rss_kib"] / 1024)
                    for r in series
                    for p in r.get("points") or []
                    if p.get("rss_kib")
                ]
            else:
                points = [(r["point"], r.get(field)) for r in series if r.get(field)]
                if curve == "backlog":
                    pub = [(r["point"], r.get("publish_rate")) for r in series]
                    ax.plot(
                        *zip(*[p for p in pub if p[1]], strict=True),
                        marker="s",
                        linestyle="--",
                        label="publish (no consumer)",
                        color="#555555",
                    )
            if points:
                label = _LABELS.get(key, key) + (" drain" if curve == "backlog" else "")
                ax.plot(*zip(*points, strict=True), marker="o", label=label, color=_COLORS.get(key))
        if curve != "idle":
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            ax.axhline(250e6 / 2**20, color="#999999", linestyle=":", label="target 250 MB")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"msg scaling ({document['mode']}, {document['started'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_all(document: dict[str, Any], prefix: Path) -> list[Path]:
    """Every chart the document has data for, as ``PREFIX-<name>.png``."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if any(w in document["summary"] for w in ("A", "B", "C", "E")):
        written.append(throughput(document, prefix.with_name(prefix.name + "-throughput.png")))
    if document["summary"].get("D"):
        written.append(latency(document, prefix.with_name(prefix.name + "-latency.png")))
    curves = scaling(document, prefix.with_name(prefix.name + "-scaling.png"))
    if curves is not None:
        written.append(curves)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="charts from a suite results JSON")
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, help="file prefix (default: next to the JSON)")
    options = parser.parse_args(argv)
    document = json.loads(options.results.read_text())
    prefix = options.out or options.results.with_suffix("")
    for path in write_all(document, prefix):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
