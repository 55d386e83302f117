"""Processes of a Lightning run on several devices or machines: who launched them, and which one is rank 0."""

from __future__ import annotations

import os

from shared_data import environment

# The subprocess DDP launcher re-runs the script in each extra process; they must use rank 0's run folder.
RUN_NAME_ENV = "SWIN_LIGHTNING_RUN_NAME"


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
