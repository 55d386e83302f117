"""Run both training stacks with identical settings (PyTorch eager and compiled), then compare their traces."""

import sys

from bench import benchmark
from shared_data import host_allocator

if __name__ == "__main__":
    host_allocator.restart_with_huge_pages()  # first, and the runs it starts inherit it
    sys.exit(benchmark.main())
