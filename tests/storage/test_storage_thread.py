"""The storage thread runs jobs one at a time, in the order given, and survives them.

- Posted and submitted jobs run in the order they were given, never two at once
  (sync rounds must not overlap; recovery and copies never run beside a round).
- A posted job that raises is logged, and the jobs after it still run.
- A submitted job's result or exception reaches its future (and ``run_in_executor``).
- ``shutdown`` runs every job already given, then joins; nothing is taken after it.
  With ``cancel_futures`` the submitted jobs not yet begun are cancelled, posted ones
  still run.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import CancelledError

import pytest

from msg.storage.thread import StorageThread


def test_jobs_run_one_at_a_time_in_the_order_given() -> None:
    ran: list[int] = []
    running = 0
    overlapped = threading.Event()

    def job(n: int) -> None:
        nonlocal running
        running += 1
        if running > 1:
            overlapped.set()
        time.sleep(0.001)  # long enough for a second worker, were there one, to start
        ran.append(n)
        running -= 1

    with StorageThread() as thread:
        futures = []
        for n in range(20):
            if n % 2:
                futures.append(thread.submit(job, n))
            else:
                thread.post(job, n)
    assert ran == list(range(20))
    assert not overlapped.is_set()
    assert all(future.done() for future in futures)


def test_a_posted_job_that_raises_is_logged_and_the_next_ones_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug in a job")

    with caplog.at_level(logging.ERROR, logger="msg.storage.thread"), StorageThread() as thread:
        thread.post(broken)
        thread.post(ran.append, "after")
        assert thread.submit(len, "four").result(timeout=10) == 4
    assert ran == ["after"]
    assert "a bug in a job" in caplog.text


async def test_a_submitted_job_answers_through_its_future() -> None:
    loop = asyncio.get_running_loop()
    thread = StorageThread()
    try:
        assert await loop.run_in_executor(thread, sum, [1, 2, 3]) == 6
        with pytest.raises(ZeroDivisionError):
            await loop.run_in_executor(thread, divmod, 1, 0)
    finally:
        thread.shutdown(wait=True)


def test_shutdown_runs_what_was_given_then_refuses_more() -> None:
    gate = threading.Event()
    ran: list[str] = []
    before = set(threading.enumerate())
    thread = StorageThread()
    thread.post(gate.wait, 10)
    thread.post(ran.append, "posted")
    submitted = thread.submit(ran.append, "submitted")
    gate.set()
    thread.shutdown(wait=True)
    assert ran == ["posted", "submitted"]
    assert submitted.done()
    assert set(threading.enumerate()) <= before  # joined
    with pytest.raises(RuntimeError):
        thread.post(ran.append, "late")
    with pytest.raises(RuntimeError):
        thread.submit(ran.append, "late")
    thread.shutdown(wait=True)  # twice is harmless


def test_shutdown_with_cancel_futures_cancels_submitted_jobs_not_begun() -> None:
    gate = threading.Event()
    ran: list[str] = []
    thread = StorageThread()
    thread.post(gate.wait, 10)
    submitted = thread.submit(ran.append, "submitted")
    thread.post(ran.append, "posted")
    thread.shutdown(wait=False, cancel_futures=True)
    gate.set()
    with pytest.raises(CancelledError):
        submitted.result(timeout=10)
    thread.shutdown(wait=True)
    assert ran == ["posted"]
