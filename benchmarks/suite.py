"""msg's benchmark suite: one command, every workload, every reachable peer.

    python -m benchmarks.suite                 # everything (15-25 min): tables, JSON, charts
    python -m benchmarks.suite --quick         # < 1 min: A and C, msg vs the ceiling relay
    python -m benchmarks.suite --fsync never   # msg without waiting for the disk (not E)

See docs/benchmarks.md for what is measured and how to read it.

Method
------
- Every measurement starts a fresh broker (:mod:`benchmarks.servers`) pinned to one
  CPU, and one load-generator process (:mod:`benchmarks.loadgen`) pinned to another,
  then stops both. Both processes' CPU over the timed window is recorded: a generator
  near 100% of its core means the figure is client-bound (flagged in the report).
- The same workloads run against msg (with and without the ``fast`` extra), the
  reference relay (the CPython ceiling) and every peer that can be had: Redis, NATS,
  Mosquitto, RabbitMQ and amqtt, each spoken to in its own protocol by a raw-socket
  driver (:mod:`benchmarks.peers`). A peer that cannot be started or reached is
  skipped with the reason. ``msg-noreply`` is msg publishing with ``"reply": false``
  (answered only on error), in the pub/sub workloads A, B and D: beside D's target
  it compares msg with NATS core like for like, neither answering a publish
  (:func:`add_latency`).
- Every workload is bounded in count (pre-encoded messages) and time (publishing
  stops after ``duration`` seconds; the generator and the broker are killed past a
  hard timeout). Loss and duplicates are counted in every run from the sequence
  numbers in the payloads.
- Ratios (msg / peer) are computed from the same run of the suite, minutes apart on
  the same machine; they are steadier than absolute figures on a shared VM.
- D (latency) is taken in short slices interleaved across the brokers and pooled per
  broker (:func:`plan_latency`), so that every broker meets the same host noise.

Workloads: A pub/sub 1->1 (deliveries/s); B fan-out 1->10 (deliveries/s); C queue
1 -> 4 consumers with manual acks (confirmed acks/s); D latency at 1,000 msgs/s
(p50/p99/p99.9); E = C on durable storage (msg ``--fsync always``, Redis AOF
``appendfsync always``, JetStream file storage, RabbitMQ durable queue with
persistent messages and publisher confirms). Scaling curves (msg): subscribers,
payload size, topics, backlog depth, idle connections vs RSS.

Exit status: 0 if every msg run completed without loss, duplicates or errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks import servers
from benchmarks.peers import DRIVERS
from benchmarks.servers import REPO_ROOT, UnavailableError

RESULTS_DIR: Final = REPO_ROOT / "benchmarks" / "results"
GRACE: Final = 30.0
"""Seconds a generator may outlive its own timeout (pre-encoding, checking)."""
MAX_FRAMES: Final = 3_000_000
BUSY_PERCENT: Final = 20.0
"""Other processes' CPU on the broker's core (% of it) above which a run is disturbed."""
WARMUP: Final = 0.5
"""D slices: seconds at the start of each not timed (connections, the broker's caches)."""
LATE_SEND_US: Final = 250.0
"""D: a generator whose sends were this late at p99 (a quarter of the interval) was
itself held up, and the run's figures say more about the machine than the broker: such
a run is measured again like one with other load (see disturbance)."""


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    server: str
    driver: str
    max_rate: int
    """Upper bound on msgs/s, to size the pre-encoded publishes (duration x this)."""
    pure: bool = False

    @property
    def is_msg(self) -> bool:
        return self.server == "msg"


TARGETS: Final = {
    t.key: t
    for t in (
        Target("msg", "msg", "msg", "msg", 500_000),
        # msg with "reply": false on every publish (pub/sub only: A, B, D): like NATS core
        # and MQTT QoS 0, nothing answers a stored publish. Beside D's target.
        Target("msg-noreply", "msg, no reply per publish", "msg", "msg-noreply", 500_000),
        Target("msg-pure", "msg, no fast extra", "msg", "msg", 300_000, pure=True),
        Target("relay", "ceiling relay", "relay", "relay", 800_000),
        Target("relay-pure", "ceiling relay, stdlib", "relay", "relay", 400_000, pure=True),
        Target("redis", "Redis", "redis", "redis", 1_000_000),
        Target("nats", "NATS", "nats", "nats", 1_200_000),
        # Only on request (--targets): NATS answering every publish (+OK), for D.
        Target("nats-verbose", "NATS, +OK per publish", "nats", "nats-verbose", 1_200_000),
        Target("mosquitto", "Mosquitto", "mosquitto", "mqtt", 300_000),
        Target("rabbitmq", "RabbitMQ", "rabbitmq", "amqp", 150_000),
        Target("amqtt", "amqtt", "amqtt", "mqtt", 30_000),
    )
}
PEERS: Final = ("redis", "nats", "mosquitto", "rabbitmq", "amqtt")

WORKLOAD_LABELS: Final = {
    "A": "A pub/sub 1->1",
    "B": "B fan-out 1->10",
    "C": "C queue 1->4, acks",
    "D": "D latency @1k/s",
    "E": "E durable queue, acks",
}
SCALING_LABELS: Final = {
    "subscribers": "fan-out deliveries/s vs subscribers",
    "payload": "pub/sub 1->1 vs payload bytes",
    "topics": "pub/sub 1->1 vs topics",
    "backlog": "queue drain vs backlog depth",
    "idle": "broker RSS vs idle connections",
}


@dataclass
class Job:
    workload: str
    target: Target
    args: list[str]
    timeout: float
    fsync: str = "always"
    durable: bool = False
    point: int | None = None
    repetition: int = 0
    slice: int | None = None
    """D: which of its target's interleaved slices this is (see plan_latency)."""
    slices: int = 1


@dataclass
class Run:
    job: Job
    result: dict[str, Any]
    server: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[int]] | None = None
    """D slices: every timed latency and send lateness (ns), for the merge."""

    @property
    def ok(self) -> bool:
        res = self.result
        return (
            res.get("status") == "ok"
            and not res.get("lost")
            and not res.get("duplicated")
            and not res.get("publish_errors")
            and not res.get("receive_errors")
        )

    def to_json(self) -> dict[str, Any]:
        job = self.job
        return {
            **self.result,
            "generator_workload": self.result.get("workload"),
            "workload": job.workload,
            "target": job.target.key,
            "point": job.point,
            "repetition": job.repetition,
            "fsync": job.fsync if job.target.is_msg else None,
            "durable": job.durable,
            "args": job.args,
            "server": self.server,
            "ok": self.ok,
        }


def disturbance(run: Run) -> float:
    """How disturbed a run was, as a multiple of the limit (above 1.0: disturbed).

    Other processes' CPU on the broker's core counts against BUSY_PERCENT. For D, so
    does how late the generator sent (p99) against LATE_SEND_US: its sends run on their
    own core by a kernel timer, so when they fall behind, the machine held the
    generator up (a shared VM's host, mostly), and the same stalls land in the
    latencies of whichever broker happens to be measured. The rule is the same for
    every broker.
    """
    result = run.result
    score = (result.get("other_cpu_percent") or 0) / BUSY_PERCENT
    late = (result.get("send_late_us") or {}).get("p99_us")
    if run.job.workload == "D" and result.get("pacing") == "timer" and late is not None:
        score = max(score, late / LATE_SEND_US)
    return float(score)


# ----------------------------------------------------------------------
# Planning


def frames(target: Target, seconds: float, share: float = 1.0) -> int:
    return max(1_000, min(MAX_FRAMES, int(target.max_rate * seconds * share)))


def plan(options: argparse.Namespace) -> list[Job]:
    """Every measurement of this run, in order."""
    duration = 2.0 if options.quick else options.duration
    timeout = duration + 30.0
    targets = [TARGETS[k] for k in options.targets]
    wanted = options.workloads
    common = f"--duration {duration} --payload {options.payload}"
    queue = "--workload queue --consumers 4 --prefetch 256"
    jobs: list[Job] = []

    def add(workload: str, target: Target, args: str, durable: bool = False) -> Job:
        fsync = "always" if durable else options.fsync
        limit = options.latency_seconds + 30.0 if workload == "D" else timeout
        jobs.append(Job(workload, target, args.split(), limit, fsync, durable))
        return jobs[-1]

    for repetition in range(options.repeat):
        first = len(jobs)

        for target in targets:
            if "A" in wanted:
                n = frames(target, duration)
                add("A", target, f"--workload pubsub --messages {n} {common}")
        for target in targets:
            if "B" in wanted and not target.key.startswith("relay-"):
                n = frames(target, duration, 0.3)
                add("B", target, f"--workload pubsub --subscribers 10 --messages {n} {common}")
        for target in targets:
            if not DRIVERS[target.driver].supports_queue:
                continue  # no work queues (the relay, MQTT), or not their point (msg-noreply)
            n = frames(target, duration, 0.5)
            if "C" in wanted:
                add("C", target, f"{queue} --messages {n} {common}")
            if "E" in wanted:
                add("E", target, f"{queue} --durable --messages {n} {common}", durable=True)
        if "D" in wanted:
            plan_latency(options, [t for t in targets if not t.key.startswith("relay-")], add)
        for job in jobs[first:]:
            job.repetition = repetition
    if options.scaling and not options.quick:
        jobs += plan_scaling(options)
    return jobs


def plan_latency(
    options: argparse.Namespace, targets: list[Target], add: Callable[[str, Target, str], Job]
) -> None:
    """D's runs: each target's ``--latency-seconds`` cut into interleaved slices.

    A p99 over ten seconds counts the host's stalls in those seconds, and on a shared
    VM they come and go over minutes: measured one broker after another, whichever
    ran in a noisy stretch looks slow. So each broker's run is cut into
    ``--latency-slices`` short runs (a fresh broker and generator each, half a second
    of warm-up not timed), taken round-robin across the brokers with the order
    rotated every round, and its slices' samples are merged into one distribution
    (:func:`merge_slices`). Every broker then samples the same stretch of the
    machine's weather, and the ratios compare brokers rather than moments.
    """
    count = max(1, options.latency_slices)
    seconds = options.latency_seconds / count
    args = f"--workload latency --rate 1000 --payload {options.payload}"
    if count == 1:
        for target in targets:
            add("D", target, f"{args} --duration {seconds}")
        return
    for round_ in range(count):
        shift = round_ % max(1, len(targets))
        for target in targets[shift:] + targets[:shift]:
            job = add("D", target, f"{args} --duration {seconds + WARMUP} --warmup {WARMUP}")
            job.slice, job.slices = round_, count


def plan_scaling(options: argparse.Namespace) -> list[Job]:
    """The scaling curves: short points, msg only (and the relay for payload sizes)."""
    fsync = options.fsync
    msg = TARGETS["msg"]
    wanted = options.scaling_curves
    jobs: list[Job] = []

    def add(curve: str, target: Target, point: int, args: str, timeout: float = 60.0) -> None:
        jobs.append(Job(curve, target, args.split(), timeout, fsync, point=point))

    if "subscribers" in wanted:
        for subs in (1, 10, 100, 1000):
            n = max(300, 300_000 // subs)
            add(
                "subscribers",
                msg,
                subs,
                f"--workload pubsub --subscribers {subs} "
                f"--messages {n} --duration 2 --window-bytes {1 << 20}",
            )
    if "payload" in wanted:
        for target in (msg, TARGETS["relay"]):
            for size in (16, 256, 4096, 65536):
                n = min(frames(target, 2.0), (256 << 20) // size)
                add(
                    "payload",
                    target,
                    size,
                    f"--workload pubsub --messages {n} --duration 2 "
                    f"--payload {size} --window-bytes {32 << 20}",
                )
    if "topics" in wanted:
        for topics in (1, 100, 10_000, 100_000):
            n = max(100_000, topics)
            add(
                "topics",
                msg,
                topics,
                f"--workload pubsub --topics {topics} --messages {n} --duration 2",
                timeout=120.0,
            )
    if "backlog" in wanted:
        for depth in (1_000, 10_000, 100_000):
            add(
                "backlog",
                msg,
                depth,
                f"--workload backlog --messages {depth} --consumers 4",
                timeout=120.0,
            )
    if "idle" in wanted:
        for target in (msg, TARGETS["msg-pure"]):
            add("idle", target, 10_000, "--workload idle --levels 1000,5000,10000", 180.0)
    return jobs


# ----------------------------------------------------------------------
# Running


def choose_cpus(enabled: bool) -> tuple[set[int] | None, set[int] | None, str]:
    if not enabled:
        return None, None, "not pinned (--no-pin)"
    if not hasattr(os, "sched_getaffinity"):
        return None, None, "not pinned (no sched_setaffinity here)"
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None, f"not pinned (only CPU {allowed} available)"
    return (
        {allowed[0]},
        {allowed[1]},
        f"broker pinned to CPU {allowed[0]}, generator to CPU {allowed[1]} ({os.cpu_count()} CPUs)",
    )


def msg_source(tree: Path | None) -> str:
    """Which msg is measured: the repo's commit (and whether msg/ has local changes)."""
    if tree is not None:
        return f"tree {tree}"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "msg"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "this repository"
    return commit + (" + uncommitted changes in msg/" if dirty else "")


def rabbitmq_version() -> str:
    from benchmarks.peers.amqp import AmqpDriver

    try:
        return AmqpDriver("127.0.0.1", servers.SHARED_PORTS["rabbitmq"], "v").version()
    except (OSError, ConnectionError):
        return ""


def machine_load(cpus: set[int] | None, seconds: float = 0.5) -> float | None:
    """% of one core that processes used on ``cpus`` (all if None) over ``seconds``,
    while the suite itself is idle."""
    from benchmarks.loadgen import system_busy_seconds

    which = frozenset(cpus) if cpus is not None else None
    before = system_busy_seconds(which)
    time.sleep(seconds)
    after = system_busy_seconds(which)
    if before is None or after is None:
        return None
    return 100 * (after - before) / seconds


def wait_quiet(cpus: set[int] | None, limit: float) -> float | None:
    """Wait up to ``limit`` seconds for other load on ``cpus`` to drop below BUSY_PERCENT."""
    deadline = time.monotonic() + limit
    load = machine_load(cpus)
    while load is not None and load > BUSY_PERCENT and time.monotonic() < deadline:
        load = machine_load(cpus, 1.0)
    return load


def run_job(
    job: Job,
    options: argparse.Namespace,
    cpus: tuple[set[int] | None, set[int] | None],
    data_root: Path,
) -> Run:
    target = job.target
    load = wait_quiet(cpus[0], options.quiet_wait) if options.quiet_wait > 0 else None
    try:
        server = servers.start(
            target.server,
            cpus[0],
            fsync=job.fsync,
            pure=target.pure,
            durable=job.durable,
            msg_tree=options.msg_tree,
            data_root=data_root,
        )
    except UnavailableError as exc:
        return Run(job, {"status": "skipped", "error": str(exc)})
    info: dict[str, Any] = {"banner": server.banner, "note": server.note, "pid": server.pid}
    info["load_before_percent"] = None if load is None else round(load, 1)
    try:
        command = [
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            "--driver",
            target.driver,
            "--port",
            str(server.port),
            "--timeout",
            str(job.timeout),
            *job.args,
        ]
        if server.pid:
            command += ["--broker-pid", str(server.pid)]
        samples_path = None
        if job.slice is not None:
            samples_path = data_root / f"D-{target.key}-{job.repetition}-{job.slice}.json"
            command += ["--samples-out", str(samples_path)]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )
        servers.pin(process.pid, cpus[1])
        try:
            out, err = process.communicate(timeout=job.timeout + GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            result: dict[str, Any] = {"status": "hung", "error": "generator killed"}
        else:
            try:
                result = json.loads(out.strip().splitlines()[-1])
            except (IndexError, ValueError):
                result = {"status": "error", "error": f"no result; stderr: {err[-600:]}"}
        if not server.alive() and result.get("status") == "ok":
            result["status"] = "server-died"
        samples = None
        if samples_path is not None and samples_path.exists():
            samples = json.loads(samples_path.read_text())
            samples_path.unlink()
    finally:
        info["exit"] = server.stop()
        info["problems"] = server.problems()[:20]
    return Run(job, result, info, samples)


def merge_slices(slices: list[Run]) -> Run:
    """One D run from a target's interleaved slices (see plan_latency).

    Latencies and send lateness are the slices' samples pooled, so percentiles are
    those of the whole distribution, not averages of percentiles; counts add up; CPU
    figures are the slices' means; the status is the first that was not ok. Each
    slice's own p50/p99 stays in the result (``slices``) to show how much the
    machine moved meanwhile.
    """
    from benchmarks.loadgen import percentiles

    first = slices[0]
    job = dataclasses.replace(first.job, slice=None)
    for part in slices:
        if part.result.get("status") == "skipped":
            return Run(job, part.result)
    latencies = [ns for part in slices for ns in (part.samples or {}).get("latency_ns", [])]
    late = [ns for part in slices for ns in (part.samples or {}).get("send_late_ns", [])]
    results = [part.result for part in slices]
    statuses = [str(r.get("status")) for r in results]
    merged: dict[str, Any] = {
        "workload": first.result.get("workload"),
        "driver": first.result.get("driver"),
        "status": next((s for s in statuses if s != "ok"), "ok"),
        "pacing": first.result.get("pacing"),
        "first_error": next((r["first_error"] for r in results if r.get("first_error")), None),
        "latency": percentiles(latencies),
        "send_late_us": {k: v for k, v in percentiles(late).items() if k != "cdf_us"},
    }
    for key in ("published", "deliveries", "unique", "lost", "duplicated", "warmup_skipped"):
        merged[key] = sum(int(r.get(key) or 0) for r in results)
    for key in ("publish_errors", "receive_errors"):
        if any(key in r for r in results):
            merged[key] = sum(int(r.get(key) or 0) for r in results)
    for key in ("broker_cpu_percent", "generator_cpu_percent", "other_cpu_percent"):
        values = [r[key] for r in results if r.get(key) is not None]
        merged[key] = round(statistics.fmean(values), 1) if values else None
    if not all(part.samples for part in slices):
        merged["error"] = "a slice left no samples (see its status)"
    merged["slices"] = [
        {
            "status": r.get("status"),
            "p50_us": (r.get("latency") or {}).get("p50_us"),
            "p99_us": (r.get("latency") or {}).get("p99_us"),
            "send_late_p99_us": (r.get("send_late_us") or {}).get("p99_us"),
            "other_cpu_percent": r.get("other_cpu_percent"),
        }
        for r in results
    ]
    server = dict(first.server)
    server["problems"] = [line for part in slices for line in part.server.get("problems", [])][:20]
    server["exit"] = next((p.server.get("exit") for p in slices if p.server.get("exit")), 0)
    pooled = {"latency_ns": latencies, "send_late_ns": late} if latencies else None
    return Run(job, merged, server, pooled)


def describe(run: Run) -> str:
    res = run.result
    job = run.job
    point = f"[{job.point}]" if job.point is not None else ""
    tag = f"{job.workload}{point} {job.target.key}"
    status = res.get("status")
    if status == "skipped":
        return f"  {tag:<28} skipped: {res.get('error')}"
    if job.workload == "D":
        lat = res.get("latency") or {}
        figure = f"p50 {lat.get('p50_us')} us  p99 {lat.get('p99_us')} us"
        late = (res.get("send_late_us") or {}).get("p99_us")
        if late is not None:
            figure += f"  sent late {late:.0f} us (p99)"
    elif job.workload == "backlog":
        figure = f"publish {_n(res.get('publish_rate'))}/s drain {_n(res.get('drain_rate'))}/s"
    elif job.workload == "idle":
        points = res.get("points") or []
        figure = ", ".join(f"{p['connections']}: {_mib(p.get('rss_kib'))}" for p in points)
    else:
        figure = (
            f"{_n(res.get('rate')):>10}/s  broker {_pct(res.get('broker_cpu_percent'))} "
            f"gen {_pct(res.get('generator_cpu_percent'))}"
        )
    if res.get("other_cpu_percent") is not None:
        figure += f" other {_pct(res.get('other_cpu_percent'))}"
    extra = ""
    if res.get("lost") or res.get("duplicated"):
        extra += f"  LOST {res.get('lost')} DUP {res.get('duplicated')}"
    if res.get("error") or res.get("first_error"):
        extra += f"  ({res.get('error') or res.get('first_error')})"
    return f"  {tag:<28} {figure}  {status}{extra}"


# ----------------------------------------------------------------------
# Summaries


def _n(value: Any) -> str:
    return "-" if value is None else f"{float(value):,.0f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0f}%"


def _mib(kib: Any) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f} MiB"


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: list[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """workload -> target -> median figures over repetitions (A-E only)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for workload in WORKLOAD_LABELS:
        for key in TARGETS:
            mine = [r for r in runs if r.job.workload == workload and r.job.target.key == key]
            if not mine:
                continue
            res = [r.result for r in mine]
            cell: dict[str, Any] = {
                "status": "ok"
                if all(r.ok for r in mine)
                else ",".join(sorted({str(x.get("status")) for x in res})),
                "runs": len(mine),
                "lost": sum(int(x.get("lost") or 0) for x in res),
                "duplicated": sum(int(x.get("duplicated") or 0) for x in res),
                "errors": sum(
                    int(x.get("publish_errors") or 0) + int(x.get("receive_errors") or 0)
                    for x in res
                ),
                "note": next((x.get("error") for x in res if x.get("error")), None),
            }
            if workload == "D":
                cell.update(_latency_cell(mine))
            else:
                ok_rates = [x.get("rate") for r, x in zip(mine, res, strict=True) if r.ok]
                cell["rate"] = _median(ok_rates)
                cell["rate_any"] = _median([x.get("rate") for x in res])
                cell["broker_cpu"] = _median([x.get("broker_cpu_percent") for x in res])
                cell["generator_cpu"] = _median([x.get("generator_cpu_percent") for x in res])
            table.setdefault(workload, {})[key] = cell
    return table


def _latency_cell(mine: list[Run]) -> dict[str, Any]:
    """D's figures for one target over its repetitions.

    Interleaved repetitions are just more slices of the same weather (see
    plan_latency), so their samples are pooled too: the percentiles are those of every
    timed message of the target, the best estimate of a tail. Each repetition's own
    p99 is kept (``p99_by_repetition``) to show the spread. Runs without samples (one
    slice each, ``--latency-slices 1``) give the median over repetitions instead.
    """
    from benchmarks.loadgen import percentiles

    mine = sorted(mine, key=lambda r: r.job.repetition)
    res = [r.result for r in mine]
    by_repetition = [(x.get("latency") or {}).get("p99_us") for x in res]
    if all(r.samples for r in mine):
        latency = percentiles([ns for r in mine for ns in (r.samples or {})["latency_ns"]])
        late = percentiles([ns for r in mine for ns in (r.samples or {})["send_late_ns"]])
        cell: dict[str, Any] = {q: latency.get(q) for q in ("p50_us", "p99_us", "p999_us")}
        cell["max_us"] = latency.get("max_us")
        cell["cdf_us"] = latency.get("cdf_us")
        cell["send_late_p99_us"] = late.get("p99_us")
        cell["pooled"] = "all samples of all repetitions"
    else:
        cell = {
            q: _median([(x.get("latency") or {}).get(q) for x in res])
            for q in ("p50_us", "p99_us", "p999_us", "max_us")
        }
        cell["cdf_us"] = (res[0].get("latency") or {}).get("cdf_us")
        cell["send_late_p99_us"] = _median(
            [(x.get("send_late_us") or {}).get("p99_us") for x in res]
        )
        cell["pooled"] = "median over repetitions"
    cell["p99_by_repetition"] = by_repetition
    return cell


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def check_targets(
    summary: dict[str, dict[str, dict[str, Any]]], runs: list[Run]
) -> list[dict[str, Any]]:
    """The product targets, measured against this run's figures."""

    def rate(workload: str, key: str) -> float | None:
        value = summary.get(workload, {}).get(key, {}).get("rate")
        return float(value) if value is not None else None

    checks: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, text: str, higher: bool = True) -> None:
        met = None if value is None else (value >= goal if higher else value <= goal)
        checks.append({"target": name, "measured": value, "goal": goal, "text": text, "met": met})

    add(
        "A >= 60% of the ceiling relay",
        ratio(rate("A", "msg"), rate("A", "relay")),
        0.6,
        "msg A / relay A",
    )
    add("A >= 20x amqtt", ratio(rate("A", "msg"), rate("A", "amqtt")), 20.0, "msg A / amqtt A")
    add(
        "B ahead of Mosquitto",
        ratio(rate("B", "msg"), rate("B", "mosquitto")),
        1.0,
        "msg B / Mosquitto B",
    )
    add(
        "E >= Redis appendfsync always",
        ratio(rate("E", "msg"), rate("E", "redis")),
        1.0,
        "msg E / Redis E",
    )
    add_latency(summary.get("D", {}), checks)
    idle = [r for r in runs if r.job.workload == "idle" and r.job.target.key == "msg"]
    rss = None
    for run in idle:
        for point in run.result.get("points") or []:
            if point.get("connections") == 10_000 and point.get("rss_kib"):
                rss = point["rss_kib"] / 1024
    add("10,000 idle connections: RSS <= 250 MB", rss, 250 * 1e6 / 2**20, "MiB", higher=False)
    for workload in ("A", "B", "C", "E"):
        add(
            f"{workload} without fast extra >= 50% of with",
            ratio(rate(workload, "msg-pure"), rate(workload, "msg")),
            0.5,
            f"msg-pure {workload} / msg {workload}",
        )
    return checks


def add_latency(cells: dict[str, dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    """D's target: msg's p99 no worse than NATS's.

    The target's figure is msg as it publishes by default, acking every publish once
    it is stored, against NATS core, which answers no ``PUB``: the comparison in which
    msg does the more work. Beside it (``beside``) stand the like-for-like figures:
    ``msg-noreply`` (publishing with ``"reply": false``) against NATS core, neither
    answering a publish, and msg acked against NATS answering ``+OK`` to every
    publish, when those ran. Each gives its ratio by repetition too. Not met
    (``None``) when msg did not run, or ran with loss, duplicates or errors.
    """

    def p99(key: str) -> float | None:
        value = cells.get(key, {}).get("p99_us")
        return float(value) if value is not None else None

    def described(mine: str, theirs: str, text: str) -> str:
        """``text``, with the ratio of each repetition and any failed runs."""
        cell = cells.get(mine, {})
        per_mine = cell.get("p99_by_repetition") or []
        per_theirs = cells.get(theirs, {}).get("p99_by_repetition") or []
        if len(per_mine) > 1 and len(per_mine) == len(per_theirs):
            each = [ratio(a, b) for a, b in zip(per_mine, per_theirs, strict=True)]
            text += "; by repetition " + ", ".join("-" if r is None else f"{r:.2f}" for r in each)
        status = cell.get("status")
        if status is not None and status != "ok":
            text += f"; {mine} runs: {status}, {cell.get('errors')} errors"
        return text

    value = ratio(p99("msg"), p99("nats"))
    status = cells.get("msg", {}).get("status")
    met = None if value is None or (status is not None and status != "ok") else value <= 1.0
    beside = [
        {"measured": ratio(p99(mine), p99(theirs)), "text": described(mine, theirs, text)}
        for mine, theirs, text in (
            ("msg-noreply", "nats", "msg-noreply p99 / NATS p99, neither answers a publish"),
            ("msg", "nats-verbose", "msg p99 / NATS +OK p99, both answer every publish"),
        )
        if p99(mine) is not None and p99(theirs) is not None
    ]
    checks.append(
        {
            "target": "D p99 <= NATS p99",
            "measured": value,
            "goal": 1.0,
            "text": described("msg", "nats", "msg p99 / NATS p99, msg acking every publish"),
            "met": met,
            "beside": beside,
        }
    )


# ----------------------------------------------------------------------
# Report


def markdown(document: dict[str, Any]) -> str:
    """The results as markdown tables (the same tables go into docs/benchmarks.md)."""
    summary: dict[str, dict[str, dict[str, Any]]] = document["summary"]
    keys = [k for k in TARGETS if any(k in summary.get(w, {}) for w in WORKLOAD_LABELS)]
    lines = [
        f"Run {document['started']} ({document['mode']}); {document['pinning']}.",
        "",
        "**Throughput** (msgs/s; B counts deliveries/s; C and E count acks/s) and "
        "**latency** at 1,000 msgs/s (microseconds)",
        "",
        "| target | A pub/sub 1->1 | B fan-out 1->10 | C queue, acks | E durable queue | "
        "D p50 | D p99 | D p99.9 |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for key in keys:
        cells = []
        for workload in ("A", "B", "C", "E"):
            cells.append(cell_text(summary.get(workload, {}).get(key)))
        lat = summary.get("D", {}).get(key)
        for q in ("p50_us", "p99_us", "p999_us"):
            cells.append(
                _n(lat.get(q))
                if lat and lat.get(q) is not None
                else (lat.get("status", "-") if lat else "")
            )
        lines.append(f"| {TARGETS[key].label} | " + " | ".join(cells) + " |")
    latency = summary.get("D", {})
    no_reply = latency.get("msg-noreply", {}).get("p99_us")
    lines += [
        "",
        "**msg compared with each peer, same run** (msg / peer for throughput: above 1 "
        "means msg is faster; for D, msg p99 / peer p99: below 1 means msg is better"
        + ('; D p99, no reply: msg publishing with `"reply": false`' if no_reply else "")
        + ")",
        "",
        "| msg vs | A | B | C | E | D p99 |" + (" D p99, no reply |" if no_reply else ""),
        "|---|--:|--:|--:|--:|--:|" + ("--:|" if no_reply else ""),
    ]
    for key in keys:
        if key == "msg":
            continue
        row = []
        for workload in ("A", "B", "C", "E"):
            mine = summary.get(workload, {}).get("msg", {}).get("rate")
            theirs = summary.get(workload, {}).get(key, {}).get("rate")
            value = ratio(mine, theirs)
            row.append("-" if value is None else f"{value:.2f}")
        theirs_p99 = latency.get(key, {}).get("p99_us")
        value = ratio(latency.get("msg", {}).get("p99_us"), theirs_p99)
        row.append("-" if value is None else f"{value:.2f}")
        if no_reply:
            value = None if key == "msg-noreply" else ratio(no_reply, theirs_p99)
            row.append("-" if value is None else f"{value:.2f}")
        lines.append(f"| {TARGETS[key].label} | " + " | ".join(row) + " |")
    lines += [
        "",
        "**CPU over the timed window** (broker / generator, % of one core)",
        "",
        "| target | A | B | C | E |",
        "|---|--:|--:|--:|--:|",
    ]
    for key in keys:
        row = []
        for workload in ("A", "B", "C", "E"):
            c = summary.get(workload, {}).get(key)
            row.append(f"{_pct(c.get('broker_cpu'))} / {_pct(c.get('generator_cpu'))}" if c else "")
        lines.append(f"| {TARGETS[key].label} | " + " | ".join(row) + " |")
    lines += ["", "**Targets**", "", "| target | measured | goal | met |", "|---|--:|--:|:-:|"]
    for check in document["targets"]:
        value = check["measured"]
        shown = "-" if value is None else f"{value:.2f}"
        met = {True: "yes", False: "**no**", None: "n/a"}[check["met"]]
        also = "".join(
            f"; {other['measured']:.2f} ({other['text']})" for other in check.get("beside") or []
        )
        lines.append(
            f"| {check['target']} | {shown} ({check['text']}){also} | {check['goal']:.2f} | {met} |"
        )
    scaling = scaling_tables(document["runs"])
    if scaling:
        lines += ["", "**Scaling (msg)**", "", *scaling]
    notes = document.get("notes") or []
    if notes:
        lines += ["", "**Notes**", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def cell_text(cell: dict[str, Any] | None) -> str:
    if not cell:
        return ""
    if cell.get("status") == "skipped":
        return "skipped"
    rate = cell.get("rate") if cell.get("rate") is not None else cell.get("rate_any")
    text = _n(rate)
    if cell.get("status") != "ok":
        text += f" ({cell.get('status')}"
        if cell.get("lost") or cell.get("duplicated"):
            text += f", lost {cell.get('lost')}, dup {cell.get('duplicated')}"
        text += ")"
    if (cell.get("generator_cpu") or 0) > 85:
        text += " !"
    return text


def scaling_tables(runs: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for curve, label in SCALING_LABELS.items():
        mine = [r for r in runs if r["workload"] == curve]
        if not mine:
            continue
        lines += [f"*{label}*", ""]
        if curve == "idle":
            lines += ["| target | connections | broker RSS |", "|---|--:|--:|"]
            for run in mine:
                for point in run.get("points") or []:
                    lines.append(
                        f"| {TARGETS[run['target']].label} | {point['connections']:,} | "
                        f"{_mib(point.get('rss_kib'))} |"
                    )
            if any(r.get("error") for r in mine):
                lines.append(
                    f"| error | {next(r.get('error') for r in mine if r.get('error'))} | |"
                )
        elif curve == "backlog":
            lines += ["| depth | publish msgs/s | drain msgs/s | status |", "|--:|--:|--:|---|"]
            for run in mine:
                lines.append(
                    f"| {run['point']:,} | {_n(run.get('publish_rate'))} | "
                    f"{_n(run.get('drain_rate'))} | {run.get('status')} |"
                )
        else:
            extra = {"payload": " | MB/s", "topics": " | first publish to each, msgs/s"}.get(
                curve, ""
            )
            lines += [
                f"| target | {curve} | msgs/s{extra} | broker CPU | status |",
                "|---|--:|--:|" + ("--:|" if extra else "") + "--:|---|",
            ]
            for run in mine:
                rate = run.get("rate")
                mbs = ""
                if curve == "payload":
                    mbs = " | " + ("-" if rate is None else f"{rate * run['point'] / 1e6:,.1f}")
                elif curve == "topics":
                    mbs = " | " + _n(run.get("first_touch_rate"))
                status = str(run.get("status"))
                if not run.get("ok"):
                    status += f" (lost {run.get('lost')}, dup {run.get('duplicated')})"
                lines.append(
                    f"| {TARGETS[run['target']].label} | {run['point']:,} | {_n(rate)}{mbs} | "
                    f"{_pct(run.get('broker_cpu_percent'))} | {status} |"
                )
        lines.append("")
    return lines


def collect_notes(runs: list[Run]) -> list[str]:
    notes: list[str] = []
    skipped: dict[str, str] = {}
    for run in runs:
        res = run.result
        key = run.job.target.key
        if res.get("status") == "skipped":
            skipped.setdefault(key, str(res.get("error")))
            continue
        tag = f"{run.job.workload} {run.job.target.label}"
        if not run.ok:
            notes.append(
                f"{tag}: status {res.get('status')}, lost {res.get('lost')}, "
                f"dup {res.get('duplicated')}, errors "
                f"{(res.get('publish_errors') or 0) + (res.get('receive_errors') or 0)}"
                + (
                    f": {res.get('error') or res.get('first_error')}"
                    if res.get("error") or res.get("first_error")
                    else ""
                )
            )
        if (res.get("other_cpu_percent") or 0) > BUSY_PERCENT:
            notes.append(
                f"{tag}: other processes used {res['other_cpu_percent']:.0f}% of a core "
                + (
                    f"on average over {len(res['slices'])} interleaved slices"
                    if res.get("slices")
                    else f"during the run (after {res.get('attempts', 1)} attempt(s))"
                )
                + ": figure disturbed"
            )
        if (res.get("generator_cpu_percent") or 0) > 85 and run.job.workload != "D":
            notes.append(
                f"{tag}: generator CPU {res['generator_cpu_percent']:.0f}%: "
                "the figure may be client-bound"
            )
        late = (res.get("send_late_us") or {}).get("p99_us")
        if run.job.workload == "D" and res.get("pacing") == "selector":
            notes.append(
                f"{tag}: no kernel timer here: sends paced by epoll's millisecond timeout "
                f"(p99 {late} us late), so some go in pairs"
            )
        elif run.job.workload == "D" and late is not None and late > LATE_SEND_US:
            how = (
                f"over {len(res['slices'])} interleaved slices"
                if res.get("slices")
                else f"after {res.get('attempts', 1)} attempt(s): figure disturbed"
            )
            notes.append(f"{tag}: the generator sent late (p99 {late:.0f} us, {how})")
        own = run.job.target.server in ("msg", "relay")  # peers' logs stay in the JSON
        for line in (run.server.get("problems") or [])[:2] if own else []:
            notes.append(f"{tag}: broker log: {line[:200]}")
    for key, reason in skipped.items():
        notes.append(f"{TARGETS[key].label} skipped: {reason}")
    return notes


def quick_report(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    relay = summary.get("A", {}).get("relay", {}).get("rate")
    lines = ["workload              target  msgs/s      vs relay A  broker CPU  gen CPU  status"]
    for workload in ("A", "C"):
        for key in ("relay", "msg", "msg-pure"):
            cell = summary.get(workload, {}).get(key)
            if not cell:
                continue
            value = ratio(cell.get("rate"), relay)
            shown = "1 (ref)" if key == "relay" else ("-" if value is None else f"{value:.3f}")
            lines.append(
                f"{WORKLOAD_LABELS[workload]:<21} {key:<7} {_n(cell.get('rate')):>10}  "
                f"{shown:>10}  {_pct(cell.get('broker_cpu')):>10}  "
                f"{_pct(cell.get('generator_cpu')):>7}  {cell.get('status')}"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="msg benchmark suite (docs/benchmarks.md)")
    parser.add_argument(
        "--quick", action="store_true", help="under a minute: A and C, msg and the relay only"
    )
    parser.add_argument(
        "--fsync",
        choices=["always", "everysec", "never"],
        default="always",
        help="msg's fsync policy for A-D and the curves (E is always 'always')",
    )
    parser.add_argument(
        "--fast",
        choices=["both", "yes", "no"],
        default="both",
        help="msg with the fast extra (orjson/uvloop), without, or both",
    )
    parser.add_argument("--targets", help="comma-separated subset of " + ",".join(TARGETS))
    parser.add_argument("--workloads", default="A,B,C,D,E", help="subset of A,B,C,D,E")
    parser.add_argument(
        "--no-scaling", dest="scaling", action="store_false", help="skip the scaling curves"
    )
    parser.add_argument(
        "--curves",
        dest="scaling_curves",
        default=",".join(SCALING_LABELS),
        help="subset of " + ",".join(SCALING_LABELS),
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds publishing per run")
    parser.add_argument(
        "--latency-seconds", type=float, default=10.0, help="D's timed seconds per broker"
    )
    parser.add_argument(
        "--latency-slices",
        type=int,
        default=5,
        help="D: cut each broker's seconds into this many runs, interleaved across the "
        "brokers (1: one run each, re-measured when disturbed)",
    )
    parser.add_argument("--payload", type=int, default=100, help="message bytes (default 100)")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions, interleaved")
    parser.add_argument(
        "--msg-tree",
        type=Path,
        help="directory holding the msg package to measure (default: this repo)",
    )
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    parser.add_argument(
        "--charts",
        action="store_true",
        default=None,
        help="write PNG charts (default: on unless --quick)",
    )
    parser.add_argument("--data-root", type=Path, help="where brokers' data dirs go")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait, before each measurement, for other load to drop "
        "(default 30; --quick 5; 0: don't)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        help=f"re-runs of a measurement disturbed by other load (> {BUSY_PERCENT:.0f}%% "
        f"of a core) or, in D, by a generator sending late (p99 > {LATE_SEND_US:.0f} us); "
        "default 2, --quick 1",
    )
    options = parser.parse_args(argv)
    if options.targets:
        options.targets = [t.strip() for t in options.targets.split(",") if t.strip()]
        unknown = set(options.targets) - set(TARGETS)
        if unknown:
            parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    elif options.quick:
        options.targets = ["relay", "msg"]
    else:
        options.targets = ["msg", "msg-noreply", "msg-pure", "relay", *PEERS]
    if options.fast == "yes":
        options.targets = [t for t in options.targets if not TARGETS[t].pure]
    elif options.fast == "no":
        fast = ("msg", "relay")  # servers that would run with the fast extra
        options.targets = [
            t for t in options.targets if TARGETS[t].pure or TARGETS[t].server not in fast
        ]
        options.targets = list(dict.fromkeys([*options.targets, "msg-pure", "relay-pure"]))
    workloads = {w.strip().upper() for w in options.workloads.split(",") if w.strip()}
    if options.quick:
        workloads &= {"A", "C"}
    options.workloads = workloads
    options.scaling_curves = {c.strip() for c in options.scaling_curves.split(",")}
    if options.retries is None:
        options.retries = 1 if options.quick else 2
    if options.quiet_wait is None:
        options.quiet_wait = 5.0 if options.quick else 30.0
    if options.charts is None:
        options.charts = not options.quick
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    server_cpus, generator_cpus, pinning = choose_cpus(not options.no_pin)
    started = datetime.datetime.now(datetime.UTC)
    found = servers.versions()
    found["msg"] = msg_source(options.msg_tree)
    if "rabbitmq" in options.targets:
        found["rabbitmq"] = rabbitmq_version()
    mode = ("quick, " if options.quick else "") + f"msg --fsync {options.fsync}"
    print(f"msg benchmark suite, {started:%Y-%m-%d %H:%M} UTC; {mode}; {pinning}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items() if v))
    jobs = plan(options)
    data_root = Path(tempfile.mkdtemp(prefix="msg-suite-", dir=options.data_root))
    runs: list[Run] = []
    began = time.monotonic()
    skipped: dict[str, str] = {}
    sliced: dict[tuple[str, int], list[Run]] = {}
    try:
        for job in jobs:
            if job.slice is not None:
                # Interleaved D slices are not re-measured: the machine's noise is
                # shared across brokers by the interleaving instead (plan_latency).
                if job.target.key in skipped:
                    part = Run(job, {"status": "skipped", "error": skipped[job.target.key]})
                else:
                    part = run_job(job, options, (server_cpus, generator_cpus), data_root)
                    print(describe(part) + f"  (slice {job.slice + 1}/{job.slices})", flush=True)
                parts = sliced.setdefault((job.target.key, job.repetition), [])
                parts.append(part)
                if part.result.get("status") == "skipped":
                    skipped.setdefault(job.target.key, str(part.result.get("error")))
                if len(parts) == job.slices:
                    runs.append(merge_slices(parts))
                    print(describe(runs[-1]) + f"  ({job.slices} slices merged)", flush=True)
                continue
            if job.target.key in skipped and job.target.server != "redis":
                runs.append(Run(job, {"status": "skipped", "error": skipped[job.target.key]}))
                continue
            run = latest = run_job(job, options, (server_cpus, generator_cpus), data_root)
            # Curves are not retried: their "other" load is mostly the kernel's own work
            # for the broker (file system journal with many topics), not other users.
            for _ in range(options.retries if job.workload in WORKLOAD_LABELS else 0):
                # Another user of the machine took CPU during the run, or (D) held up the
                # generator itself: measure again, keep the quietest.
                if disturbance(run) <= 1.0:
                    break
                print(describe(latest) + "  (disturbed: measuring again)", flush=True)
                latest = run_job(job, options, (server_cpus, generator_cpus), data_root)
                latest.result["attempts"] = int(run.result.get("attempts", 1)) + 1
                if disturbance(latest) < disturbance(run):
                    run = latest
                else:
                    run.result["attempts"] = latest.result["attempts"]
            if latest is not run:
                print(describe(latest) + "  (disturbed more: an earlier attempt kept)", flush=True)
            if run.result.get("status") == "skipped":
                skipped.setdefault(job.target.key, str(run.result.get("error")))
            runs.append(run)
            print(describe(run), flush=True)
    finally:
        shutil.rmtree(data_root, ignore_errors=True)
    summary = summarise(runs)
    document: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "mode": mode,
        "versions": found,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pinning": pinning,
        "settings": {
            k: sorted(v) if isinstance(v, set) else (str(v) if isinstance(v, Path) else v)
            for k, v in vars(options).items()
        },
        "summary": summary,
        "runs": [run.to_json() for run in runs],
        "notes": collect_notes(runs),
        "seconds": round(time.monotonic() - began, 1),
    }
    document["targets"] = check_targets(summary, runs)
    print()
    if options.quick:
        print(quick_report(summary))
        for note in document["notes"]:
            print(f"! {note}")
    else:
        print(markdown(document))
    out_dir = options.out or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    tag = "quick" if options.quick else f"fsync-{options.fsync}"
    json_path = out_dir / f"{stamp}-{tag}.json"
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    (out_dir / f"{stamp}-{tag}.md").write_text(markdown(document))
    print(f"wrote {json_path} and .md ({document['seconds']:.0f} s)")
    if options.charts:
        try:
            from benchmarks import charts
        except ImportError as exc:
            print(f"no charts ({exc}; pip install 'msg[bench]')")
        else:
            for path in charts.write_all(document, out_dir / f"{stamp}-{tag}"):
                print(f"wrote {path}")
    msg_runs = [r for r in runs if r.job.target.is_msg]
    return 0 if msg_runs and all(r.ok for r in msg_runs) else 1


if __name__ == "__main__":
    sys.exit(main())
