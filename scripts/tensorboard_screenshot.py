"""Open a logdir's TensorBoard comparison in headless Chromium and save a screenshot (docs/tensorboard.md)."""

import sys

from report import screenshot

if __name__ == "__main__":
    sys.exit(screenshot.main())
