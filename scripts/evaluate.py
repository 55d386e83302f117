"""Evaluate Swin V2 weights on a validation split with either stack: top-1, top-5, loss, per-class, confusion matrix."""

import sys

from tools import evaluate

if __name__ == "__main__":
    sys.exit(evaluate.main())
