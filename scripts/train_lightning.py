"""Train Swin V2 with PyTorch Lightning: parse the shared flags, then call lightning_swin.train.train_and_evaluate."""

from __future__ import annotations

import sys

from lightning_swin.configs import default  # light: no torch import before the flags are checked
from shared_data import errors, host_allocator, run_config

PROG = "train_lightning.py"
DESCRIPTION = ("Train Swin Transformer V2 with PyTorch Lightning on the shared Imagenette pipeline (DDP over "
               "--devices x --num-nodes). Run folder: <logdir>/lightning/<run-name>/.")


def main(argv: list[str] | None = None) -> int:
    """Check the flags, train, print where the run is; exit 2 on a bad flag, 1 on a failed run, 130 on Ctrl-C."""
    parser = run_config.build_parser(default.STACK, default.add_stack_flags, DESCRIPTION)
    args = parser.parse_args(argv)
    try:
        config = default.resolve(vars(args))
    except errors.ConfigError as error:
        parser.error(str(error))
    from lightning_swin import train  # torch and Lightning are imported only once the flags are known good

    summary = errors.exit_on_error(PROG, lambda: train.train_and_evaluate(config, config["run_dir"]), config["run_name"])
    if default.is_main_process():
        print(f"done: best val accuracy {summary['best_val_accuracy']}, run folder {config['run_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    host_allocator.restart_with_huge_pages()  # first: glibc reads it only at start
    sys.exit(main())
