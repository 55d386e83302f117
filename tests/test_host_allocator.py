"""The entry points restart once under glibc's huge-page malloc, keeping the user's tunables, pid and arguments."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from shared_data import host_allocator

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("train_flax.py", "train_lightning.py", "benchmark_models.py", "benchmark.py")


def test_huge_page_environment_adds_the_tunable_and_keeps_others():
    assert host_allocator.huge_page_environment({}, "madvise", "glibc")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    kept = host_allocator.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "1"},
                                                "madvise", "glibc")
    assert kept == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "1"}


@pytest.mark.parametrize("environ, mode, libc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", "glibc"),  # the user's own choice wins
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1"}, "madvise", "glibc"),
    ({}, "always", "glibc"), ({}, "never", "glibc"), ({}, None, "glibc"), ({}, "madvise", ""),
])
def test_huge_page_environment_is_none_where_a_restart_changes_nothing(environ, mode, libc):
    assert host_allocator.huge_page_environment(environ, mode, libc) is None


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert host_allocator.thp_mode(tmp_path / "enabled") == "madvise"
    assert host_allocator.thp_mode(tmp_path / "absent") is None


def test_restart_keeps_pid_and_arguments_and_happens_once(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text("import os, sys\nprint('start', os.getpid(), flush=True)\n"
                      "from shared_data import host_allocator\nhost_allocator.restart_with_huge_pages()\n"
                      "print('run', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, str(script), "--flag", "a b"], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    restarts = host_allocator.huge_page_environment(env, host_allocator.thp_mode(), platform.libc_ver()[0]) is not None
    starts = [line for line in out if line.startswith("start")]
    pid = starts[0].split()[1]
    assert len(starts) == (2 if restarts else 1) and all(line.split()[1] == pid for line in starts)
    tunables = "glibc.malloc.hugetlb=1" if restarts else "None"
    assert f"run {pid} {tunables} ['--flag', 'a b']" in out


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_restarts_before_it_runs(name):
    text = (ROOT / "scripts" / name).read_text()
    main = text.index('if __name__ == "__main__":')
    assert text.index("host_allocator.restart_with_huge_pages()", main) < text.index("sys.exit(", main)


def test_restart_that_cannot_exec_runs_on_with_a_note(monkeypatch, capsys):
    monkeypatch.setattr(host_allocator, "huge_page_environment", lambda *args: {"GLIBC_TUNABLES": "x"})
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    host_allocator.restart_with_huge_pages()
    assert "not restarted with glibc.malloc.hugetlb=1" in capsys.readouterr().err
