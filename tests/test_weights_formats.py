"""Reading official, timm, torchvision, Lightning and safetensors weights into the torch model, strictly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from lightning_swin.model import SwinTransformerV2, create_model
from lightning_swin.weights import load_pretrained
from shared_data.swin_weights import WeightsFormatError, canonicalize, read_weights

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def small_model(num_classes: int = 5, **overrides) -> SwinTransformerV2:
    config = dict(
        img_size=32, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4,
        pretrained_window_sizes=(0, 0, 0), num_classes=num_classes,
    )
    config.update(overrides)
    return SwinTransformerV2(**config).eval()


def randomised(model: SwinTransformerV2, seed: int = 0) -> SwinTransformerV2:
    """Every parameter random (post-norms included), so a misplaced tensor changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def logits(model: SwinTransformerV2, images: torch.Tensor = IMAGES) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def assert_same_state(a: SwinTransformerV2, b: SwinTransformerV2) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_official_pth_round_trip_is_exact(tmp_path):
    source = randomised(small_model())
    path = tmp_path / "official.pth"
    torch.save({"model": source.state_dict(), "epoch": 3, "config": "swinv2"}, path)
    state, fmt = read_weights(path)
    assert fmt == "official" and all(isinstance(v, np.ndarray) for v in state.values())
    target = small_model()
    report = load_pretrained(target, path)
    assert report.fmt == "official" and not report.head_replaced and len(report.loaded) == len(state)
    assert_same_state(source, target)
    assert torch.equal(logits(source), logits(target))


def test_safetensors_and_lightning_checkpoints_load_exactly(tmp_path):
    source = randomised(small_model())
    flat = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(flat))
    lightning = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 1}, lightning)
    for path, expected in ((flat, "official"), (lightning, "lightning")):
        target = small_model()
        assert load_pretrained(target, path).fmt == expected
        assert_same_state(source, target)


def test_half_precision_weights_are_read_as_float32(tmp_path):
    source = randomised(small_model())
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in source.state_dict().items()}, str(path))
    state, _ = read_weights(path)
    assert state["head.weight"].dtype == np.float32
    np.testing.assert_array_equal(state["head.weight"], source.head.weight.detach().to(torch.bfloat16).float().numpy())


def test_timm_names_are_renamed_to_official(tmp_path):
    source = randomised(small_model())
    timm_state = {}
    for key, value in source.state_dict().items():
        # timm: PatchMerging opens the next stage, the classifier sits in head.fc, k_bias is a buffer.
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        timm_state[key.replace("head.", "head.fc.")] = value
    timm_state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    timm_state["layers.0.blocks.0.attn.k_bias"] = torch.zeros(16)
    path = tmp_path / "timm.pth"
    torch.save(timm_state, path)
    target = small_model()
    assert load_pretrained(target, path).fmt == "timm"
    assert_same_state(source, target)
    # A headless timm state dict is still recognised by where its PatchMerging layers live.
    headless = {k: v for k, v in timm_state.items() if not k.startswith("head.")}
    state, fmt = canonicalize(headless)
    assert fmt == "timm" and "layers.0.downsample.reduction.weight" in state


def torchvision_tiny_with_random_weights() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.swin_v2_t().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("qkv.bias"):
                width = param.numel() // 3
                param[:width].normal_(0, 0.1)
                param[2 * width :].normal_(0, 0.1)  # the key slice stays zero, as torchvision keeps it
            elif name.endswith("logit_scale"):
                param.uniform_(1.0, 4.0)
            elif param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def test_torchvision_swin_v2_t_with_random_weights_gives_the_same_logits():
    reference = torchvision_tiny_with_random_weights()
    ours = create_model("swinv2_tiny_window8_256").eval()
    report = load_pretrained(ours, reference.state_dict())
    assert report.fmt == "torchvision" and not report.head_replaced
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    expected, got = logits(reference, images), logits(ours, images)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-constant outputs
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5


def test_torchvision_nonzero_key_bias_is_an_error():
    state = torchvision_tiny_with_random_weights().state_dict()
    state["features.1.0.attn.qkv.bias"][100] = 0.5
    with pytest.raises(WeightsFormatError, match="features|key-bias"):
        canonicalize(state, source="tv.pth")


def test_missing_and_unknown_keys_are_listed():
    state = randomised(small_model()).state_dict()
    del state["layers.1.blocks.0.attn.q_bias"]
    state["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(49, 1)
    with pytest.raises(WeightsFormatError) as error:
        load_pretrained(small_model(), state)
    message = str(error.value)
    assert "missing (1): layers.1.blocks.0.attn.q_bias" in message
    assert "unexpected (1): layers.0.blocks.0.attn.relative_position_bias_table" in message


def test_shape_mismatch_outside_the_head_is_an_error():
    state = small_model(embed_dim=32, num_heads=(2, 4, 8)).state_dict()
    with pytest.raises(WeightsFormatError, match="shape mismatch .*patch_embed.proj.weight"):
        load_pretrained(small_model(), state)


def test_different_head_size_is_kept_at_init_and_reported():
    source = randomised(small_model(num_classes=1000))
    target = small_model(num_classes=10)
    head_before = target.head.weight.clone()
    report = load_pretrained(target, source.state_dict())
    assert report.head_replaced and "1000 classes" in str(report) and "10 classes" in str(report)
    assert torch.equal(target.head.weight, head_before)
    assert torch.equal(target.layers[1].blocks[1].attn.qkv.weight, source.layers[1].blocks[1].attn.qkv.weight)
    with torch.no_grad():
        assert torch.equal(target.forward_features(IMAGES), source.forward_features(IMAGES))


def test_weights_load_into_another_window_size(tmp_path):
    source = randomised(small_model(window_size=4))
    path = tmp_path / "w4.pth"
    torch.save({"model": source.state_dict()}, path)
    target = small_model(window_size=2, pretrained_window_sizes=(4, 4, 4))
    load_pretrained(target, path)
    loaded, saved = target.layers[0].blocks[0].attn, source.layers[0].blocks[0].attn
    assert torch.equal(loaded.cpb_mlp[0].weight, saved.cpb_mlp[0].weight)
    with torch.no_grad():
        assert target(IMAGES).shape == (2, 5)


@pytest.mark.parametrize("content", ["garbage", "list", "module", "missing"])
def test_unreadable_files_give_a_one_line_error_naming_the_file(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif content == "list":
        torch.save([torch.zeros(3)], path)
    elif content == "module":
        torch.save(small_model(), path)  # a pickled module needs weights_only=False, which we never use
    with pytest.raises(WeightsFormatError) as error:
        read_weights(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message and "\x1b" not in message


def test_dict_without_tensors_is_an_unknown_format(tmp_path):
    path = tmp_path / "config.pth"
    torch.save({"lr": 0.1, "epochs": 3}, path)
    with pytest.raises(WeightsFormatError, match=r"config\.pth: unknown weights format"):
        read_weights(path)


def test_gradients_match_a_small_torchvision_swin_v2():
    from functools import partial

    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    reference = SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4],
        stochastic_depth_prob=0.0, num_classes=5, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-5),
    )
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        for name, param in reference.named_parameters():
            if name.endswith("qkv.bias"):
                width = param.numel() // 3
                param[width : 2 * width] = 0.0  # torchvision ignores the key slice; canonicalize requires it zero
    ours = SwinTransformerV2(
        img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, pretrained_window_sizes=(0, 0),
        num_classes=5, drop_path_rate=0.0,
    )
    load_pretrained(ours, reference.state_dict())
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 4])
    for model in (reference, ours):
        model.eval()  # no dropout anywhere, so eval and train compute the same gradients
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    expected, _ = canonicalize({name: p.grad for name, p in reference.named_parameters()}, source="grads")
    got = {name: p.grad.numpy() for name, p in ours.named_parameters()}
    assert expected.keys() == got.keys()
    for name, grad in got.items():
        scale = max(np.abs(expected[name]).max(), 1e-8)
        assert np.abs(grad - expected[name]).max() / scale <= 1e-4, name


class TrainingConfig(dict):
    """A stand-in for the official script's yacs CfgNode: a dict subclass with attributes of its own."""

    def __init__(self, **entries):
        super().__init__(**entries)
        self.__dict__["__immutable__"] = True
        self.__dict__["__deprecated_keys__"] = {"OLD_KEY"}


class Namespace:
    """A plain object, as argparse or a custom script would keep its options."""

    def __init__(self):
        self.lr = 5e-4
        self.data = ["imagenet", 256]


def test_official_training_checkpoint_with_a_config_object_loads_into_both_models(tmp_path):
    from flax import nnx

    from flax_swin.model import SwinTransformerV2 as FlaxSwin
    from flax_swin.weights import load_pretrained as load_into_flax
    from flax_swin.weights import to_canonical

    source = randomised(small_model())
    optimizer = torch.optim.AdamW(source.parameters())
    source(IMAGES).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt_epoch_29.pth"
    # What the official main.py saves every epoch.
    torch.save({"model": source.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": {"t_in_epochs": False}, "max_accuracy": np.float64(81.2), "scaler": {"scale": 65536.0},
                "epoch": 29,
                "config": TrainingConfig(MODEL=TrainingConfig(TYPE="swinv2"), TRAIN={"EPOCHS": 30}),
                "args": Namespace()}, path)
    target = small_model()
    assert load_pretrained(target, path).fmt == "official"
    assert_same_state(source, target)

    flax_model = nnx.eval_shape(lambda: FlaxSwin(
        img_size=32, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4,
        pretrained_window_sizes=(0, 0, 0), num_classes=5, rngs=nnx.Rngs(0)))
    assert load_into_flax(flax_model, path).fmt == "official"
    for name, value in to_canonical(flax_model).items():
        np.testing.assert_array_equal(value, source.state_dict()[name].numpy(), err_msg=name)


class RunsCode:
    """Unpickling this runs `code` (what a malicious checkpoint does); `via` is the global it calls."""

    def __init__(self, via, code):
        self.via, self.code = via, code

    def __reduce__(self):
        return self.via, (self.code,)


@pytest.mark.parametrize("via", ["os.system", "builtins.exec"])
def test_a_file_that_would_run_code_is_refused_in_one_line_naming_the_call(tmp_path, via):
    import builtins
    import os

    marker = tmp_path / "ran"
    call = {"os.system": (os.system, f"touch {marker}"),
            "builtins.exec": (builtins.exec, f"open({str(marker)!r}, 'w')")}
    path = tmp_path / "innocent.pth"
    torch.save({"model": small_model().state_dict(), "config": RunsCode(*call[via])}, path)
    with pytest.raises(WeightsFormatError) as error:
        read_weights(path)
    message = str(error.value)
    assert not marker.exists()
    assert message.startswith(f"{path}: refused: loading it would call ") and "\n" not in message
    assert "\x1b" not in message and ("system" in message if via == "os.system" else "builtins.exec" in message)


def test_our_lightning_checkpoint_with_numpy_rng_states_loads(tmp_path):
    import random

    source = randomised(small_model())
    path = tmp_path / "last-epoch=001-step=000006.ckpt"
    # What lightning_swin/module.py adds to every checkpoint besides the weights.
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 1, "global_step": 6,
                "rng_states": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                               "python": random.getstate()}}, path)
    target = small_model()
    assert load_pretrained(target, path).fmt == "lightning"
    assert_same_state(source, target)


def test_a_lightning_run_folder_reads_its_best_or_latest_checkpoint(tmp_path):
    run = tmp_path / "runs" / "lightning" / "run"
    (run / "checkpoints").mkdir(parents=True)
    best, latest = randomised(small_model(), seed=1), randomised(small_model(), seed=2)
    for model, name in ((best, "best-epoch=001-step=000006-val_accuracy=0.6000.ckpt"),
                        (latest, "last-epoch=002-step=000012.ckpt"),
                        (latest, "best-epoch=002-step=000012-val_accuracy=0.4000.ckpt")):
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, run / "checkpoints" / name)
    for checkpoint, expected, step in (("best", best, 6), ("latest", latest, 12)):
        target = small_model()
        report = load_pretrained(target, run, checkpoint)
        assert f"step={step:06d}" in report.source and report.fmt == "lightning"
        assert_same_state(expected, target)
    with pytest.raises(WeightsFormatError, match="unknown checkpoint 'worst'"):
        read_weights(run, "worst")
