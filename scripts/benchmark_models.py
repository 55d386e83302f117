"""Time forward and train steps of our PyTorch, timm's, torchvision's and our Flax Swin V2 in one process."""

import sys

from bench import models
from shared_data import host_allocator

if __name__ == "__main__":
    host_allocator.restart_with_huge_pages()  # first: glibc reads it only at start
    sys.exit(models.main())
