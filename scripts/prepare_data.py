"""Download, verify and cache a dataset once, then print a summary: counts, skipped files, cache size."""

import sys

from tools import prepare_data

if __name__ == "__main__":
    sys.exit(prepare_data.main())
