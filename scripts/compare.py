"""Compare Lightning and Flax runs from their traces and profiles: speedups, breakdowns, MFU, operations, figures."""

import sys

from report import compare

if __name__ == "__main__":
    sys.exit(compare.main())
