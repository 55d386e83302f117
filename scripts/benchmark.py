"""Run both training stacks with identical settings (PyTorch eager and compiled), then compare their traces."""

import sys

from bench import benchmark

if __name__ == "__main__":
    sys.exit(benchmark.main())
