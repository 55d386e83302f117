"""get_config(): the Lightning stack's config dict, built from shared_data.run_config's defaults; its flags and checks."""

from __future__ import annotations

import argparse
import os
from typing import Any

from lightning_swin.distributed import RUN_NAME_ENV, is_main_process, launched_processes
from shared_data import run_config
from shared_data.errors import ConfigError

STACK = "lightning"
ACCELERATORS = ("auto", "cpu", "gpu")
# Flags only the Lightning stack has; every shared hyperparameter lives in shared_data.run_config.
STACK_DEFAULTS: dict[str, Any] = dict(
    compile=False,  # run the model through torch.compile
    devices=1,  # per node; more than one trains with DDP
    num_nodes=1,
    accelerator="auto",
    deterministic=False,  # torch deterministic algorithms
)


def add_stack_flags(parser: argparse.ArgumentParser) -> None:
    """The flags only this stack has (beside shared_data.run_config's); unset ones stay None for resolve()."""
    group = parser.add_argument_group("PyTorch Lightning")
    group.add_argument("--compile", action="store_true", default=None, help="run the model through torch.compile")
    group.add_argument("--devices", type=int, help="devices per node; more than 1 trains with DDP (default 1)")
    group.add_argument("--num-nodes", type=int,
                       help="machines taking part in DDP (default 1); start each with torchrun, srun, or MASTER_ADDR, "
                            "MASTER_PORT and its own NODE_RANK, and the same --run-name")
    group.add_argument("--accelerator", choices=ACCELERATORS, help="device kind (default auto)")
    group.add_argument("--deterministic", action="store_true", default=None,
                       help="torch deterministic algorithms: identical losses for identical seeds")


def get_config(preset: str | None = None) -> dict[str, Any]:
    """The shared defaults with `preset` applied; None values are derived at run time (see resolve)."""
    return run_config.preset_values(preset, STACK_DEFAULTS)


def resolve(values: dict[str, Any]) -> dict[str, Any]:
    """Fill the derived values (lr, img_size, drop path, run folder) and check every flag; raises ConfigError."""
    launcher_run_name = os.environ.get(RUN_NAME_ENV)
    launched = launched_processes()
    if launcher_run_name and not is_main_process():
        # Rank 0 may have picked a timestamp a second earlier than this process would.
        values = dict(values, run_name=launcher_run_name)
    elif (values.get("num_nodes") or 1) > 1 or (launched is not None and launched[0] > 1):
        run_config.require_run_name(values, "several nodes or processes started by torchrun or srun")
    config = dict(STACK_DEFAULTS, **run_config.resolve(values, STACK))
    _check(config)
    return config


def _check(config: dict[str, Any]) -> None:
    """Reject impossible Lightning flags and run-folder mistakes before any data is read."""
    for key, flag in (("devices", "--devices"), ("num_nodes", "--num-nodes")):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {config[key]!r}")
    if config["accelerator"] not in ACCELERATORS:
        raise ConfigError(f"--accelerator must be one of {', '.join(ACCELERATORS)}, got {config['accelerator']!r}")
    if config["accelerator"] == "gpu":
        import torch  # only here: checking the other flags must stay quick

        if not torch.cuda.is_available():
            raise ConfigError("--accelerator gpu: no CUDA device is visible; use --accelerator cpu")
    if config["devices"] > 1:  # one process per device: more than the machine has would start them anyway
        kind, available = _local_devices(config["accelerator"])
        if config["devices"] > available:
            raise ConfigError(f"--devices {config['devices']}: this machine has {available} {kind} device(s); give "
                              f"at most {available} per node")
    world = config["devices"] * config["num_nodes"]
    launched = launched_processes()
    if launched is not None and launched[0] != world:
        raise ConfigError(f"--devices {config['devices']} x --num-nodes {config['num_nodes']} must equal the "
                          f"{launched[0]} processes the launcher started ({launched[1]}); give every node the same "
                          "--num-nodes and --devices per node")
    node_rank = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    if node_rank >= config["num_nodes"]:
        raise ConfigError(f"--num-nodes {config['num_nodes']}: this node has NODE_RANK {node_rank}; give every node "
                          "the same --num-nodes N and its own NODE_RANK 0..N-1")
    if config["batch_size"] % world:
        raise ConfigError(f"--batch-size {config['batch_size']} must divide evenly over {world} processes "
                          "(--devices x --num-nodes)")
    if is_main_process():
        run_config.refuse_existing_run(config)  # early, before any data is read (prepare_run_dir checks it again)


def _local_devices(accelerator: str) -> tuple[str, int]:
    """(kind, count) of the devices --accelerator trains on here: CUDA GPUs, or CPU cores (Lightning's CPU devices
    are processes, one per --devices)."""
    import torch  # only for --devices > 1: checking the other flags must stay quick

    if accelerator != "cpu" and torch.cuda.is_available():
        return "GPU", torch.cuda.device_count()
    return "CPU", os.cpu_count() or 1
