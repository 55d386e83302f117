"""Time forward and train steps of our PyTorch, timm's, torchvision's and our Flax Swin V2 in one process."""

import sys

from bench import models

if __name__ == "__main__":
    sys.exit(models.main())
