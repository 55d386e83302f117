"""Train Swin V2 with the JAX/Flax NNX stack: parse the shared flags, then call flax_swin.train.train_and_evaluate."""

from __future__ import annotations

import logging
import sys

from flax_swin.configs import default  # light: no JAX import before the flags are checked
from shared_data import errors, host_allocator, run_config

PROG = "train_flax.py"
DESCRIPTION = ("Train Swin Transformer V2 in JAX/Flax NNX (CLU-style loop, data parallel over every device, "
               "Orbax checkpoints). Run folder: <logdir>/flax/<run-name>/.")


def main(argv: list[str] | None = None) -> int:
    parser = run_config.build_parser(default.STACK, default.add_stack_flags, DESCRIPTION)
    args = parser.parse_args(argv)
    try:
        config = default.resolve(vars(args))
    except errors.ConfigError as error:
        parser.error(str(error))
    import jax

    from flax_swin import distributed, train  # JAX is imported only once the flags are known good

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Several processes (flags, JAX_* variables or a cluster launcher) join here, before JAX picks its devices.
    errors.exit_on_error(PROG, lambda: distributed.initialize(config, PROG))
    if jax.process_index() == 0:
        devices = jax.devices()
        print(f"jax {jax.__version__}: {jax.process_count()} process(es), {len(devices)} device(s) "
              f"({devices[0].platform}: {devices[0].device_kind})", flush=True)
    summary = errors.exit_on_error(PROG, lambda: train.train_and_evaluate(config, config.run_dir), config.run_name)
    if jax.process_index() == 0:
        print(f"done: best val accuracy {summary['best_val_accuracy']}, run folder {config.run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    host_allocator.restart_with_huge_pages()  # first: glibc reads it only at start
    sys.exit(main())
