"""The process settings the command line applies (msg.broker.process).

Run in a child interpreter: they change the whole process (the garbage collector is
frozen), which the test process must not inherit.
"""

from __future__ import annotations

import platform
import subprocess
import sys

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
