"""Behaviour of the PyTorch Swin V2 model: shapes, official init, window clipping, config errors, decay groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_swin.model import (
    SwinTransformerV2,
    create_model,
    param_groups,
    relative_coords_table,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

NANO = "swinv2_nano_window4_64"


def small_model(**overrides) -> SwinTransformerV2:
    """Three stages at 32x32 so that a few blocks shift and the last stage is clipped; builds in milliseconds."""
    config = dict(
        img_size=32, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4,
        pretrained_window_sizes=(0, 0, 0), num_classes=5,
    )
    config.update(overrides)
    return SwinTransformerV2(**config)


@pytest.fixture(scope="module")
def tiny() -> SwinTransformerV2:
    torch.manual_seed(0)
    return create_model("swinv2_tiny_window8_256", num_classes=1000)


def test_tiny_has_the_official_parameter_count_and_logit_shape(tiny):
    model = tiny
    count = sum(p.numel() for p in model.parameters())
    # The official SwinV2-T figure (28.35M); torchvision's 28,351,570 adds a zero key-bias slice per block.
    assert count == 28_347_154
    assert round(count / 1e6, 2) == 28.35
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)


def test_any_num_classes_and_forward_features_shapes():
    model = create_model(NANO, num_classes=7).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert model(images).shape == (3, 7)
        assert model.forward_features(images).shape == (3, 256)
    headless = create_model(NANO, num_classes=0).eval()
    with torch.no_grad():
        assert headless(images).shape == (3, 256)


def test_parameter_names_are_the_official_ones_and_buffers_are_not_saved():
    model = small_model(ape=True)
    keys = set(model.state_dict())
    expected = {
        "patch_embed.proj.weight", "patch_embed.norm.weight", "absolute_pos_embed",
        "layers.0.blocks.1.attn.qkv.weight", "layers.0.blocks.1.attn.q_bias", "layers.0.blocks.1.attn.v_bias",
        "layers.0.blocks.1.attn.logit_scale", "layers.0.blocks.1.attn.cpb_mlp.0.weight",
        "layers.0.blocks.1.attn.cpb_mlp.0.bias", "layers.0.blocks.1.attn.cpb_mlp.2.weight",
        "layers.0.blocks.1.attn.proj.bias", "layers.0.blocks.1.norm1.bias", "layers.0.blocks.1.mlp.fc1.weight",
        "layers.0.blocks.1.mlp.fc2.bias", "layers.0.blocks.1.norm2.weight", "layers.0.downsample.reduction.weight",
        "layers.0.downsample.norm.bias", "norm.weight", "head.weight", "head.bias",
    }
    assert expected <= keys
    assert not any(k.endswith(("qkv.bias", "k_bias", "cpb_mlp.2.bias", "reduction.bias")) for k in keys)
    assert not any(k.startswith("layers.2.downsample") for k in keys)
    derived = ("relative_position_index", "relative_coords_table", "attn_mask", "token_order")
    assert not any(name in key for key in keys for name in derived)
    attn = model.layers[0].blocks[1].attn
    assert attn.qkv.weight.shape == (48, 16) and attn.logit_scale.shape == (1, 1, 1)
    assert model.layers[0].downsample.reduction.weight.shape == (32, 64)
    assert model.absolute_pos_embed.shape == (1, 64, 16)


def test_official_init_zero_post_norms_log10_logit_scale_truncated_normal_linears(tiny):
    model = tiny
    for layer in model.layers:
        for block in layer.blocks:
            for norm in (block.norm1, block.norm2):
                assert torch.all(norm.weight == 0) and torch.all(norm.bias == 0)
                assert norm.eps == 1e-5
            assert torch.allclose(block.attn.logit_scale, torch.full_like(block.attn.logit_scale, math.log(10)))
            assert isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "none"
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Linear)])
    assert abs(weights.std().item() - 0.02) < 1e-3
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None)
    assert model.norm.weight.eq(1).all() and model.layers[0].downsample.norm.weight.eq(1).all()


def test_blocks_start_as_identity_because_post_norms_are_zero():
    block = small_model().layers[0].blocks[1].eval()
    tokens = torch.randn(2, 64, 16)
    with torch.no_grad():
        assert torch.equal(block(tokens), tokens)


def test_windows_are_clipped_to_small_stages_and_those_do_not_shift():
    model = small_model()  # stage resolutions 8, 4, 2 with window 4
    windows = [[(b.window_size, b.shift_size) for b in layer.blocks] for layer in model.layers]
    assert windows == [[(4, 0), (4, 2)], [(4, 0), (4, 0)], [(2, 0), (2, 0)]]
    clipped = model.layers[2].blocks[1]
    assert clipped.attn_mask is None and clipped.attn.relative_coords_table.shape == (9, 2)
    tiny16 = create_model("swinv2_tiny_window16_256", embed_dim=8, num_heads=(1, 2, 4, 8))  # resolutions 64..8
    assert [layer.blocks[1].window_size for layer in tiny16.layers] == [16, 16, 16, 8]
    assert [layer.blocks[1].shift_size for layer in tiny16.layers] == [8, 8, 0, 0]


def test_window_partition_and_reverse_are_inverse():
    grid = torch.randn(2, 8, 8, 3)
    windows = window_partition(grid, 4)
    assert windows.shape == (8, 16, 3)
    assert torch.equal(windows[1].view(4, 4, 3), grid[0, :4, 4:])
    assert torch.equal(window_reverse(windows, 4, 8, 8), grid)


def test_shift_mask_separates_the_nine_regions():
    mask = shifted_window_mask(resolution=8, window=4, shift=2)
    assert mask.shape == (4, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert torch.equal(mask, mask.transpose(1, 2)) and torch.all(mask.diagonal(dim1=1, dim2=2) == 0)
    # Window 0 holds one region, the windows on the right and bottom edges two, the corner window four.
    regions = [len({tuple(row.tolist()) for row in window}) for window in mask]
    assert regions == [1, 2, 2, 4]


def test_coordinate_table_is_log_spaced_and_scaled_by_the_pretrained_window():
    table = relative_coords_table(window=16, pretrained_window=12)
    assert table.shape == (31 * 31, 2)
    corner = math.log2(8 * 15 / 11 + 1) / 3  # largest offset 15, normalised by pretrained window - 1
    assert torch.allclose(table[0], torch.tensor([-corner, -corner]))
    assert torch.allclose(table[31], torch.tensor([-math.log2(8 * 14 / 11 + 1) / 3, -corner]))  # ij order
    assert torch.allclose(relative_coords_table(window=8).abs().max(), torch.tensor(math.log2(9) / 3))
    assert torch.equal(relative_coords_table(window=1), torch.zeros(1, 2))


def test_weights_load_across_window_sizes_because_buffers_are_derived():
    source = small_model(window_size=4)
    target = small_model(window_size=2, pretrained_window_sizes=(4, 4, 4))
    target.load_state_dict(source.state_dict(), strict=True)
    with torch.no_grad():
        assert target.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (dict(img_size=30), "img_size"),
        (dict(num_heads=(1, 3, 4)), "num_heads"),
        (dict(window_size=3), "window_size"),
        (dict(pretrained_window_sizes=(0, 0)), "pretrained_window_sizes"),
    ],
)
def test_impossible_configs_fail_at_construction_naming_the_value(overrides, names):
    with pytest.raises(ValueError, match=names):
        small_model(**overrides)


def test_wrong_input_size_names_img_size():
    with pytest.raises(ValueError, match="img_size=64"):
        small_model()(torch.randn(1, 3, 64, 64))


def test_unknown_variant_lists_the_choices():
    with pytest.raises(ValueError, match="swinv2_tiny_window8_256"):
        create_model("swinv2_huge")


def test_weight_decay_groups_follow_the_official_no_decay_rule():
    model = small_model(ape=True)
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decayed | skipped == set(names.values()) and not decayed & skipped
    assert all(n.endswith(".weight") and "norm" not in n and "cpb_mlp" not in n for n in decayed)
    for name in ("absolute_pos_embed", "layers.0.blocks.0.attn.logit_scale", "layers.0.blocks.0.attn.cpb_mlp.0.weight",
                 "layers.0.blocks.0.attn.cpb_mlp.2.weight", "layers.0.blocks.0.attn.q_bias", "head.bias",
                 "layers.0.blocks.0.norm1.weight", "patch_embed.proj.bias"):
        assert name in skipped
    for name in ("layers.0.blocks.0.attn.qkv.weight", "layers.0.blocks.0.mlp.fc1.weight", "head.weight",
                 "layers.0.downsample.reduction.weight", "patch_embed.proj.weight"):
        assert name in decayed
    torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)  # the groups are valid optimiser input


def test_drop_path_follows_a_linear_schedule_and_only_acts_in_training():
    model = small_model(drop_path_rate=0.5, drop_rate=0.1)
    rates = [block.drop_path for layer in model.layers for block in layer.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.5, 6).tolist())
    for block in (b for layer in model.layers for b in layer.blocks):
        nn.init.ones_(block.norm1.weight)  # make the residual branches matter
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.equal(model(images), model(images))


def test_every_parameter_receives_a_gradient():
    model = small_model(ape=True)
    for block in (b for layer in model.layers for b in layer.blocks):
        nn.init.ones_(block.norm1.weight)
        nn.init.ones_(block.norm2.weight)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert silent == []
