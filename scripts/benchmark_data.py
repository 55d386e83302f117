"""Measure training-batch throughput (images/s) from the decoded cache at several loader worker counts."""

import sys

from bench import data

if __name__ == "__main__":
    sys.exit(data.main())
