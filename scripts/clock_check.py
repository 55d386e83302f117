"""Check each stack's step clock against steps closed on the host (block_until_ready, cuda.synchronize)."""

import sys

from bench import clock_check

if __name__ == "__main__":
    sys.exit(clock_check.main())
