"""Command line: train Swin V2 with PyTorch Lightning on the shared pipeline (see --help)."""

from __future__ import annotations

import sys
from typing import Sequence

from lightning_swin.callbacks import NonFiniteLossError
from lightning_swin.checkpointing import CheckpointDiskFullError
from lightning_swin.train import build_parser, parse_config, train
from shared_data.run_config import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    try:
        train(config)
    except ConfigError as error:
        build_parser().error(str(error))
    except (NonFiniteLossError, CheckpointDiskFullError) as error:
        print(f"train_lightning.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
