"""The official Swin V2 training augmentation, timm's, with every draw a pure function of (seed, epoch, index).

What the official code does (its build_transform and Mixup, with the defaults of its config): per image, timm's
random-resized crop (bicubic), horizontal flip, RandAugment `rand-m9-mstd0.5-inc1`, normalisation and random erasing
(p 0.25, per-pixel normal noise); per batch, Mixup (alpha 0.8) or CutMix (alpha 1.0), chosen with probability 0.5,
mixing each image with its mirror in the batch, and label-smoothed soft targets. The operations are timm's own;
this module only decides where their random numbers come from.

Randomness. timm draws from the process-wide generators (python `random`, numpy's global RandomState, torch's
default CPU generator), and shared_data.loader runs batch functions on threads that share them. So each image's
draws run while holding one process-wide lock, with those generators seeded from (seed, epoch, index, position in
the global batch) and put back as they were afterwards; the pixel work runs outside the lock, in parallel. To split
draws from pixel work, `_draw_image_steps` makes timm's draws in timm's own order (RandomResizedCropAndInterpolation,
RandomHorizontalFlip, RandAugment and AugmentOp) and returns the operations to apply; a test holds it to timm's own
Compose under the same seeds. Random erasing and the batch's mix parameters draw and apply under the lock (little work).
Nothing else in a process may draw from these global generators while a batch is being built on another thread.

Why on the host, and why float32. Erasing fills with normal noise in normalised units, and mixing makes fractional
pixels, so no uint8 image can carry the result. Mixing on each device would round differently (XLA fuses the multiply
and the add; torch does not), so the host does all of it, the way timm does, and both stacks receive the same float32
bytes, already normalised: they only permute (Lightning) and train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import threading
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np

from shared_data.errors import ConfigError
from shared_data.normalize import MEAN, STD, normalize_numpy

OFFICIAL = "official"
BASIC = "basic"
AUGMENTS = (OFFICIAL, BASIC)
# The official Swin V2 config (config.py AUG.* and DATA.INTERPOLATION).
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
MIXUP_ALPHA = 0.8
CUTMIX_ALPHA = 1.0
MIX_SWITCH_PROB = 0.5  # CutMix instead of Mixup with this probability, per batch
ERASE_PROB = 0.25
ERASE_MODE = "pixel"
COLOR_JITTER = 0.4  # passed as the official code does; timm leaves it out when RandAugment is on
INTERPOLATION = "bicubic"

# SeedSequence tags keeping the per-image and per-batch streams apart from batches.py's crop-and-flip stream.
_IMAGE_STREAM = 1
_MIX_STREAM = 2
_GLOBAL_RNGS = threading.Lock()

Step = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]  # (fn, args, kwargs): img = fn(img, *args, **kwargs)


def resolve_settings(kind: str, mixup: float | None, cutmix: float | None, reprob: float | None) -> dict[str, float]:
    """The mixup, cutmix and reprob a run uses: the official values where not given under --augment official, 0 under
    basic (where giving one is a mistake); raises ConfigError naming the flag."""
    if kind not in AUGMENTS:
        raise ConfigError(f"--augment must be one of {', '.join(AUGMENTS)}, got {kind!r}")
    given = dict(mixup=mixup, cutmix=cutmix, reprob=reprob)
    if kind == BASIC:
        named = [f"--{key} {value}" for key, value in given.items() if value]
        if named:
            raise ConfigError(f"{', '.join(named)} needs --augment official (basic is crop and flip only)")
        return dict.fromkeys(given, 0.0)
    defaults = dict(mixup=MIXUP_ALPHA, cutmix=CUTMIX_ALPHA, reprob=ERASE_PROB)
    settings = {key: float(defaults[key] if value is None else value) for key, value in given.items()}
    for key in ("mixup", "cutmix"):
        if not (settings[key] >= 0 and math.isfinite(settings[key])):
            raise ConfigError(f"--{key} must be an alpha >= 0 (0 disables), got {settings[key]!r}")
    if not 0 <= settings["reprob"] <= 1:
        raise ConfigError(f"--reprob must be a probability in [0, 1], got {settings['reprob']!r}")
    return settings


def from_config(config: Mapping[str, Any], num_classes: int) -> "Augmentation | None":
    """The resolved run config's augmentation for `num_classes` classes; None for --augment basic (batches.py's
    crop and flip, integer labels)."""
    if config["augment"] != OFFICIAL:
        return None
    return Augmentation(num_classes=num_classes, mixup=config["mixup"], cutmix=config["cutmix"],
                        reprob=config["reprob"], label_smoothing=config["label_smoothing"])


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The official training augmentation's settings; `batch` builds one (shard of a) augmented global batch.

    Plain values only, so it pickles into DataLoader worker processes; timm's objects are built per process.
    """

    num_classes: int
    mixup: float = MIXUP_ALPHA
    cutmix: float = CUTMIX_ALPHA
    reprob: float = ERASE_PROB
    label_smoothing: float = 0.1

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def batch(self, split: Any, chosen: np.ndarray, *, seed: int, epoch: int, index: int, img_size: int,
              shard: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows `shard` of the global batch of images `chosen` (cache rows, in batch order):
        (images float32 normalised [b, S, S, 3], labels int32 [b], targets float32 [b, num_classes]).

        `targets` are the mixed, label-smoothed soft targets (each row sums to 1); `labels` is each row's largest
        target, what train accuracy is measured against. Mixing pairs position p with B - 1 - p, so a shard also
        augments the rows of its mirror shard.
        """
        size = len(chosen)
        if self.mixes and size % 2:
            raise ValueError(f"Mixup/CutMix pair each image with its mirror: batch size {size} must be even")
        positions = list(range(size))[shard]
        needed = sorted(set(positions) | {size - 1 - p for p in positions}) if self.mixes else positions
        images = {p: augment_image(split.images[chosen[p]], seed=seed, epoch=epoch, index=index, position=p,
                                   img_size=img_size, reprob=self.reprob) for p in needed}
        plan = self.mix_plan(seed=seed, epoch=epoch, index=index, batch_size=size, img_size=img_size)
        out = np.empty((len(positions), img_size, img_size, 3), dtype=np.float32)
        for row, p in enumerate(positions):
            if self.mixes:
                plan.mix(images[p], images[size - 1 - p], out=out[row])
            else:
                out[row] = images[p]
        targets = plan.targets(np.asarray(split.labels[chosen]), self.num_classes, self.label_smoothing)[shard]
        return out, targets.argmax(axis=1).astype(np.int32), targets

    def mix_plan(self, *, seed: int, epoch: int, index: int, batch_size: int, img_size: int) -> "MixPlan":
        """The batch's Mixup/CutMix draw (timm's Mixup in 'batch' mode), a pure function of (seed, epoch, index)."""
        if not self.mixes:
            return MixPlan(1.0, None)
        from timm.data.mixup import Mixup, cutmix_bbox_and_lam

        mixer = Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, prob=1.0, switch_prob=MIX_SWITCH_PROB,
                      mode="batch", label_smoothing=self.label_smoothing, num_classes=self.num_classes)
        words = np.random.SeedSequence([seed, epoch, index, _MIX_STREAM]).generate_state(3)
        with _seeded_global_rngs(words):
            # What Mixup._mix_batch draws, without the in-place mixing of a whole batch (a shard holds part of it).
            lam, use_cutmix = mixer._params_per_batch()
            if lam == 1.0 or not use_cutmix:
                return MixPlan(float(lam), None)
            box, lam = cutmix_bbox_and_lam((batch_size, 3, img_size, img_size), lam,
                                           ratio_minmax=mixer.cutmix_minmax, correct_lam=mixer.correct_lam)
        return MixPlan(float(lam), tuple(int(edge) for edge in box))


class MixPlan(NamedTuple):
    """One batch's mix: image p becomes lam * p + (1 - lam) * its mirror (Mixup), or, with `box` (top, bottom, left,
    right), p with the box's pixels taken from its mirror, lam the share of p left (CutMix)."""

    lam: float
    box: tuple[int, int, int, int] | None

    def mix(self, image: np.ndarray, mirror: np.ndarray, *, out: np.ndarray) -> None:
        """Write the mix of two HWC float32 images into `out`: the same float32 arithmetic as timm's Mixup."""
        if self.box is not None:
            top, bottom, left, right = self.box
            out[...] = image
            out[top:bottom, left:right] = mirror[top:bottom, left:right]
        elif self.lam == 1.0:
            out[...] = image
        else:
            np.add(image * np.float32(self.lam), mirror * np.float32(1.0 - self.lam), out=out)

    def targets(self, labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
        """Soft targets of the global batch's labels (timm's mixup_target): float32 [B, num_classes]."""
        import torch
        from timm.data.mixup import mixup_target

        return mixup_target(torch.from_numpy(labels.astype(np.int64)), num_classes, self.lam, smoothing).numpy()


def augment_image(image: np.ndarray, *, seed: int, epoch: int, index: int, position: int, img_size: int,
                  reprob: float) -> np.ndarray:
    """One cached uint8 HWC image -> float32 normalised HWC [img_size, img_size, 3]: timm's crop, flip, RandAugment,
    normalisation and erasing, drawn from (seed, epoch, index, position)."""
    from PIL import Image

    parts = timm_parts(img_size, reprob)
    words = np.random.SeedSequence([seed, epoch, index, _IMAGE_STREAM, position]).generate_state(6)
    picture = Image.fromarray(np.ascontiguousarray(image))
    with _seeded_global_rngs(words[:3]):
        steps = _draw_image_steps(parts, picture)
    for fn, args, kwargs in steps:
        picture = fn(picture, *args, **kwargs)
    # timm's ToTensor and Normalize, bit for bit, in numpy: torch's threads on such small tensors are ~25x slower
    # on a busy 2-core machine.
    normalised = normalize_numpy(np.asarray(picture))
    if parts.erase is not None:
        import torch

        with _seeded_global_rngs(words[3:]):
            parts.erase(torch.from_numpy(normalised).permute(2, 0, 1))  # in place, through timm's CHW view
    return normalised


class TimmParts(NamedTuple):
    """The parts of timm's training transform, in their order; `compose` is the whole, for reference."""

    crop: Any  # RandomResizedCropAndInterpolation
    flip: Any  # torchvision RandomHorizontalFlip
    rand_augment: Any  # RandAugment
    # (then ToTensor and Normalize with shared_data.normalize's MEAN and STD: normalize_numpy does both)
    erase: Any  # RandomErasing, or None when reprob is 0
    compose: Any


@functools.lru_cache(maxsize=8)
def timm_parts(img_size: int, reprob: float) -> TimmParts:
    """timm's training transform at `img_size`, built by the call the official code makes (its build_transform)."""
    from timm.data import create_transform

    compose = create_transform(img_size, is_training=True, color_jitter=COLOR_JITTER, auto_augment=RAND_AUGMENT,
                               re_prob=reprob, re_mode=ERASE_MODE, re_count=1, interpolation=INTERPOLATION,
                               mean=MEAN, std=STD)
    transforms = list(compose.transforms)
    erase = transforms.pop() if reprob > 0 else None
    crop, flip, rand_augment, _, _ = transforms
    # Draws must all happen in _draw_image_steps: a random interpolation would draw inside an operation.
    assert not isinstance(crop.interpolation, (tuple, list)), crop
    for op in rand_augment.ops:
        assert not isinstance(op.kwargs["resample"], (tuple, list)), op
        if op.name == "PosterizeIncreasing":
            op.aug_fn = _posterize
    return TimmParts(crop, flip, rand_augment, erase, compose)


def _posterize(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    """timm's posterize; at full magnitude timm asks to keep 0 bits, which Pillow used to turn into a black image and
    Pillow 13 refuses (ValueError), so that case is the black image here."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def _draw_image_steps(parts: TimmParts, picture: Any) -> list[Step]:
    """Every draw of timm's crop, flip and RandAugment for one image, in timm's order, from the global generators;
    returns the operations to apply. Mirrors RandomResizedCropAndInterpolation.__call__, RandomHorizontalFlip.forward,
    RandAugment.__call__ and AugmentOp.__call__ of the pinned timm, each without its pixel work."""
    import torch
    import torchvision.transforms.functional as TF
    from timm.data.auto_augment import _LEVEL_DENOM

    crop = parts.crop
    top, left, height, width = crop.get_params(picture, crop.scale, crop.ratio)
    steps: list[Step] = [(TF.resized_crop, (top, left, height, width, crop.size, crop.interpolation), {})]
    if torch.rand(1) < parts.flip.p:
        steps.append((TF.hflip, (), {}))
    augment = parts.rand_augment
    ops = np.random.choice(augment.ops, augment.num_layers, replace=augment.choice_weights is None,
                           p=augment.choice_weights)
    for op in ops:
        if op.prob < 1.0 and random.random() > op.prob:
            continue
        magnitude = op.magnitude
        if op.magnitude_std == float("inf"):
            magnitude = random.uniform(0, magnitude)
        elif op.magnitude_std > 0:
            magnitude = random.gauss(magnitude, op.magnitude_std)
        magnitude = max(0.0, min(magnitude, op.magnitude_max or _LEVEL_DENOM))
        args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
        steps.append((op.aug_fn, tuple(args), dict(op.kwargs)))
    return steps


@contextlib.contextmanager
def _seeded_global_rngs(words: np.ndarray) -> Iterator[None]:
    """Hold the lock with python `random`, numpy's global RandomState and torch's default CPU generator seeded from
    three uint32 `words`; put all three back as they were on leaving."""
    import torch

    with _GLOBAL_RNGS:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(int(words[0]))
        np.random.seed(int(words[1]))
        torch.default_generator.manual_seed(int(words[2]))
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
