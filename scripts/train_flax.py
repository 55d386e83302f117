"""Train Swin V2 with the JAX/Flax NNX stack: parse the shared flags, then call flax_swin.train.train_and_evaluate."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/train_flax.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared_data import run_config  # noqa: E402  (light: no JAX import before the flags are checked)

DESCRIPTION = ("Train Swin Transformer V2 in JAX/Flax NNX (CLU-style loop, data parallel over every device, "
               "Orbax checkpoints). Run folder: <logdir>/flax/<run-name>/. Test-only environment variables: "
               "SWIN_INJECT_NAN_AT_STEP=N adds a NaN to the loss at step N; SWIN_INTERRUPT_AFTER_STEP=N stops "
               "as if killed after step N.")

# Environment variables that mean "this process is one of several hosts" for jax.distributed.initialize().
_MULTI_HOST_MARKERS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def add_flax_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile-steps", metavar="FIRST,LAST",
                        help="write a jax.profiler trace of global steps FIRST..LAST into <run>/profile "
                             "(TensorBoard's profile plugin), e.g. 5,10")


class _WithoutTraceback(logging.Filter):
    """Keep a library's error lines but not their tracebacks: the failures we expect end in one clear message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _quiet_closed_loop_callbacks() -> None:
    """After a failed asynchronous save, TensorStore still completes futures into Orbax's closed event loop and
    reports each resulting "Event loop is closed" error as unraisable, with a traceback; that error alone is dropped."""
    default_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        default_hook(unraisable)

    sys.unraisablehook = hook


def multi_host_environment() -> bool:
    """True under a multi-process launcher (explicit coordinator, SLURM or Open MPI with several tasks, TPU pod)."""
    if any(os.environ.get(name) for name in _MULTI_HOST_MARKERS):
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name, "1").isdigit() and int(os.environ.get(name, "1")) > 1:
            return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def main(argv: list[str] | None = None) -> None:
    parser = run_config.build_parser("flax", add_flax_flags, DESCRIPTION)
    resolved = run_config.parse_or_exit(parser, "flax", argv)
    from flax_swin.configs import default

    try:
        default.parse_profile_steps(resolved.get("profile_steps"))
        config = default.resolve(resolved)
    except run_config.ConfigError as error:
        parser.error(str(error))
    from flax_swin import checkpointing, train  # JAX is imported only once the flags are known good
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Orbax logs a save that fails in its background thread with a traceback, then raises it to us.
    logging.getLogger("absl").addFilter(_WithoutTraceback())
    _quiet_closed_loop_callbacks()
    import jax

    if multi_host_environment():
        # Only under a multi-process launcher: on one host this would wait for peers that never come.
        jax.distributed.initialize()
    if jax.process_index() == 0:
        devices = jax.devices()
        print(f"jax {jax.__version__}: {jax.process_count()} process(es), {len(devices)} device(s) "
              f"({devices[0].platform}: {devices[0].device_kind})", flush=True)
    try:
        summary = train.train_and_evaluate(config, config.run_dir)
    except (run_config.ConfigError, train.NonFiniteLossError, checkpointing.CheckpointSaveError,
            checkpointing.CheckpointError) as error:
        raise SystemExit(f"train_flax.py: error: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"train_flax.py: interrupted; continue with --resume --run-name {config.run_name}") from None
    if jax.process_index() == 0:
        print(f"done: best val accuracy {summary['best_val_accuracy']}, run folder {config.run_dir}", flush=True)


if __name__ == "__main__":
    main()
