"""The official augmentation (shared_data.augment): timm's operations and draws, soft targets that sum to 1, and one loss
on them in both stacks. (The same bytes in any process or worker count: tests/test_data_batches.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from shared_data import augment, run_config
from shared_data.batches import train_batch
from tests import stacks

IMG = 64
BATCH = 16
AUGMENT = augment.Augmentation(num_classes=10)


def _train(data, seed, epoch, index, **kwargs):
    return train_batch(data.train, seed=seed, epoch=epoch, index=index, batch_size=BATCH, img_size=IMG,
                       augment=AUGMENT, **kwargs)


def test_augmented_batch_is_float32_images_int32_labels_and_soft_targets(prepared_data):
    images, labels, targets = _train(prepared_data, 0, 0, 0)
    assert images.shape == (BATCH, IMG, IMG, 3) and images.dtype == np.float32
    assert labels.shape == (BATCH,) and labels.dtype == np.int32
    assert targets.shape == (BATCH, 10) and targets.dtype == np.float32
    np.testing.assert_array_equal(labels, targets.argmax(axis=1))
    # Normalised, with erased rectangles of normal noise: well outside the 0..1 range of plain pixels.
    assert images.min() < -1.5 and images.max() > 1.5


@pytest.mark.parametrize("mixing", [True, False])
def test_augmented_shards_concatenate_to_the_global_batch(prepared_data, mixing):
    settings = AUGMENT if mixing else augment.Augmentation(num_classes=10, mixup=0.0, cutmix=0.0)

    def batch(**shard):
        return train_batch(prepared_data.train, seed=3, epoch=1, index=4, batch_size=BATCH, img_size=IMG,
                           augment=settings, **shard)

    whole = batch()
    shards = [batch(shard_index=s, shard_count=4) for s in range(4)]
    for part, array in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([shard[part] for shard in shards]), array)


def test_image_draws_and_operations_are_timms_own_pipeline(prepared_data):
    """Drawing under the lock and applying outside it gives what timm's Compose gives from the same seeds."""
    from PIL import Image

    parts = augment.timm_parts(IMG, augment.ERASE_PROB)
    crop_flip_randaugment, to_tensor, normalize = parts.compose.transforms[:3], *parts.compose.transforms[3:5]
    erased = 0
    for position in range(120):  # enough images to draw every RandAugment operation
        image = prepared_data.train.images[position % len(prepared_data.train)]
        ours = augment.augment_image(image, seed=0, epoch=2, index=1, position=position, img_size=IMG,
                                     reprob=augment.ERASE_PROB)
        words = np.random.SeedSequence([0, 2, 1, augment._IMAGE_STREAM, position]).generate_state(6)
        with augment._seeded_global_rngs(words[:3]):
            picture = Image.fromarray(image)
            for transform in crop_flip_randaugment:
                picture = transform(picture)
        tensor = normalize(to_tensor(picture))
        with augment._seeded_global_rngs(words[3:]):
            tensor = parts.erase(tensor)
        reference = tensor.permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(ours, reference)
        erased += not np.array_equal(reference, normalize(to_tensor(picture)).permute(1, 2, 0).numpy())
    assert 10 < erased < 60  # about a quarter erased


def test_drawing_leaves_the_global_generators_as_they_were(prepared_data):
    import random

    import torch

    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = random.random(), np.random.random(), torch.rand(1).item()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    _train(prepared_data, 0, 0, 1)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("index", range(12))
def test_mix_plan_mixes_images_and_targets_as_timms_mixup(index):
    import torch
    from timm.data.mixup import Mixup

    size, side = 8, 16
    rng = np.random.default_rng(index)
    images = rng.normal(size=(size, 3, side, side)).astype(np.float32)
    labels = rng.integers(0, 10, size)
    plan = AUGMENT.mix_plan(seed=0, epoch=0, index=index, batch_size=size, img_size=side)
    mixer = Mixup(mixup_alpha=augment.MIXUP_ALPHA, cutmix_alpha=augment.CUTMIX_ALPHA, prob=1.0,
                  switch_prob=augment.MIX_SWITCH_PROB, mode="batch", label_smoothing=0.1, num_classes=10)
    with augment._seeded_global_rngs(np.random.SeedSequence([0, 0, index, augment._MIX_STREAM]).generate_state(3)):
        mixed, targets = mixer(torch.from_numpy(images.copy()), torch.from_numpy(labels))
    hwc = images.transpose(0, 2, 3, 1)
    ours = np.empty_like(hwc)
    for p in range(size):
        plan.mix(hwc[p], hwc[size - 1 - p], out=ours[p])
    np.testing.assert_array_equal(ours, mixed.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(plan.targets(labels, 10, 0.1), targets.numpy())


def test_targets_sum_to_one_and_give_each_image_lam_and_its_mirror_the_rest(prepared_data):
    kinds = set()
    for index in range(12):
        _, _, targets = _train(prepared_data, 0, 0, index)
        plan = AUGMENT.mix_plan(seed=0, epoch=0, index=index, batch_size=BATCH, img_size=IMG)
        kinds.add(plan.box is not None)
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
        chosen = np.asarray(prepared_data.train.labels)[_global_rows(prepared_data, index)]
        smooth = np.full((BATCH, 10), 0.1 / 10, np.float64)
        smooth[np.arange(BATCH), chosen] += 0.9
        np.testing.assert_allclose(targets, plan.lam * smooth + (1 - plan.lam) * smooth[::-1], atol=1e-6)
        if plan.box is not None:  # CutMix: lam is the share of the image left after the box was pasted in
            top, bottom, left, right = plan.box
            assert plan.lam == pytest.approx(1 - (bottom - top) * (right - left) / IMG**2)
    assert kinds == {True, False}  # both Mixup and CutMix were drawn


def _global_rows(data, index):
    from shared_data.batches import epoch_permutation

    return epoch_permutation(len(data.train.labels), 0, 0)[index * BATCH:(index + 1) * BATCH]


def test_soft_target_loss_is_equal_in_both_stacks(prepared_data):
    import jax.numpy as jnp
    import torch

    from flax_swin.steps import soft_target_cross_entropy as flax_loss
    from lightning_swin.module import soft_target_cross_entropy as torch_loss

    _, _, targets = _train(prepared_data, 0, 0, 3)
    logits = np.random.default_rng(0).normal(scale=3.0, size=targets.shape).astype(np.float32)
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    reference = float(-(targets * log_softmax).sum(axis=1).mean())
    from_torch = float(torch_loss(torch.from_numpy(logits), torch.from_numpy(targets)))
    from_optax = float(flax_loss(jnp.asarray(logits), jnp.asarray(targets)))
    assert from_torch == pytest.approx(reference, abs=1e-6)
    assert from_optax == pytest.approx(reference, abs=1e-6)


def test_posterize_at_full_magnitude_gives_a_black_image_instead_of_pillows_error():
    from PIL import Image

    picture = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert not np.asarray(augment._posterize(picture, 0)).any()
    assert np.asarray(augment._posterize(picture, 1)).max() == 128


def test_official_augmentation_is_the_default_recipe_and_basic_the_smoke_presets():
    parser = run_config.build_parser("flax")
    default = run_config.resolve(parser.parse_args([]), "flax")
    assert (default["augment"], default["mixup"], default["cutmix"], default["reprob"]) == ("official", 0.8, 1.0, 0.25)
    smoke = run_config.resolve(parser.parse_args(["--preset", "smoke"]), "flax")
    assert (smoke["augment"], smoke["mixup"], smoke["cutmix"], smoke["reprob"]) == ("basic", 0.0, 0.0, 0.0)
    assert augment.from_config(smoke, 10) is None
    chosen = run_config.resolve(parser.parse_args(["--preset", "smoke", "--augment", "official", "--mixup", "0"]), "flax")
    assert augment.from_config(chosen, 10) == augment.Augmentation(10, mixup=0.0, cutmix=1.0, reprob=0.25,
                                                                   label_smoothing=0.0)


@pytest.mark.parametrize("argv, flag", [
    (["--preset", "smoke", "--mixup", "0.8"], "--mixup"),
    (["--cutmix", "-1"], "--cutmix"),
    (["--reprob", "1.5"], "--reprob"),
])
def test_a_bad_augmentation_flag_is_rejected_naming_it(argv, flag):
    parser = run_config.build_parser("lightning")
    with pytest.raises(run_config.ConfigError, match=flag):
        run_config.resolve(parser.parse_args(argv), "lightning")


@pytest.mark.slow
def test_same_start_with_the_official_augmentation_trains_the_same_in_both_stacks(
        tmp_path, synthetic_data_dir, compilation_cache):
    import torch

    from lightning_swin.model import create_model
    from shared_data import tags

    torch.manual_seed(1)
    weights = tmp_path / "init.pth"
    torch.save(create_model("swinv2_nano_window4_64", num_classes=10, img_size=64).state_dict(), weights)
    for stack in stacks.STACKS:
        stacks.train(stack, tmp_path / "runs", synthetic_data_dir, "--epochs", "1", "--augment", "official",
                     "--label-smoothing", "0.1", "--pretrained", str(weights))
    losses = [np.array([value for _, value in stacks.scalars(tmp_path / "runs" / stack / "run")[tags.TRAIN_LOSS]])
              for stack in stacks.STACKS]
    assert len(losses[0]) == len(losses[1]) == 6
    assert np.abs(losses[0] - losses[1]).max() <= 1e-3
