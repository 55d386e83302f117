"""The flags both training scripts share, their presets and checks, and the run folder they describe."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from shared_data import augment, errors, variants
from shared_data.errors import ConfigError
from shared_data.swin_weights import WeightsFormatError
from shared_data.trash_safe import atomic_write_json

STACKS = ("lightning", "flax")
DATASETS = (
    "imagenette", "imagenette-320", "imagenette-160",
    "imagewoof", "imagewoof-320", "imagewoof-160",
    "synthetic",
)
PRECISIONS = ("fp32", "bf16")
STEP_TIMINGS = ("on", "off")
SYNTHETIC_SIZES = ("tiny", "small", "imagenette")
NOISY_LABEL_PERCENTS = (0, 1, 5, 25, 50)

# The official Swin V2 recipe (AdamW, 300 epochs with 20 of warm-up, base lr 5e-4 per 512 images,
# warm-up from lr/1000, cosine down to lr/100, weight decay 0.05, label smoothing 0.1, clip 5.0, and the
# augmentation of shared_data.augment), scaled to Imagenette's 9,469 training images: 100 epochs with 5 of warm-up.
DEFAULTS: dict[str, Any] = dict(
    dataset="imagenette-320",
    data_dir="data",
    model="swinv2_tiny_window8_256",
    img_size=None,  # the variant's own
    batch_size=64,
    epochs=100,
    max_steps=None,
    base_lr=5e-4,  # per 512 images: lr = base_lr * batch_size / 512, the official linear scaling rule
    lr=None,  # base_lr scaled to the batch size
    warmup_epochs=5.0,
    warmup_start_factor=1e-3,  # warm-up starts at lr / 1000
    cosine_end_factor=1e-2,  # cosine ends at lr / 100
    weight_decay=0.05,
    label_smoothing=0.1,
    augment=augment.OFFICIAL,  # "basic": random crop and flip only
    mixup=None,  # with --augment official: shared_data.augment's (Mixup 0.8, CutMix 1.0, erasing 0.25)
    cutmix=None,
    reprob=None,
    drop_path=None,  # the variant's own (tiny 0.2)
    grad_clip=5.0,
    seed=0,
    precision="fp32",
    run_name=None,  # a timestamp
    logdir="runs",
    resume=False,
    keep_checkpoints=2,
    checkpoint_every_steps=0,  # 0: at the end of every epoch only
    num_workers=None,  # min(4, cores)
    synthetic_size="small",
    noisy_labels=0,
    strict=False,
    preset=None,
    pretrained=None,  # weights to fine-tune from (weights only; a fresh optimiser and schedule); alias --init-from
    step_timing="on",  # "off": only the epoch-level timing tags
    profile_steps=None,  # "first,last" global steps to trace with the stack's profiler, e.g. "5,10"
)
PRESETS: dict[str, dict[str, Any]] = {
    # A nano model on a small synthetic set: a whole run in well under two minutes on a 2-core CPU.
    "smoke": dict(
        dataset="synthetic", synthetic_size="small", model="swinv2_nano_window4_64", img_size=64,
        batch_size=32, epochs=5, lr=2e-3, warmup_epochs=1.0, drop_path=0.0,
        label_smoothing=0.0, num_workers=2, augment=augment.BASIC,
    ),
    # The official Swin V2 fine-tuning schedule (configs/swinv2/*_ft.yaml): 30 epochs with 5 of warm-up, base lr
    # 2e-5 per 512 images warming up from 2e-8 and decaying by cosine to 2e-7, weight decay 1e-8, no layer decay;
    # the augmentation and label smoothing of the default recipe. Use it with --pretrained.
    "finetune": dict(
        epochs=30, warmup_epochs=5.0, base_lr=2e-5, warmup_start_factor=1e-3, cosine_end_factor=1e-2,
        weight_decay=1e-8,
    ),
    # The 2022 origin's comparison setting. Crop and flip only: the official augmentation costs 2-5 ms of host
    # CPU per 256 px image, which would make a speed comparison measure the loader, not the stacks.
    "swinv2_tiny_window8_256": dict(model="swinv2_tiny_window8_256", img_size=256, batch_size=32, augment="basic"),
}

# Flags whose change makes a resumed run a different experiment.
_RESUME_MUST_MATCH = (
    "dataset", "model", "img_size", "batch_size", "lr", "warmup_epochs", "weight_decay",
    "label_smoothing", "drop_path", "grad_clip", "seed", "precision", "synthetic_size", "noisy_labels", "pretrained",
    "augment", "mixup", "cutmix", "reprob", "warmup_start_factor", "cosine_end_factor",
)


def preset_values(preset: str | None, stack_defaults: dict[str, Any]) -> dict[str, Any]:
    """The shared defaults, a stack's own, and `preset` applied over both (a stack's get_config); raises
    ConfigError naming --preset when it is unknown. None values are derived later, by resolve()."""
    return dict(DEFAULTS, **stack_defaults, **preset_overrides(preset))


def preset_overrides(preset: str | None) -> dict[str, Any]:
    """What `preset` sets over the defaults (with its name); {} for None. Raises ConfigError naming --preset when it
    is unknown."""
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[preset], preset=preset)


def build_parser(stack: str, add_stack_flags: Callable[[argparse.ArgumentParser], None] | None = None,
                 description: str = "") -> argparse.ArgumentParser:
    """The shared argument parser; every default is None so presets can fill what was not given."""
    parser = argparse.ArgumentParser(
        prog=f"train_{stack}.py", description=description,
        argument_default=None,
    )
    d = DEFAULTS
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), help="a named setting; explicit flags override it")
    add("--dataset", choices=DATASETS, help=f"dataset name (default {d['dataset']}); falls back to "
        "'synthetic' with a warning when absent and not downloadable")
    add("--data-dir", help=f"where datasets, archives and caches live (default {d['data_dir']})")
    add("--synthetic-size", choices=SYNTHETIC_SIZES, help=f"size of the synthetic set (default {d['synthetic_size']})")
    add("--noisy-labels", type=int, choices=NOISY_LABEL_PERCENTS, help="percent of noisy training labels (default 0)")
    add("--strict", action="store_true", default=None, help="fail on the first unreadable image instead of skipping it")
    add("--model", help=f"Swin V2 variant (default {d['model']}): " + ", ".join(sorted(variants.VARIANTS)))
    add("--img-size", type=int, help="input resolution (default: the variant's)")
    add("--batch-size", type=int, help=f"global batch size over all devices (default {d['batch_size']})")
    add("--epochs", type=int, help=f"training epochs (default {d['epochs']})")
    add("--max-steps", type=int, help="stop after this many optimiser steps (default: epochs x steps per epoch)")
    add("--lr", type=float, help="peak learning rate (default --base-lr x batch size / 512, the official scaling)")
    add("--base-lr", type=float, help=f"peak learning rate per 512 images, scaled to the batch size when --lr is not "
        f"given (default {d['base_lr']}; the finetune preset's 2e-5)")
    add("--warmup-epochs", type=float, help=f"linear warm-up length in epochs (default {d['warmup_epochs']})")
    add("--weight-decay", type=float, help=f"AdamW weight decay, official exclusions (default {d['weight_decay']})")
    add("--label-smoothing", type=float, help=f"label smoothing (default {d['label_smoothing']})")
    add("--augment", choices=augment.AUGMENTS,
        help="official: the official Swin V2 training augmentation (random-resized crop, flip, RandAugment "
             f"{augment.RAND_AUGMENT}, random erasing, Mixup/CutMix, soft targets; the default); "
             "basic: random crop and flip only (the smoke preset's)")
    add("--mixup", type=float, help=f"Mixup alpha, 0 disables (default {augment.MIXUP_ALPHA}; --augment official only)")
    add("--cutmix", type=float, help=f"CutMix alpha, 0 disables (default {augment.CUTMIX_ALPHA}; --augment official only)")
    add("--reprob", type=float,
        help=f"random erasing probability per image (default {augment.ERASE_PROB}; --augment official only)")
    add("--drop-path", type=float, help="stochastic depth rate (default: the variant's, tiny 0.2)")
    add("--grad-clip", type=float, help=f"global gradient-norm clip, 0 disables (default {d['grad_clip']})")
    add("--seed", type=int, help=f"seed of data order, augmentation, init and dropout (default {d['seed']})")
    add("--precision", choices=PRECISIONS, help=f"fp32, or bf16 activations with fp32 weights (default {d['precision']})")
    add("--run-name", help="run folder name under <logdir>/<stack>/ (default: a timestamp)")
    add("--logdir", help=f"root of all runs (default {d['logdir']})")
    add("--resume", action="store_true", default=None,
        help="continue <logdir>/<stack>/<run-name> from its latest complete checkpoint (needs --run-name)")
    add("--keep-checkpoints", type=int, help=f"checkpoints kept: best by val accuracy and latest (default {d['keep_checkpoints']})")
    add("--checkpoint-every-steps", type=int, help="also checkpoint every N steps (default 0: each epoch end only)")
    add("--num-workers", type=int, help="data loading workers (default min(4, cores))")
    add("--pretrained", "--init-from", dest="pretrained", metavar="PATH",
        help="fine-tune from these weights (any format the weights readers take: official, timm, torchvision, "
             "safetensors, a Lightning .ckpt, a run folder of either stack: its best checkpoint): weights only, a "
             "fresh optimiser and schedule (unlike --resume); "
             "a head of another class count is replaced, and the report printed says so. --init-from is an alias")
    add("--step-timing", choices=STEP_TIMINGS,
        help="on: write the per-step timing tags (default); off: the epoch-level tags only")
    add("--profile-steps", metavar="FIRST,LAST",
        help="trace global steps FIRST..LAST with the stack's own profiler (jax.profiler; torch.profiler) into "
             "<run>/profile, for TensorBoard, with each operation's time in <run>/profile/ops.json, e.g. 5,10")
    if add_stack_flags is not None:
        add_stack_flags(parser)
    return parser


def resolve(args: argparse.Namespace | dict[str, Any], stack: str) -> dict[str, Any]:
    """Defaults < preset < explicit flags, checked; raises ConfigError naming the bad flag."""
    given = {k: v for k, v in (vars(args) if isinstance(args, argparse.Namespace) else args).items() if v is not None}
    config = dict(DEFAULTS, **preset_overrides(given.get("preset")))
    config.update(given)
    config["stack"] = stack
    _check(config)
    variant = variants.variant_config(config["model"])
    if config["img_size"] is None:
        config["img_size"] = variant["img_size"]
    if config["drop_path"] is None:
        config["drop_path"] = variant["drop_path_rate"]
    if config["lr"] is None:
        config["lr"] = config["base_lr"] * config["batch_size"] / 512
    config.update(augment.resolve_settings(config["augment"], config["mixup"], config["cutmix"], config["reprob"]))
    if config["num_workers"] is None:
        config["num_workers"] = min(4, os.cpu_count() or 1)
    try:
        variants.variant_config(config["model"], img_size=config["img_size"])
    except ValueError as error:
        raise ConfigError(f"--img-size/--model: {error}") from None
    if config["run_name"] is None:
        if config["resume"]:
            raise ConfigError("--resume needs --run-name: name the run folder to continue")
        config["run_name"] = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    config["run_dir"] = str(Path(config["logdir"]) / stack / config["run_name"])
    return config


def require_run_name(values: dict[str, Any], launched: str) -> None:
    """Processes started on their own (several machines, torchrun, SLURM) would each name the run folder by their own
    clock: raise ConfigError naming --run-name unless `values` (the flags, before resolve) give one. `launched` says
    how the processes were started, for the message."""
    if values.get("run_name") is None:
        raise ConfigError(f"--run-name is needed with {launched}: every process writes into one run folder; "
                          "pass the same --run-name to each")


# Bounds of the integer flags, each the largest value the libraries behind it take as meant: seeds are 32-bit in
# both stacks (jax.random.key wraps a larger one round to a small one, and numpy refuses a negative one); a global
# step is int32 in the Flax train state; an image larger than SwinV2-G's 1536 px (the largest official setting)
# only exhausts memory; a loader of more workers than this starts more threads or processes than any host runs.
SEED_RANGE = (0, 2**32 - 1)
MAX_STEPS = 2**31 - 1
MAX_IMG_SIZE = 1536
MAX_WORKERS = 256
_INTEGER_RANGES = {  # key: (flag, lowest, highest); None values are derived later and checked then
    "batch_size": ("--batch-size", 1, None), "epochs": ("--epochs", 1, MAX_STEPS),
    "keep_checkpoints": ("--keep-checkpoints", 1, None), "max_steps": ("--max-steps", 1, MAX_STEPS),
    "checkpoint_every_steps": ("--checkpoint-every-steps", 0, None), "seed": ("--seed", *SEED_RANGE),
    "num_workers": ("--num-workers", 0, MAX_WORKERS), "img_size": ("--img-size", 1, MAX_IMG_SIZE),
}


def _check(config: dict[str, Any]) -> None:
    """Reject impossible values before any data is read: every flag is checked here, or by argparse's choices, or
    (the data and weights flags) where the file is first read, each with a one-line ConfigError naming it."""
    for key, (flag, lowest, highest) in _INTEGER_RANGES.items():
        value = config[key]
        if value is None and key in ("max_steps", "num_workers", "img_size"):
            continue
        in_range = isinstance(value, int) and not isinstance(value, bool) and value >= lowest and (
            highest is None or value <= highest)
        if not in_range:
            bounds = f"from {lowest} to {highest}" if highest is not None else f">= {lowest}"
            raise ConfigError(f"{flag} must be an integer {bounds}, got {value!r}")
    non_negative = {"warmup_epochs": "--warmup-epochs", "weight_decay": "--weight-decay", "grad_clip": "--grad-clip"}
    for key, flag in non_negative.items():
        if not (isinstance(config[key], (int, float)) and config[key] >= 0 and math.isfinite(config[key])):
            raise ConfigError(f"{flag} must be a number >= 0, got {config[key]!r}")
    for key in ("lr", "base_lr"):
        if config[key] is not None and not (config[key] > 0 and math.isfinite(config[key])):
            raise ConfigError(f"--{key.replace('_', '-')} must be a positive number, got {config[key]!r}")
    if not 0 <= config["label_smoothing"] < 1:
        raise ConfigError(f"--label-smoothing must be in [0, 1), got {config['label_smoothing']!r}")
    if config["drop_path"] is not None and not 0 <= config["drop_path"] < 1:
        raise ConfigError(f"--drop-path must be in [0, 1), got {config['drop_path']!r}")
    for key, choices in (("synthetic_size", SYNTHETIC_SIZES), ("noisy_labels", NOISY_LABEL_PERCENTS)):
        if config[key] not in choices:
            raise ConfigError(f"--{key.replace('_', '-')} must be one of {', '.join(map(str, choices))}, "
                              f"got {config[key]!r}")
    if config["model"] not in variants.VARIANTS:
        raise ConfigError(f"--model: unknown variant {config['model']!r}; run with --help for the list")
    if config["dataset"] not in DATASETS:
        raise ConfigError(f"--dataset: unknown dataset {config['dataset']!r}; choose one of {', '.join(DATASETS)}")
    if config["step_timing"] not in STEP_TIMINGS:
        raise ConfigError(f"--step-timing must be on or off, got {config['step_timing']!r}")
    if config["pretrained"] is not None and not Path(config["pretrained"]).exists():
        raise ConfigError(f"--pretrained: {config['pretrained']} does not exist; give a weights file "
                          "(.pth, .pt, .bin, .safetensors, a Lightning .ckpt) or a run folder")
    if config["precision"] not in PRECISIONS:
        raise ConfigError(f"--precision must be fp32 or bf16, got {config['precision']!r}")
    parse_profile_steps(config["profile_steps"])
    if config["run_name"] is not None and (not config["run_name"] or "/" in config["run_name"]
                                           or config["run_name"] in (".", "..")):
        raise ConfigError(f"--run-name must be a plain folder name, got {config['run_name']!r}")


def parse_profile_steps(text: str | None) -> tuple[int, int] | None:
    """'5,10' -> (5, 10): trace global steps 5 to 10 inclusive ('5': step 5 only); raises ConfigError naming the flag."""
    if not text:
        return None
    parts = str(text).split(",")
    try:
        first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        first, last = 0, -1
    if not 1 <= first <= last:
        raise ConfigError(
            f"--profile-steps must be 'FIRST,LAST' global steps with 1 <= FIRST <= LAST, got {text!r}")
    return first, last


def load_pretrained(load: Callable[[Any, str], Any], model: Any, path: str, *, announce: bool) -> None:
    """--pretrained in either stack: copy the weights at `path` into `model` with the stack's reader (its
    weights.load_pretrained: derived buffers rebuilt, a head of another class count left at its init) and print the
    reader's report when `announce`; weights that do not fit are a one-line ConfigError naming the tensors."""
    try:
        report = load(model, path)
    except WeightsFormatError as error:
        raise ConfigError(f"--pretrained: {' '.join(str(error).split())}") from None
    if announce:
        print(f"--pretrained: {report}", flush=True)


def total_steps(config: dict[str, Any], steps_per_epoch: int) -> int:
    """Optimiser steps in the whole run: --max-steps when given, else epochs x steps per epoch; raises ConfigError
    naming --epochs when that product passes MAX_STEPS (an int32 step count)."""
    full = config["epochs"] * steps_per_epoch
    total = min(full, config["max_steps"]) if config["max_steps"] else full
    if total > MAX_STEPS:
        raise ConfigError(f"--epochs {config['epochs']} x {steps_per_epoch} steps per epoch is {total} steps, more "
                          f"than {MAX_STEPS}; lower --epochs or give --max-steps")
    return total


def warmup_steps(config: dict[str, Any], steps_per_epoch: int) -> int:
    """Warm-up length in optimiser steps, never the whole run."""
    return min(int(round(config["warmup_epochs"] * steps_per_epoch)), max(total_steps(config, steps_per_epoch) - 1, 0))


def learning_rate(step: int, config: dict[str, Any], steps_per_epoch: int) -> float:
    """Reference schedule (linear warm-up, then cosine), per optimiser step; both stacks test against it."""
    peak = config["lr"]
    warm = warmup_steps(config, steps_per_epoch)
    total = total_steps(config, steps_per_epoch)
    if step < warm:
        start = peak * config["warmup_start_factor"]
        return start + (peak - start) * step / warm
    end = peak * config["cosine_end_factor"]
    progress = min(max((step - warm) / max(total - warm, 1), 0.0), 1.0)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def prepare_run_dir(config: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Create the run folder and save the resolved config; on --resume, refuse a changed experiment.

    --resume on a folder without config.json (none yet, or a run killed before writing it) starts the run, as a
    job scheduler that always relaunches with --resume needs; the stack then warns that it starts from step 0
    (warn_no_checkpoint) unless it finds checkpoints to continue. Raises ConfigError as check_run_dir does.
    """
    resumes = check_run_dir(config, extra)
    run_dir = Path(config["run_dir"])
    record = dict(config, **(extra or {}), command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    if resumes:
        record["resumed_from_config"] = str(run_dir / "config.json")
        _write_record(run_dir / "config.resume.json", record)
        return run_dir
    _write_record(run_dir / "config.json", record)
    return run_dir


def check_run_dir(config: dict[str, Any], extra: dict[str, Any] | None = None) -> bool:
    """prepare_run_dir's checks, writing nothing: True when --resume continues a run folder that has a config.json.

    Raises ConfigError naming --resume for a changed experiment (a flag of _RESUME_MUST_MATCH differs from the saved
    config, `extra` included) and naming --run-name for a folder that holds a run, without --resume. Every process of a
    run on several machines calls it, so that all stop alike, before process 0 writes the folder.
    """
    run_dir = Path(config["run_dir"])
    config_path = run_dir / "config.json"
    if not (config["resume"] and config_path.is_file()):
        refuse_existing_run(config)
        return False
    record = dict(config, **(extra or {}))
    saved = json.loads(config_path.read_text())
    changed = [k for k in _RESUME_MUST_MATCH if k in saved and saved[k] != record.get(k)]
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} -> {record.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume: {run_dir} was started with different settings ({diffs}); "
                          "use a new --run-name or the original flags")
    return True


def refuse_existing_run(config: dict[str, Any]) -> None:
    """Without --resume, a run folder that already holds a run (its config.json) is a ConfigError naming --run-name."""
    run_dir = Path(config["run_dir"])
    if not config["resume"] and (run_dir / "config.json").exists():
        raise ConfigError(f"--run-name: {run_dir} already exists; pass --resume to continue it or pick another name")


def warn_no_checkpoint(run_dir: str | os.PathLike) -> None:
    """The one warning of a --resume with nothing to continue from: the run starts from step 0."""
    errors.warn(f"--resume: {run_dir} has no checkpoint yet; starting from step 0")


def _write_record(path: Path, record: dict[str, Any]) -> None:
    """Write `path` and the folders above it; a place that cannot be written is the --logdir flag's to fix."""
    try:
        atomic_write_json(path, record)
    except OSError as error:
        raise ConfigError(f"--logdir: cannot write {path} ({error.strerror}); choose a writable --logdir") from None
