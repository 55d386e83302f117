"""Evaluate Swin V2 weights on a validation split with either stack: top-1, top-5, loss, per-class, confusion matrix."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from shared_data import errors
from shared_data.errors import ConfigError
from shared_data.registry import DATASET_NAMES
from shared_data.swin_weights import CHECKPOINT_CHOICES, WeightsFormatError, find_run_config, read_source
from shared_data.variants import VARIANTS, variant_config

PROG = "evaluate.py"
STACKS = ("lightning", "flax")
RESULT_FILE = "evaluation.json"
CONFUSION_FILE = "confusion_matrix.png"
TOP_K = 5
# Settings a run folder's config.json supplies when the flag is not given, and their defaults otherwise.
RUN_DEFAULTS = {"model": None, "dataset": "imagenette", "data_dir": "data", "img_size": None,
                "synthetic_size": "small", "seed": 0}

# uint8 NHWC images -> float32 logits [B, classes]
Forward = Callable[[np.ndarray], np.ndarray]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate Swin V2 weights on a dataset's validation split (centre crops, every image once) "
                    "with the PyTorch or the Flax model: top-1, top-5, plain cross-entropy, per-class accuracy, "
                    f"written to <out>/{RESULT_FILE} with a confusion matrix in <out>/{CONFUSION_FILE}. Given a run "
                    "folder, its config.json supplies the model, dataset, image size and synthetic seed.")
    parser.add_argument("source", type=Path, help="weights file (any format convert_weights.py reads) or run folder")
    parser.add_argument("--stack", choices=STACKS, default=None,
                        help="whose model computes the logits (default: the run's stack, else lightning)")
    parser.add_argument("--checkpoint", default="best", metavar="best|latest|PATH",
                        help="of a run folder: the best by validation accuracy (default), the latest, or a checkpoint "
                             "file or step folder (a name inside the run's checkpoints/ is enough)")
    parser.add_argument("--model", choices=sorted(VARIANTS), default=None, help="variant (needed for a weights file)")
    parser.add_argument("--dataset", choices=DATASET_NAMES, default=None, help="dataset (default imagenette)")
    parser.add_argument("--data-dir", default=None, help="data folder (default data)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: the variant's)")
    parser.add_argument("--synthetic-size", default=None, help="size of the synthetic dataset (default small)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the synthetic dataset (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="batch-assembly threads (default 2)")
    parser.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder (default evaluation)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of one evaluation: flags first, then the run's config.json, then RUN_DEFAULTS; raises
    ConfigError naming the flag for a value that cannot work."""
    run = find_run_config(args.source) or {}
    settings = {key: getattr(args, key) if getattr(args, key) is not None else run.get(key, default)
                for key, default in RUN_DEFAULTS.items()}
    settings["stack"] = args.stack or (run["stack"] if run.get("stack") in STACKS else "lightning")
    if settings["model"] not in VARIANTS:
        raise ConfigError(f"--model: {args.source} is not a run folder, so name the variant of its weights; "
                          f"choose one of {', '.join(sorted(VARIANTS))}")
    settings["img_size"] = settings["img_size"] or VARIANTS[settings["model"]]["img_size"]
    try:
        variant_config(settings["model"], img_size=settings["img_size"])
    except ValueError as error:
        raise ConfigError(f"--img-size/--model: {error}") from None
    if args.batch_size < 1 or args.num_workers < 0:
        raise ConfigError(f"--batch-size must be at least 1 and --num-workers at least 0, got {args.batch_size} "
                          f"and {args.num_workers}")
    if args.checkpoint in CHECKPOINT_CHOICES:
        settings["weights"], settings["checkpoint"] = args.source, args.checkpoint
    else:
        path = next((path for path in (Path(args.checkpoint), args.source / "checkpoints" / args.checkpoint)
                     if path.exists()), None)
        if path is None:
            raise ConfigError(f"--checkpoint: {args.checkpoint} is neither {' nor '.join(CHECKPOINT_CHOICES)} nor a "
                              f"checkpoint (a path, or a name in {args.source / 'checkpoints'})")
        settings["weights"], settings["checkpoint"] = path, "best"
    return settings


def torch_forward(model_name: str, img_size: int, weights: dict[str, np.ndarray]) -> Forward:
    """The PyTorch model holding `weights`, in eval mode, on the GPU when there is one."""
    import torch

    from lightning_swin.model import create_model
    from lightning_swin.weights import load_pretrained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(model_name, weights["head.weight"].shape[0], img_size=img_size)
    load_pretrained(model, weights)
    model = model.to(device).eval()

    def forward(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            inputs = torch.from_numpy(_normalized(images)).to(device).permute(0, 3, 1, 2)
            return model(inputs).float().cpu().numpy()

    return forward


def flax_forward(model_name: str, img_size: int, weights: dict[str, np.ndarray]) -> Forward:
    """The Flax model holding `weights`, in eval mode, jitted on the default device."""
    import jax.numpy as jnp
    from flax import nnx

    from flax_swin.model import create_model
    from flax_swin.steps import build_model
    from flax_swin.weights import load_pretrained

    # Built as training builds it: one program, compiled quickly on a CPU (eagerly, every initializer would compile
    # on its own).
    model = build_model(lambda: create_model(model_name, weights["head.weight"].shape[0], img_size=img_size))
    load_pretrained(model, weights)
    model.eval()
    jitted = nnx.jit(lambda model, inputs: model(inputs))
    return lambda images: np.asarray(jitted(model, jnp.asarray(_normalized(images))))


FORWARDS: dict[str, Callable[[str, int, dict[str, np.ndarray]], Forward]] = {
    "lightning": torch_forward, "flax": flax_forward}


def _normalized(images: np.ndarray) -> np.ndarray:
    from shared_data.normalize import normalize_numpy

    return normalize_numpy(images)  # the reference both stacks' on-device normalisation is tested against


def predict(forward: Forward, split: Any, *, batch_size: int, img_size: int, num_workers: int,
            progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(logits float32 [N, classes], labels int32 [N]) of every validation image once, in order: the batches
    training validates on (centre crops, the last padded and its padding dropped by its mask)."""
    from tqdm import tqdm

    from shared_data import batches
    from shared_data.loader import BatchLoader

    batch = functools.partial(batches.val_batch, split, batch_size=batch_size, img_size=img_size)
    steps = batches.val_steps(len(split.labels), batch_size)
    loader = BatchLoader(lambda index: batch(index=index), range(steps), num_workers, prefetch=max(2, num_workers))
    logits, labels = [], []
    for images, batch_labels, mask in tqdm(loader, total=steps, desc="evaluate", unit="batch", disable=not progress):
        real = mask > 0
        logits.append(forward(images)[real])
        labels.append(batch_labels[real])
    return np.concatenate(logits), np.concatenate(labels)


def metrics(logits: np.ndarray, labels: np.ndarray, class_ids: Sequence[str],
            class_names: Sequence[str]) -> dict[str, Any]:
    """Top-1, top-5 (a tie with the label counts against it), mean plain cross-entropy, per-class accuracy and the
    confusion matrix (rows: true class, columns: predicted), computed in float64."""
    num_classes = len(class_ids)
    logits = logits.astype(np.float64)
    rows = np.arange(len(labels))
    label_logit = logits[rows, labels]
    peak = logits.max(axis=1)
    loss = np.log(np.exp(logits - peak[:, None]).sum(axis=1)) + peak - label_logit
    predicted = logits.argmax(axis=1)
    rank = (logits > label_logit[:, None]).sum(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    counts = confusion.sum(axis=1)
    return {
        "images": int(len(labels)),
        "top1": float((predicted == labels).mean()),
        "top5": float((rank < min(TOP_K, num_classes)).mean()),
        "loss": float(loss.mean()),
        "per_class": [{"class_id": class_id, "class_name": name, "images": int(counts[c]),
                       "accuracy": float(confusion[c, c] / counts[c]) if counts[c] else None}
                      for c, (class_id, name) in enumerate(zip(class_ids, class_names))],
        "confusion_matrix": confusion.tolist(),
    }


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], title: str, path: Path) -> Path:
    """The confusion matrix as a PNG: each row normalised to the true class's images, counts written in the cells."""
    from matplotlib.figure import Figure  # no pyplot: nothing process-wide, no display needed

    counts = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, counts, out=np.zeros(confusion.shape), where=counts > 0)
    size = max(5.0, 0.55 * len(class_names) + 2.5)
    figure = Figure(figsize=(size + 1.5, size))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="share of the true class's images")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(ticks, class_names, fontsize=8)
    if len(class_names) <= 30:
        for (row, col), count in np.ndenumerate(confusion):
            axes.text(col, row, str(count), ha="center", va="center", fontsize=7,
                      color="white" if shares[row, col] > 0.5 else "black")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def evaluate(settings: dict[str, Any], out: Path, *, batch_size: int, num_workers: int,
             progress: bool) -> dict[str, Any]:
    """Run one evaluation and write RESULT_FILE and CONFUSION_FILE into `out`; returns what RESULT_FILE holds.

    Raises ConfigError for weights or data that cannot give a meaningful evaluation, DataError from the data.
    """
    from shared_data.prepare import prepare_data
    from shared_data.trash_safe import atomic_write_json

    try:
        weights, fmt, source = read_source(settings["weights"], settings["checkpoint"])
    except WeightsFormatError as error:
        raise ConfigError(" ".join(str(error).split())) from None
    data = prepare_data(settings["dataset"], settings["data_dir"], settings["img_size"], seed=settings["seed"],
                        synthetic_size=settings["synthetic_size"], num_workers=num_workers, progress=progress)
    if data.fell_back:
        raise ConfigError(f"--dataset {settings['dataset']}: unavailable under {settings['data_dir']}, and scores "
                          "on the synthetic stand-in would mean nothing; put the dataset there or fix --data-dir")
    head = weights.get("head.weight")
    if head is None or head.shape[0] != data.num_classes:
        raise ConfigError(f"{source}: its head has {'no' if head is None else head.shape[0]} classes but "
                          f"{data.dataset} has {data.num_classes}; evaluate weights trained on this dataset's classes")
    try:
        forward = FORWARDS[settings["stack"]](settings["model"], settings["img_size"], weights)
    except (WeightsFormatError, ValueError) as error:  # weights that do not fit the variant, an impossible size
        raise ConfigError(f"{source}: {' '.join(str(error).split())}") from None
    logits, labels = predict(forward, data.val, batch_size=batch_size, img_size=settings["img_size"],
                             num_workers=num_workers, progress=progress)
    result = {
        "source": str(source), "format": fmt, "stack": settings["stack"], "model": settings["model"],
        "img_size": settings["img_size"], "dataset": data.dataset, "split": "val",
        **metrics(logits, labels, data.class_ids, data.class_names),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULT_FILE, result)
    title = (f"{'/'.join(Path(source).parts[-3:])} ({settings['stack']}), {data.dataset} val: "
             f"top-1 {result['top1']:.2%}, {result['images']} images")
    plot_confusion(np.asarray(result["confusion_matrix"]), data.class_names, title, out / CONFUSION_FILE)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate and print a one-line summary; exit 2 on a bad flag or weights that do not fit, 1 on a data error."""
    args = parse_args(argv)
    result = errors.exit_on_error(PROG, lambda: evaluate(resolve(args), args.out, batch_size=args.batch_size,
                                                         num_workers=args.num_workers, progress=args.progress))
    print(f"{result['source']} ({result['stack']}) on {result['dataset']} val, {result['images']} images: "
          f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}, loss {result['loss']:.4f}; "
          f"wrote {args.out / RESULT_FILE} and {args.out / CONFUSION_FILE}")
    return 0
