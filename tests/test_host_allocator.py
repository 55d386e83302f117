"""shared_data.host_allocator: after keep_freed_memory, repeated large allocations fault no new pages in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys, threading
import numpy as np
from shared_data import host_allocator
applied = host_allocator.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
def work():  # a second thread, as XLA's and torch's pools allocate from their own threads
    for step in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [np.ones(16 * 2**20, np.float32) for _ in range(3)]  # 3 x 64 MiB, touched
        del buffers
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(applied, max(faults[2:]))
"""


def faults_per_step(mode: str) -> tuple[str, int]:
    output = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True,
                            env={**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0"})  # numpy's huge pages would hide the faults
    applied, faults = output.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_pages_of_freed_large_buffers():
    applied, kept = faults_per_step("keep")
    _, default = faults_per_step("default")
    assert applied == "True"
    assert default > 40_000  # 192 MiB in 4 KiB pages, faulted in again every step under glibc's defaults
    assert kept < 1_000
