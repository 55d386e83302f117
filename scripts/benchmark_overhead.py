"""The instrumentation overhead of each stack: epoch time with per-step timing against without."""

import sys

from bench import overhead

if __name__ == "__main__":
    sys.exit(overhead.main())
