"""The process settings the command line applies (msg.broker.process).

Run in a child interpreter: they change the whole process (the garbage collector is
frozen), which the test process must not inherit.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import gc
from msg.broker.process import _keep_freed_memory, tune_process
tune_process()
print(gc.get_threshold(), gc.get_freeze_count() > 0, _keep_freed_memory())
"""


def test_tune_process_settles_the_collector_and_malloc() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    threshold, frozen, malloc_set = done.stdout.rsplit(None, 2)
    assert threshold == "(10000, 10, 10)"
    assert frozen == "True"
    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    assert malloc_set == str(glibc)


@pytest.mark.skipif(sys.platform != "linux", reason="the page-fault count is read from /proc")
def test_large_buffers_stop_faulting_in_fresh_pages_once_malloc_is_set() -> None:
    # What the setting is for: a loop allocating and freeing ~300 KB buffers (as each
    # batch of the broker does) touches fresh pages on every round with glibc's
    # defaults, and reuses the same memory once set.
    script = """
import resource, sys
from msg.broker.process import _keep_freed_memory
if sys.argv[1] == "set":
    _keep_freed_memory()
parts = [b"x" * 200] * 1500
kept = []
def batch(k):
    read = b"".join(parts)  # a read, cut into many small objects
    lines = read.split(b"x" * 50)
    records = b"".join(parts[: 1000 + k % 500])
    replies = b"".join(parts[: 300 + k % 700])
    del read
    kept.append(lines[:10])
    if len(kept) > 20:
        kept.pop(0)
    return records, replies
for k in range(50):
    batch(k)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(500):
    batch(k)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is only set with glibc")
    faults = {}
    for mode in ("default", "set"):
        done = subprocess.run(
            [sys.executable, "-c", script, mode],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        faults[mode] = int(done.stdout)
    if faults["default"] < 1000:
        pytest.skip(f"this glibc keeps the memory by itself ({faults['default']} faults)")
    assert faults["set"] < 100, faults
