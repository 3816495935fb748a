"""The benchmark suite's own logic, without brokers or sockets: what msg-noreply sends,
how its publisher notices errors, which workloads it runs, and how D's target reads.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks import suite
from benchmarks.peers import DRIVERS
from benchmarks.peers.base import NoReplies, payload

ERROR = b'{"type":"error","reply":false,"error":"queue is full","code":"queue_full"}\n'


def test_no_reply_publish_is_the_fast_shape() -> None:
    driver = DRIVERS["msg-noreply"]("127.0.0.1", 0, "t")
    frames = [driver.encode_publish(driver.topic(0), payload(n, 100), n, False) for n in (0, 99)]
    assert len(frames[0]) == len(frames[1])  # the generator needs frames of one length
    request = json.loads(frames[0])
    assert list(request) == ["action", "topic", "mode", "reply", "message"]
    assert request["reply"] is False
    assert request["mode"] == "pubsub"
    assert driver.pubsub_acks is False
    assert driver.supports_queue is False


@pytest.mark.parametrize("cut", [0, 1, 7, 14, 15, 16, 40, len(ERROR)])  # marker: 15 bytes
def test_no_reply_counts_an_error_cut_anywhere(cut: int) -> None:
    counter = NoReplies(b'{"type":"error"')
    for part in (b"", ERROR[:cut], ERROR[cut:], ERROR):
        counter.feed(part)
    assert counter.errors == 2
    assert counter.first_error is not None
    assert counter.first_error.startswith(b'{"type":"error"')  # up to the line's end, or the read's
    assert b"\n" not in counter.first_error


def test_msg_noreply_runs_the_pubsub_workloads_by_default() -> None:
    jobs = suite.plan(suite.parse_args(["--no-scaling"]))
    ran = {job.workload for job in jobs if job.target.key == "msg-noreply"}
    assert ran == {"A", "B", "D"}
    assert {job.workload for job in jobs if job.target.key == "msg"} == set("ABCDE")
    assert "msg-noreply" not in suite.parse_args(["--fast", "no"]).targets


def _document(d_cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary = {"D": d_cells}
    return {
        "started": "2026-11-28T00:00:00+00:00",
        "mode": "msg --fsync always",
        "pinning": "not pinned",
        "summary": summary,
        "runs": [],
        "notes": [],
        "targets": suite.check_targets(summary, []),
    }


def _d_target(document: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(
        check for check in document["targets"] if check["target"] == "D p99 <= NATS p99"
    )
    return found


def test_d_target_is_msg_acked_against_nats_core_with_like_for_like_beside() -> None:
    document = _document(
        {
            "msg": {"status": "ok", "p99_us": 1000.0},
            "msg-noreply": {"status": "ok", "p99_us": 1500.0},
            "nats": {"status": "ok", "p99_us": 1250.0},
            "nats-verbose": {"status": "ok", "p99_us": 2500.0},
        }
    )
    check = _d_target(document)
    assert check["measured"] == pytest.approx(0.8)
    assert check["met"] is True
    assert [round(b["measured"], 2) for b in check["beside"]] == [1.2, 0.4]
    row = next(line for line in suite.markdown(document).splitlines() if "D p99 <=" in line)
    assert "0.80 (msg p99 / NATS p99, msg acking every publish)" in row
    assert "1.20 (msg-noreply p99 / NATS p99, neither answers a publish)" in row
    assert "0.40 (msg p99 / NATS +OK p99, both answer every publish)" in row
    assert row.endswith("| yes |")


def test_d_target_is_not_met_without_a_clean_msg_run() -> None:
    no_reply_only = _document(
        {
            "msg-noreply": {"status": "ok", "p99_us": 900.0},
            "nats": {"status": "ok", "p99_us": 1000.0},
        }
    )
    check = _d_target(no_reply_only)
    assert check["measured"] is None
    assert check["met"] is None
    assert [round(b["measured"], 2) for b in check["beside"]] == [0.9]
    failed = _document(
        {
            "msg": {"status": "incomplete", "errors": 3, "p99_us": 500.0},
            "nats": {"status": "ok", "p99_us": 1000.0},
        }
    )
    check = _d_target(failed)
    assert check["met"] is None
    assert "msg runs: incomplete, 3 errors" in check["text"]


def _d_run(key: str, repetition: int, latencies_us: list[int]) -> suite.Run:
    job = suite.Job("D", suite.TARGETS[key], [], 10.0, repetition=repetition)
    ns = [us * 1000 for us in latencies_us]
    result = {"status": "ok", "latency": {"p99_us": float(max(latencies_us))}}
    return suite.Run(job, result, {}, {"latency_ns": ns, "send_late_ns": [0] * len(ns)})


def test_d_pools_every_repetitions_samples() -> None:
    # One quiet repetition and one with a stall: the pooled p99 is that of all 200
    # messages, not the median of two per-repetition figures.
    quiet = [100] * 100
    stalled = [100] * 97 + [5000] * 3
    runs = [_d_run("nats", 0, quiet), _d_run("nats", 1, stalled)]
    cell = suite.summarise(runs)["D"]["nats"]
    assert cell["p99_us"] == 5000.0  # 3 of 200 samples lie above the 99th percentile
    assert cell["p50_us"] == 100.0
    assert cell["p99_by_repetition"] == [100.0, 5000.0]
    assert cell["pooled"] == "all samples of all repetitions"


def test_d_target_shows_the_ratio_of_each_repetition() -> None:
    runs = [
        _d_run("nats", 0, [100] * 100),
        _d_run("nats", 1, [200] * 100),
        _d_run("msg", 0, [50] * 100),
        _d_run("msg", 1, [300] * 100),
        _d_run("msg-noreply", 0, [150] * 100),
        _d_run("msg-noreply", 1, [100] * 100),
    ]
    summary = suite.summarise(runs)
    [check] = [c for c in suite.check_targets(summary, runs) if c["target"].startswith("D")]
    assert "by repetition 0.50, 1.50" in check["text"]
    assert "by repetition 1.50, 0.50" in check["beside"][0]["text"]
