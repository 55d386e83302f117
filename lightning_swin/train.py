"""train_and_evaluate(config, workdir): the Lightning training recipe, top to bottom."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy

from lightning_swin import checkpointing, distributed
from lightning_swin.callbacks import ProgressBar, TimingAndMetrics, ValidateAtLastStep
from lightning_swin.configs import default
from lightning_swin.datamodule import ImagenetteDataModule
from lightning_swin.devices import arithmetic, device_description, set_arithmetic
from lightning_swin.module import SwinClassifier
from lightning_swin.profiling import StepProfiler
from lightning_swin.weights import load_pretrained
from shared_data import event_files, run_config, run_report
from shared_data.clock import Sections
from shared_data.errors import ConfigError
from shared_data.trash_safe import atomic_write_json


def train_and_evaluate(config: dict[str, Any], workdir: str | os.PathLike,
                       callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Train and validate each epoch in `workdir` (the run folder); return the summary also saved as summary.json.

    Raises ConfigError for a flag that cannot work with the data, NonFiniteLossError and CheckpointSaveError;
    `callbacks` join the Trainer's (tests use them to interrupt a run or damage its weights).
    """
    wall_start = time.perf_counter()
    run_dir = Path(workdir)
    config = dict(default.resolve(config), run_dir=str(run_dir), run_name=run_dir.name)
    main = distributed.is_main_process()
    world = config["devices"] * config["num_nodes"]
    if main and world > 1:
        os.environ[distributed.RUN_NAME_ENV] = run_dir.name  # inherited by the processes the DDP launcher starts
    pl.seed_everything(config["seed"], workers=True, verbose=False)

    # ---- data
    datamodule = ImagenetteDataModule(config, progress=main)
    data = datamodule.load()  # prepare_data raises ConfigError or DataError, each one line naming the flag or path
    steps_per_epoch = datamodule.steps_per_epoch
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {config['batch_size']} is larger than the {len(data.train)} training images")
    total_steps = run_config.total_steps(config, steps_per_epoch)

    # ---- model
    set_arithmetic(config["precision"])  # full float32 in fp32, as the Flax stack's
    module = SwinClassifier(config, data.num_classes, steps_per_epoch)
    if config["pretrained"]:
        run_config.load_pretrained(load_pretrained, module.model, config["pretrained"], announce=main)
    if config["compile"]:
        module.model.compile()  # in place, so parameter names (and checkpoints) stay the official ones

    # ---- run folder
    if main:
        record = run_report.run_record(
            data, dataset_requested=config["dataset"], device=device_description(config),
            arithmetic=arithmetic(config["precision"]),
            num_params=sum(p.numel() for p in module.model.parameters()), compile=config["compile"],
            steps_per_epoch=steps_per_epoch, num_devices=world, num_processes=world,
        )
        run_config.prepare_run_dir(config, record)
        atomic_write_json(run_dir / "data_report.json", data.report())
        checkpointing.clean_leftovers(run_dir)
    # Raises rather than start again while checkpoints exist; skips (and, once the run succeeds, deletes) damaged ones.
    resume_from, damaged = checkpointing.resume_point(run_dir) if config["resume"] else (None, [])
    if config["resume"] and resume_from is None:
        run_config.warn_no_checkpoint(run_dir)
    # A resumed run's event files drop what the interrupted process wrote after the step it resumes from.
    start_step = checkpointing.checkpoint_step(resume_from) if resume_from else 0
    purge_step, replay = (event_files.resume_purge(run_dir, start_step, steps_per_epoch) if config["resume"] and main
                          else (None, []))

    # ---- trainer
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False,
                               purge_step=purge_step)
    if replay:
        event_files.write_points(logger.experiment, replay)
    sections = Sections()  # named timed sections: checkpoint (the CheckpointIO's), profile (the profiler's)
    checkpoint_io = checkpointing.AtomicCheckpointIO(sections)
    profiler = StepProfiler(run_config.parse_profile_steps(config["profile_steps"]), run_dir / "profile", sections)
    timing = TimingAndMetrics(config, len(data.val), steps_per_epoch, total_steps, checkpoint_io, sections)
    on_cpu = config["accelerator"] == "cpu" or not torch.cuda.is_available()
    trainer = pl.Trainer(
        accelerator=config["accelerator"], devices=config["devices"], num_nodes=config["num_nodes"],
        strategy=DDPStrategy(process_group_backend="gloo" if on_cpu else "nccl") if world > 1 else "auto",
        precision="bf16-mixed" if config["precision"] == "bf16" else "32-true",
        max_epochs=config["epochs"], max_steps=total_steps,
        gradient_clip_val=config["grad_clip"] or None, gradient_clip_algorithm="norm",
        deterministic=True if config["deterministic"] else None,
        logger=logger,
        callbacks=[timing, ValidateAtLastStep(), ProgressBar(timing), profiler, *callbacks,
                   *checkpointing.checkpoint_callbacks(checkpointing.checkpoint_dir(run_dir), config["keep_checkpoints"],
                                                       config["checkpoint_every_steps"])],
        plugins=[checkpoint_io],
        # Validation every epoch over the whole val set; no sanity pass, whose metrics would mix in.
        num_sanity_val_steps=0, log_every_n_steps=1, use_distributed_sampler=False,
        enable_model_summary=False, default_root_dir=str(run_dir),
    )

    # ---- fit
    # Trainer(deterministic=True) switches torch's global setting; a caller running several trainings gets it back.
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit status 1; the caller reports it as an interrupt
            raise KeyboardInterrupt from None
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic_before)

    # ---- checkpoints and summary
    if trainer.is_global_zero:
        # The stock callbacks leave the file a run resumed from and the step-save beside the epoch-end one.
        checkpointing.prune_checkpoints(run_dir, config["keep_checkpoints"], damaged)
    summary = run_report.run_summary(timing.history, steps=trainer.global_step, steps_per_epoch=steps_per_epoch,
                                     wall_time_s=time.perf_counter() - wall_start)
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary
