"""Swin Transformer V2 as a plain torch.nn.Module, with the official Microsoft parameter names."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from shared_data.swin import LAYER_NORM_EPS, MAX_LOGIT_SCALE, SHIFT_MASK_VALUE, is_no_decay
from shared_data.variants import check_config, effective_window, stage_resolutions, variant_config



def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * num_windows, window * window, C], windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of window_partition: [B * num_windows, window * window, C] -> [B, H, W, C]."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def relative_coords_table(window: int, pretrained_window: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log-spaced relative (dy, dx) of every offset in a window: [(2w-1)^2, 2] in `dtype` (float32 as the official
    code), the cpb_mlp input."""
    offsets = torch.arange(-(window - 1), window, dtype=dtype)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).reshape(-1, 2)
    span = (pretrained_window if pretrained_window > 0 else window) - 1
    # A 1x1 window has only the zero offset; dividing by 1 keeps it 0 where the official code gives 0/0.
    table = table / max(span, 1) * 8.0
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8.0)


def relative_position_index(window: int) -> torch.Tensor:
    """Row of relative_coords_table for each (query, key) pair in a window: [w*w, w*w] int64."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]) + (window - 1)
    return relative[0] * (2 * window - 1) + relative[1]


def window_token_order(resolution: int, window: int, shift: int) -> torch.Tensor:
    """Token indices that cyclically shift a [H*W] grid by -shift and lay it out window by window."""
    grid = torch.arange(resolution * resolution).view(1, resolution, resolution, 1)
    if shift:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(grid, window).flatten()


def shifted_window_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask [num_windows, w*w, w*w] keeping attention inside the 9 regions of a cyclic shift."""
    region = torch.zeros(1, resolution, resolution, 1)
    bounds = ((0, -window), (-window, -shift), (-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            region[:, rows[0] : rows[1], cols[0] : cols[1], :] = label
            label += 1
    labels = window_partition(region, window).squeeze(-1)
    different = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, SHIFT_MASK_VALUE)


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off on `device_type`, where it exists (not on the meta device, for one)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The dtype every upcast goes to, torch.promote_types(dtype, float32): float32 for bf16 (or float32), float64
    for float64, never down. Worked out in Python: promote_types is a dispatched op, one more per call in eager."""
    return dtype if dtype.is_floating_point and dtype.itemsize >= 4 else torch.float32


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (its parameters, their names) whose statistics and output are float32 under autocast on every
    device, as bf16 training is defined in shared_data.tags: CUDA autocast computes layer_norm so, but CPU autocast
    keeps a bf16 input in bf16. Without autocast it is nn.LayerNorm itself, in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with _without_autocast(x.device.type):
            return F.layer_norm(x.to(_at_least_float32(x.dtype)), self.normalized_shape, self.weight, self.bias,
                                self.eps)


def add_residual(x: torch.Tensor, branch: torch.Tensor, drop_path: float, training: bool) -> torch.Tensor:
    """x + drop_path(branch): in training each sample's branch is dropped with probability drop_path, else rescaled."""
    # One fused addcmul instead of a separate multiply and add, forward and backward.
    if not training or drop_path == 0.0:
        return x + branch
    keep = 1.0 - drop_path
    sample_scale = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
    return torch.addcmul(x, branch, sample_scale)


class WindowAttention(nn.Module):
    """Scaled cosine multi-head attention inside [B*nW, w*w, C] windows with a continuous position bias."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.pretrained_window_size = pretrained_window_size
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        # Official V2 learns q and v biases only; the key bias is fixed at zero.
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer(
            "relative_coords_table", relative_coords_table(window_size, pretrained_window_size), persistent=False
        )
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size).flatten(), persistent=False
        )

    def position_bias(self) -> torch.Tensor:
        """[heads, w*w, w*w] bias: 16 * sigmoid(cpb_mlp(table)) gathered for every (query, key) pair."""
        tokens = self.window_size**2
        table = 16.0 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table))
        return table[self.relative_position_index].view(tokens, tokens, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B*nW, N, C]; mask: [nW, N, N] additive or None. Returns [B*nW, N, C]."""
        windows, tokens, channels = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.view(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        # The official order, in float32 even under bf16 autocast (in float64 for a float64 model): cosine logits,
        # times the temperature, plus the position bias, softmax. The logits reach 100 and the bias 16, where bf16
        # keeps only 2 to 3 digits.
        logits_dtype = _at_least_float32(q.dtype)
        with _without_autocast(x.device.type):
            attn = F.normalize(q.to(logits_dtype), dim=-1) @ F.normalize(k.to(logits_dtype), dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()
            additive = self.position_bias()
            # In place into the scaled logits, a float32 temporary that backward does not need.
            if mask is not None:
                # One [nW, heads, N, N] term broadcast over the batch, instead of two separate adds.
                additive = additive.unsqueeze(0) + mask.unsqueeze(1)
                attn.view(-1, mask.shape[0], self.num_heads, tokens, tokens).add_(additive)
            else:
                attn.add_(additive)
            attn = attn.softmax(dim=-1)
        attn = F.dropout(attn, self.attn_drop, self.training)
        x = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinTransformerBlock(nn.Module):
    """(Shifted) window attention then MLP on [B, H*W, C] tokens, each with a residual post-norm."""

    def __init__(
        self,
        dim: int,
        input_resolution: int,
        num_heads: int,
        window_size: int = 8,
        shift: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        pretrained_window_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.window_size, can_shift = effective_window(input_resolution, window_size)
        self.shift_size = self.window_size // 2 if shift and can_shift else 0
        self.drop_path = drop_path
        self.attn = WindowAttention(
            dim, self.window_size, num_heads, qkv_bias, attn_drop, drop, pretrained_window_size
        )
        self.norm1 = LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = LayerNorm(dim, eps=LAYER_NORM_EPS)
        mask = shifted_window_mask(input_resolution, self.window_size, self.shift_size) if self.shift_size else None
        self.register_buffer("attn_mask", mask, persistent=False)
        # Shift and window partition as one gather (and its inverse), cheaper than roll + permute copies
        # forward and backward; a single unshifted window covering the stage needs no reordering at all.
        self.reorders = self.window_size < input_resolution or self.shift_size > 0
        order = window_token_order(input_resolution, self.window_size, self.shift_size)
        self.register_buffer("token_order", order, persistent=False)
        self.register_buffer("token_restore", torch.argsort(order), persistent=False)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reorders:
            return self.attn(x, self.attn_mask)
        batch, tokens, channels = x.shape
        windows = torch.index_select(x, 1, self.token_order).view(-1, self.window_size**2, channels)
        x = self.attn(windows, self.attn_mask).view(batch, tokens, channels)
        return torch.index_select(x, 1, self.token_restore)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = add_residual(x, self.norm1(self._attention(x)), self.drop_path, self.training)
        return add_residual(x, self.norm2(self.mlp(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """V2 patch merging: concatenate each 2x2 neighbourhood (4C), reduce to 2C, then normalise."""

    def __init__(self, input_resolution: int, dim: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = LayerNorm(2 * dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H*W, C] -> [B, H*W/4, 2C]; channel order (row, col) offsets (0,0), (1,0), (0,1), (1,1)."""
        side = self.input_resolution
        x = x.view(-1, side // 2, 2, side // 2, 2, self.dim)
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(-1, (side // 2) ** 2, 4 * self.dim)
        return self.norm(self.reduction(x))


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating plain and shifted windows, then an optional PatchMerging."""

    def __init__(
        self,
        dim: int,
        input_resolution: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Iterable[float] = (),
        downsample: bool = False,
        pretrained_window_size: int = 0,
    ) -> None:
        super().__init__()
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, input_resolution, num_heads, window_size, shift=index % 2 == 1, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=drop_path[index],
                pretrained_window_size=pretrained_window_size,
            )
            for index in range(depth)
        )
        self.downsample = PatchMerging(input_resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)

    def init_post_norms(self) -> None:
        """Zero the residual post-norms so every block starts as the identity (official init)."""
        for block in self.blocks:
            for norm in (block.norm1, block.norm2):
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution to embed_dim, then optional LayerNorm: NCHW -> [B, L, C]."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm(embed_dim, eps=LAYER_NORM_EPS) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.norm is not None:
            return self.norm(x)
        # The residual stream starts here: float32 under bf16 autocast too (shared_data.tags).
        return x.to(_at_least_float32(x.dtype))


class SwinTransformerV2(nn.Module):
    """Swin Transformer V2 classifier; input NCHW float [B, in_chans, img_size, img_size], output logits.

    In the dtype of its parameters (`.double()` gives float64 throughout), or under bf16 autocast as shared_data.tags
    defines bf16 training, on a CPU as on a GPU; the logits are then the head's bf16, which the loss upcasts.
    """

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        patch_norm: bool = True,
        pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0),
    ) -> None:
        super().__init__()
        check_config(
            img_size=img_size, embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
            window_size=window_size, pretrained_window_sizes=tuple(pretrained_window_sizes), patch_size=patch_size,
        )
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        resolutions = stage_resolutions(img_size, patch_size, self.num_layers)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, resolutions[0] ** 2, embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)

        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(self.num_layers)]
        self.layers = nn.ModuleList(
            BasicLayer(
                dim=embed_dim * 2**i, input_resolution=resolutions[i], depth=depths[i], num_heads=num_heads[i],
                window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=rates[starts[i] : starts[i] + depths[i]],
                downsample=i < self.num_layers - 1, pretrained_window_size=pretrained_window_sizes[i],
            )
            for i in range(self.num_layers)
        )
        self.norm = LayerNorm(self.num_features, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(_init_linear_and_norm)
        for layer in self.layers:
            layer.init_post_norms()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW images -> pooled features [B, num_features] (after the final norm, before the head)."""
        if x.ndim != 4 or x.shape[1:] != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(
                f"SwinTransformerV2 expects NCHW input [B, {self.in_chans}, {self.img_size}, {self.img_size}], "
                f"got {list(x.shape)}; build the model with img_size={x.shape[-1]} or resize the images"
            )
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _init_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> SwinTransformerV2:
    """Build a named variant (see shared_data.variants.VARIANTS); overrides of None are ignored."""
    return SwinTransformerV2(num_classes=num_classes, **variant_config(name, **overrides))



def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimiser groups: decayed parameters with `weight_decay`, and the official no-decay set with 0."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_no_decay(name, param.ndim) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
