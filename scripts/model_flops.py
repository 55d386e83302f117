"""Analytic forward FLOPs per image of a Swin V2 variant (matrix multiplies, 2 FLOPs per multiply-add)."""

import sys

from report import flops

if __name__ == "__main__":
    sys.exit(flops.main())
