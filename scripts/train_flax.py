"""Train Swin V2 with the JAX/Flax NNX stack: parse the shared flags, then call flax_swin.train.train_and_evaluate."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/train_flax.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax_swin.configs import default  # noqa: E402  (light: no JAX import before the flags are checked)
from shared_data import errors, run_config  # noqa: E402

PROG = "train_flax.py"
DESCRIPTION = ("Train Swin Transformer V2 in JAX/Flax NNX (CLU-style loop, data parallel over every device, "
               "Orbax checkpoints). Run folder: <logdir>/flax/<run-name>/.")
# Environment variables that mean "this process is one of several hosts" for jax.distributed.initialize().
_MULTI_HOST_MARKERS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def multi_host_environment() -> bool:
    """True under a multi-process launcher (explicit coordinator, SLURM or Open MPI with several tasks, TPU pod)."""
    if any(os.environ.get(name) for name in _MULTI_HOST_MARKERS):
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name, "1").isdigit() and int(os.environ.get(name, "1")) > 1:
            return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def main(argv: list[str] | None = None) -> int:
    parser = run_config.build_parser(default.STACK, default.add_stack_flags, DESCRIPTION)
    args = parser.parse_args(argv)
    try:
        config = default.resolve(vars(args))
    except errors.ConfigError as error:
        parser.error(str(error))
    import jax

    from flax_swin import train  # JAX is imported only once the flags are known good

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if multi_host_environment():
        # Only under a multi-process launcher: on one host this would wait for peers that never come.
        jax.distributed.initialize()
    if jax.process_index() == 0:
        devices = jax.devices()
        print(f"jax {jax.__version__}: {jax.process_count()} process(es), {len(devices)} device(s) "
              f"({devices[0].platform}: {devices[0].device_kind})", flush=True)
    summary = errors.exit_on_error(PROG, lambda: train.train_and_evaluate(config, config.run_dir), config.run_name)
    if jax.process_index() == 0:
        print(f"done: best val accuracy {summary['best_val_accuracy']}, run folder {config.run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
