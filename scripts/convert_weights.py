"""Convert Swin V2 weights between any readable format (a Flax run included) and our Flax or PyTorch files."""

import sys

from tools import convert_weights

if __name__ == "__main__":
    sys.exit(convert_weights.main())
