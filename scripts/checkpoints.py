"""List, verify, prune and clean the checkpoints of Lightning and Flax runs, reporting the bytes freed."""

import sys

from tools import checkpoints

if __name__ == "__main__":
    sys.exit(checkpoints.main())
