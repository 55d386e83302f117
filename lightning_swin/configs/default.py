"""get_config(): the Lightning stack's config dict, built from shared_data.run_config's defaults; its flags and checks."""

from __future__ import annotations

import argparse
import os
from typing import Any

from shared_data import environment, run_config
from shared_data.errors import ConfigError

STACK = "lightning"
ACCELERATORS = ("auto", "cpu", "gpu")
# The subprocess DDP launcher re-runs the script in each extra process; they must use rank 0's run folder.
RUN_NAME_ENV = "SWIN_LIGHTNING_RUN_NAME"
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


def is_main_process() -> bool:
    """Global rank 0, read from the launcher's environment (it holds before any Trainer exists)."""
    if "RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"]) == 0
    if environment.slurm_launched():
        return int(os.environ.get("SLURM_PROCID", 0)) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def launched_processes() -> tuple[int, str] | None:
    """(process count, the variable giving it) when a launcher outside Lightning started the processes: torchrun's
    or a hand-set WORLD_SIZE, srun's SLURM_NTASKS; None when Lightning starts them itself (one node, --devices N)."""
    if os.environ.get(RUN_NAME_ENV):  # a process Lightning's own launcher started, from rank 0's environment
        return None
    if os.environ.get("WORLD_SIZE", "").isdigit():
        return int(os.environ["WORLD_SIZE"]), "WORLD_SIZE"
    if environment.slurm_launched() and os.environ["SLURM_NTASKS"].isdigit():
        return int(os.environ["SLURM_NTASKS"]), "SLURM_NTASKS"
    return None


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
