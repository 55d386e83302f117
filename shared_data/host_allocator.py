"""The host allocator policy both stacks train and benchmark under: freed memory stays in the process for reuse."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_LARGEST_C_INT = 2**31 - 1  # mallopt takes a C int: a larger Python int would wrap silently (to 0: trim always)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel; True where applied
    (Linux with glibc), False elsewhere (nothing changed). Call it before the first framework thread starts (before
    JAX's backend or torch's thread pool exist): threads that already hold a malloc arena keep it.

    Why: XLA's CPU runtime allocates each train step's buffers anew; under glibc's defaults every buffer above the
    mmap threshold (at most 32 MiB) is mapped and unmapped per step, and the two XLA threads' arenas give their free
    space back too, so every step faults its pages in again, zero-filled by the kernel: about 475,000 minor faults per
    step (1.9 GB) at tiny window 8, 256 px, batch 8 (docs/performance.md). The three settings (one arena, no mmap, no
    trimming below 2 GiB) make the heap reuse those pages: 0 faults per step after the first. Google's own XLA builds
    run under tcmalloc, which keeps freed memory in the same way. Both stacks call this, so their comparison runs
    under one allocator policy.

    Cost: the heap stays at its peak (the training loop returns to that peak every step anyway), and malloc calls of
    all threads share one lock.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success, 0 on a refused setting.
    return all(mallopt(parameter, value) == 1 for parameter, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _LARGEST_C_INT)))
