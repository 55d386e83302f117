"""Build the Lightning Trainer from a resolved config and run fit: the training recipe, top to bottom."""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy

from lightning_swin import checkpointing
from lightning_swin.callbacks import (
    NonFiniteLossStop, ProgressBar, TimingAndMetrics, TrashSafeModelCheckpoint, ValidateAtLastStep,
)
from lightning_swin.datamodule import ImagenetteDataModule
from lightning_swin.module import INJECT_NAN_ENV, SwinClassifier
from shared_data import run_config, timing
from shared_data.run_config import ConfigError
from shared_data.trash_safe import atomic_write_json

STACK = "lightning"
ACCELERATORS = ("auto", "cpu", "gpu")
# The subprocess DDP launcher re-runs the script in each extra process; they must use rank 0's run folder.
RUN_NAME_ENV = "SWIN_LIGHTNING_RUN_NAME"


def add_lightning_flags(parser: argparse.ArgumentParser) -> None:
    """The flags only this stack has."""
    group = parser.add_argument_group("PyTorch Lightning")
    group.add_argument("--compile", action="store_true", default=False, help="run the model through torch.compile")
    group.add_argument("--devices", type=int, default=1, help="devices per node; more than 1 trains with DDP (default 1)")
    group.add_argument("--num-nodes", type=int, default=1, help="machines taking part in DDP (default 1)")
    group.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help="device kind (default auto)")
    group.add_argument("--deterministic", action="store_true", default=False,
                       help="torch deterministic algorithms: identical losses for identical seeds")


def build_parser() -> argparse.ArgumentParser:
    """The shared flags plus this stack's, as scripts/train_lightning.py uses them."""
    parser = run_config.build_parser(
        STACK, add_lightning_flags,
        description="Train Swin Transformer V2 with PyTorch Lightning on the shared Imagenette pipeline.",
    )
    parser.epilog = (f"Test-only: environment variable {INJECT_NAN_ENV}=N makes the loss of step N NaN, to check that the run "
                     "stops and keeps its last checkpoint.")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Flags -> resolved, checked config; a bad flag exits with a one-line usage error before any data is read."""
    parser = build_parser()
    if argv is not None:
        argv = list(argv)
    config = run_config.parse_or_exit(parser, STACK, argv)
    try:
        check_stack_config(config)
    except ConfigError as error:
        parser.error(str(error))
    return config


def check_stack_config(config: dict[str, Any]) -> None:
    """Reject impossible Lightning flags and run-folder mistakes before any data is read."""
    for key, flag in (("devices", "--devices"), ("num_nodes", "--num-nodes")):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {config[key]!r}")
    if config["accelerator"] not in ACCELERATORS:
        raise ConfigError(f"--accelerator must be one of {', '.join(ACCELERATORS)}, got {config['accelerator']!r}")
    if config["accelerator"] == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--accelerator gpu: no CUDA device is visible; use --accelerator cpu")
    world = config["devices"] * config["num_nodes"]
    if config["batch_size"] % world:
        raise ConfigError(f"--batch-size {config['batch_size']} must divide evenly over {world} processes "
                          "(--devices x --num-nodes)")
    if _is_main_process():
        config_path = Path(config["run_dir"]) / "config.json"
        if config["resume"] and not config_path.is_file():
            raise ConfigError(f"--resume: no run to continue at {config['run_dir']} (no config.json); "
                              "check --run-name and --logdir")
        if not config["resume"] and config_path.exists():
            raise ConfigError(f"--run-name: {config['run_dir']} already exists; pass --resume to continue it "
                              "or pick another name")


def _is_main_process() -> bool:
    """Global rank 0 (read from the launcher's environment, since no Trainer exists yet)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _use_launcher_run_name(config: dict[str, Any]) -> dict[str, Any]:
    """In processes started by the DDP launcher, adopt the run name rank 0 chose (its timestamp)."""
    name = os.environ.get(RUN_NAME_ENV)
    if _is_main_process() or not name or name == config["run_name"]:
        return config
    return dict(config, run_name=name, run_dir=str(Path(config["logdir"]) / STACK / name))


def _device_description(config: dict[str, Any]) -> str:
    if config["accelerator"] != "cpu" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return timing.cpu_description()


def build_trainer(config: dict[str, Any], run_dir: Path, *, num_val_images: int,
                  extra_callbacks: Sequence[pl.Callback] = ()) -> tuple[pl.Trainer, TimingAndMetrics]:
    """The Trainer for this config: logger, callbacks, precision, devices and DDP."""
    world = config["devices"] * config["num_nodes"]
    strategy: Any = "auto"
    if world > 1:
        on_cpu = config["accelerator"] == "cpu" or not torch.cuda.is_available()
        strategy = DDPStrategy(process_group_backend="gloo" if on_cpu else "nccl")
    checkpoint = TrashSafeModelCheckpoint(
        checkpointing.checkpoint_dir(run_dir), keep=config["keep_checkpoints"],
        every_n_steps=config["checkpoint_every_steps"],
    )
    timing_callback = TimingAndMetrics(config["batch_size"], num_val_images, checkpoint)
    trainer = pl.Trainer(
        accelerator=config["accelerator"], devices=config["devices"], num_nodes=config["num_nodes"], strategy=strategy,
        precision="bf16-mixed" if config["precision"] == "bf16" else "32-true",
        max_epochs=config["epochs"], max_steps=config["max_steps_total"],
        gradient_clip_val=config["grad_clip"] or None, gradient_clip_algorithm="norm",
        deterministic=True if config["deterministic"] else None,
        logger=TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False),
        callbacks=[NonFiniteLossStop(), timing_callback, ValidateAtLastStep(), ProgressBar(), *extra_callbacks, checkpoint],
        plugins=[checkpointing.AtomicCheckpointIO()],
        # Validation every epoch over the whole val set; no sanity pass, whose metrics would mix in.
        num_sanity_val_steps=0, log_every_n_steps=1, use_distributed_sampler=False,
        enable_model_summary=False, default_root_dir=str(run_dir),
    )
    return trainer, timing_callback


def train(config: dict[str, Any], extra_callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Train from a resolved config (parse_config's output); return the run summary written to summary.json.

    `extra_callbacks` run before the checkpoint callback; tests use them to interrupt a run.
    """
    started = time.perf_counter()
    config = _use_launcher_run_name(config)
    main = _is_main_process()
    if main:
        os.environ[RUN_NAME_ENV] = config["run_name"]
    pl.seed_everything(config["seed"], workers=True, verbose=False)

    datamodule = ImagenetteDataModule(config, progress=main)
    try:
        data = datamodule.load()
    except ValueError as error:  # prepare_data names the flag in its messages
        raise ConfigError(str(error)) from None
    steps_per_epoch = datamodule.steps_per_epoch
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {config['batch_size']} is larger than the {len(data.train)} training images")
    config = dict(config, max_steps_total=run_config.total_steps(config, steps_per_epoch))

    module = SwinClassifier(config, data.num_classes, steps_per_epoch)
    if config["compile"]:
        module.model.compile()  # in place, so parameter names (and checkpoints) stay the official ones
    run_dir = Path(config["run_dir"])
    if main:
        extra = {
            "dataset": data.dataset, "dataset_requested": config["dataset"], "fell_back": data.fell_back,
            "device": _device_description(config), "versions": timing.library_versions(),
            "num_params": sum(p.numel() for p in module.model.parameters()), "compile": bool(config["compile"]),
            "steps_per_epoch": steps_per_epoch, "num_devices": config["devices"] * config["num_nodes"],
        }
        run_dir = run_config.prepare_run_dir(config, extra)
        atomic_write_json(run_dir / "data_report.json", data.report())
        for path in checkpointing.clean_leftovers(run_dir):
            warnings.warn(f"removed an unfinished save left by an interrupted run: {path}", stacklevel=2)

    ckpt_path = None
    if config["resume"]:
        ckpt_path = checkpointing.latest_resumable(run_dir)
        if ckpt_path is None:
            warnings.warn(f"--resume: {run_dir} has no complete checkpoint yet; starting from step 0", stacklevel=2)

    trainer, timing_callback = build_trainer(config, run_dir, num_val_images=len(data.val),
                                             extra_callbacks=extra_callbacks)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)

    summary = dict(timing_callback.summary(), wall_time_s=time.perf_counter() - started,
                   epochs_completed=trainer.global_step // steps_per_epoch, steps=trainer.global_step)
    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_score", None)
    summary["best_val_accuracy"] = float(best) if best is not None else summary["final_val_accuracy"]
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary
