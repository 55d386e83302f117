"""Restart an entry point under glibc's transparent-huge-page malloc, so both stacks run under one host allocator."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Mapping

# glibc >= 2.35: with 1, malloc madvises its heap and mapped chunks for transparent huge pages (glibc manual,
# "Memory Allocation Tunables"). glibc reads GLIBC_TUNABLES only when a process starts, hence the restart.
TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(mode_file: Path = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'), None where the file is absent."""
    try:
        text = mode_file.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_page_environment(environ: Mapping[str, str], mode: str | None, libc: str) -> dict[str, str] | None:
    """The environment to restart with, or None where a restart would change nothing: not glibc, the kernel's mode
    not 'madvise' ('always' gives every mapping huge pages already, 'never' none), or GLIBC_TUNABLES already naming
    the tunable (the user's own value, 0 included, wins). Other tunables are kept."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if libc != "glibc" or mode != "madvise" or any(item.split("=")[0] == TUNABLE for item in tunables.split(":")):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def restart_with_huge_pages() -> None:
    """Re-execute this process (same pid, same interpreter and arguments) with glibc's huge-page malloc, before any
    framework starts a thread. Returns without a restart where huge_page_environment says it would change nothing,
    or, with a one-line note on stderr, where the interpreter cannot be re-executed.

    Why: XLA's CPU runtime allocates each step's buffers anew, and glibc returns them to the kernel on free, so a Flax
    train step faults ~1.9 GB of 4 KiB pages in again every step (docs/performance.md, "The host allocator"); with
    huge pages the same memory comes in 2 MiB faults. Both training scripts, benchmark.py and benchmark_models.py
    call this, so both stacks are measured under the same allocator.
    """
    environ = huge_page_environment(os.environ, thp_mode(), platform.libc_ver()[0])
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
        except OSError as error:  # no interpreter to re-execute: run on under glibc's defaults, and say so
            print(f"note: not restarted with {TUNABLE}=1 ({error}); running with glibc's default malloc",
                  file=sys.stderr)


def describe() -> str:
    """'GLIBC_TUNABLES=glibc.malloc.hugetlb=1, THP madvise': the host allocator a reported figure ran under."""
    return f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '') or '(unset)'}, THP {thp_mode() or 'n/a'}"
