"""get_config(): the Flax stack's ml_collections.ConfigDict, built from shared_data.run_config's defaults."""

from __future__ import annotations

import argparse
from typing import Any

import ml_collections

from flax_swin import distributed
from shared_data import run_config

STACK = "flax"
# Flags only the Flax stack has; every shared hyperparameter lives in shared_data.run_config.
STACK_DEFAULTS: dict[str, Any] = dict(
    # Several processes (machines) with jax.distributed; None: from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    # JAX_PROCESS_ID, else from a cluster launcher (SLURM, Open MPI), else one process.
    coordinator_address=None,
    num_processes=None,
    process_id=None,
    coordinator_timeout=distributed.DEFAULT_TIMEOUT_S,  # seconds every process waits for all of them to join
)


def add_stack_flags(parser: argparse.ArgumentParser) -> None:
    """The flags only this stack has (beside shared_data.run_config's)."""
    machines = parser.add_argument_group(
        "JAX/Flax on several machines (jax.distributed; give the same --run-name to every process)")
    machines.add_argument("--coordinator-address", metavar="HOST:PORT",
                          help="process 0's host and a free port on it, the same for every process (default "
                               "JAX_COORDINATOR_ADDRESS, else found under SLURM or Open MPI, else one process)")
    machines.add_argument("--num-processes", type=int, metavar="N",
                          help="processes taking part, one per machine or per GPU (default JAX_NUM_PROCESSES or "
                               "the launcher's)")
    machines.add_argument("--process-id", type=int, metavar="I",
                          help="this process's id, 0..N-1; 0 hosts the coordinator and writes the run folder's "
                               "event files, config and reports (default JAX_PROCESS_ID or the launcher's)")
    machines.add_argument("--coordinator-timeout", type=float, metavar="SECONDS",
                          help="give up with an error when not every process has joined within this wait "
                               f"(default {distributed.DEFAULT_TIMEOUT_S})")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """The shared defaults with `preset` applied; None values are derived at run time (see resolve)."""
    return ml_collections.ConfigDict(run_config.preset_values(preset, STACK_DEFAULTS))


def resolve(config: ml_collections.ConfigDict | dict[str, Any]) -> ml_collections.ConfigDict:
    """Fill the derived values (lr, img_size, drop path, run folder) and check every flag; raises ConfigError."""
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    stack_values = {key: values.pop(key, default) for key, default in STACK_DEFAULTS.items()}
    stack_values.update(distributed.settings(stack_values))
    if distributed.is_multi_process(stack_values):
        run_config.require_run_name(values, "several processes (--coordinator-address, --num-processes)")
    resolved = run_config.resolve(values, STACK)
    resolved.update(stack_values)
    return ml_collections.ConfigDict(resolved)
