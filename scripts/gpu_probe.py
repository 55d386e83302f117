"""The machine before a GPU benchmark: imports, GPU and driver, library versions, matmul rates, what float32 means."""

import sys

from bench import probe

if __name__ == "__main__":
    sys.exit(probe.main())
