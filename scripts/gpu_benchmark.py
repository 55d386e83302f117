"""The origin's question on one GPU in one command; started by gpu_benchmark.sh, which installs the carried wheels."""

import sys

from bench import gpu

if __name__ == "__main__":
    sys.exit(gpu.main())
