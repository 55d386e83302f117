"""Swin Transformer V2 in Flax NNX (NHWC input), mirroring lightning_swin/model.py class for class and name for name."""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shared_data.swin import LAYER_NORM_EPS, MAX_LOGIT_SCALE, SHIFT_MASK_VALUE, is_no_decay
from shared_data.variants import check_config, effective_window, stage_resolutions, variant_config

# F.normalize divides by max(norm, eps); the same eps keeps both stacks bitwise-close near zero vectors.
NORMALIZE_EPS = 1e-12

# torch's trunc_normal_(std=0.02) cuts at +-2 in absolute units, i.e. +-100 standard deviations.
_TRUNC_NORMAL_002 = nnx.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


# ---------------------------------------------------------------------------------------------
# Window helpers and the buffers derived from the configuration (numpy, cached, never parameters)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """[B, H, W, C] -> [B * num_windows, window * window, C], windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
    """Inverse of window_partition: [B * num_windows, window * window, C] -> [B, H, W, C]."""
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


@functools.lru_cache(maxsize=None)
def relative_coords_table(window: int, pretrained_window: int = 0, dtype: Any = np.float32) -> np.ndarray:
    """Log-spaced relative (dy, dx) of every offset in a window: [(2w-1)^2, 2] in `dtype` (float32 as the official
    code; float64 for a float64 model), the cpb_mlp input."""
    offsets = np.arange(-(window - 1), window, dtype=dtype)
    table = np.stack(np.meshgrid(offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 2)
    span = (pretrained_window if pretrained_window > 0 else window) - 1
    # A 1x1 window has only the zero offset; dividing by 1 keeps it 0 where the official code gives 0/0.
    table = table / dtype(max(span, 1)) * dtype(8.0)
    table = (np.sign(table) * np.log2(np.abs(table) + dtype(1.0)) / dtype(math.log2(8.0))).astype(dtype)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
    """Row of relative_coords_table for each (query, key) pair in a window: [w*w * w*w] int32, flattened."""
    rows, cols = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    coords = np.stack([rows.reshape(-1), cols.reshape(-1)])
    relative = (coords[:, :, None] - coords[:, None, :]) + (window - 1)
    index = (relative[0] * (2 * window - 1) + relative[1]).reshape(-1).astype(np.int32)
    index.setflags(write=False)
    return index


@functools.lru_cache(maxsize=None)
def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """Additive mask [num_windows, w*w, w*w] float32 keeping attention inside the 9 regions of a cyclic shift."""
    region = np.zeros((1, resolution, resolution, 1), dtype=np.float32)
    bounds = ((0, -window), (-window, -shift), (-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            region[:, rows[0] : rows[1], cols[0] : cols[1], :] = label
            label += 1
    labels = np.asarray(window_partition(region, window))[..., 0]
    different = labels[:, None, :] != labels[:, :, None]
    mask = np.where(different, np.float32(SHIFT_MASK_VALUE), np.float32(0.0)).astype(np.float32)
    mask.setflags(write=False)
    return mask


# ---------------------------------------------------------------------------------------------
# Layers


def _at_least_float32(dtype: Any) -> Any:
    """The dtype of parameters and of every upcast: float32 for bf16 (or float32), float64 for float64, never down."""
    return jnp.promote_types(dtype, jnp.float32)


def _linear(
    in_features: int, out_features: int, *, use_bias: bool = True, dtype: Any, rngs: nnx.Rngs
) -> nnx.Linear:
    """A Linear computing in `dtype` with the official init (truncated normal 0.02, zero bias) and parameters in
    at least float32."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, kernel_init=_TRUNC_NORMAL_002,
        bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=_at_least_float32(dtype), rngs=rngs,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """(x - mean) * rsqrt(var + epsilon) * scale + bias over the last axis of x [..., C], computed and returned in
    at least float32 (a bf16 x gives float32, as bf16 training is defined in shared_data.tags), with the two-pass
    variance, as torch.

    Its backward saves what torch's does (x, mean, 1/std), not every intermediate: at the origin's setting
    (tiny, 256 px, batch 32) autodiff of the same arithmetic kept about 1.6 GB more for the backward pass.
    """
    return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    compute = _at_least_float32(x.dtype)
    wide = x.astype(compute)
    mean = wide.mean(-1, keepdims=True)
    centred = wide - mean
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + epsilon)
    # torch's order, (x - mean) * rstd * scale: nnx's rstd * scale first made XLA write that [..., C] product out.
    y = (centred * rstd) * scale.astype(compute) + bias.astype(compute)
    return y, (x, mean, rstd, scale, bias)


def _layer_norm_backward(epsilon: float, saved: tuple, grad: jax.Array):
    x, mean, rstd, scale, bias = saved
    compute = mean.dtype
    normalized = (x.astype(compute) - mean) * rstd
    grad = grad.astype(compute)
    batch_axes = tuple(range(grad.ndim - 1))
    grad_normalized = grad * scale.astype(compute)
    # d/dx of (x - mean) / std: the gradient less its mean and its projection on the normalized input, over std.
    grad_x = rstd * (grad_normalized - grad_normalized.mean(-1, keepdims=True)
                     - normalized * (grad_normalized * normalized).mean(-1, keepdims=True))
    return (grad_x.astype(x.dtype), (grad * normalized).sum(batch_axes).astype(scale.dtype),
            grad.sum(batch_axes).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm (its parameters, their names) computed by layer_norm, under the named scope "norm", which tells
    its operations apart in profiles (shared_data.op_profile). Normalizes the last axis, with scale and bias; its
    statistics and output are in at least float32 whatever the input (what PyTorch's autocast does on a GPU)."""

    def __call__(self, x: jax.Array, **kwargs: Any) -> jax.Array:
        with jax.named_scope("norm"):
            return layer_norm(x, self.scale[...], self.bias[...], self.epsilon)


def _layer_norm(features: int, *, dtype: Any, rngs: nnx.Rngs, zero: bool = False) -> LayerNorm:
    """torch-equivalent LayerNorm: eps 1e-5 and the two-pass variance (the fast one loses float32 digits), in at least
    float32 for a model of `dtype`."""
    init = nnx.initializers.zeros_init() if zero else nnx.initializers.ones_init()
    return LayerNorm(
        features, epsilon=LAYER_NORM_EPS, use_fast_variance=False, scale_init=init,
        dtype=_at_least_float32(dtype), param_dtype=_at_least_float32(dtype), rngs=rngs,
    )


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) (jax.nn.gelu(approximate=False)), with torch's backward: autodiff of it keeps three
    tensors of the MLP's widest shape for the backward pass, where torch keeps x alone and recomputes (1.8 GB more
    at tiny, 256 px, batch 32). Computed in at least float32 and returned in x's dtype, as torch's kernels do."""
    return jax.nn.gelu(x.astype(_at_least_float32(x.dtype)), approximate=False).astype(x.dtype)


def _gelu_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gelu(x), x


def _gelu_backward(x: jax.Array, grad: jax.Array) -> tuple[jax.Array]:
    # d/dx = Phi(x) + x * phi(x), phi the standard normal density (torch's gelu_backward).
    compute = _at_least_float32(x.dtype)
    wide = x.astype(compute)
    cdf = 0.5 * (1.0 + jax.lax.erf(wide * _SQRT_HALF))
    pdf = jnp.exp(-0.5 * wide * wide) * _INV_SQRT_2PI
    return ((grad.astype(compute) * (cdf + wide * pdf)).astype(grad.dtype),)


gelu.defvjp(_gelu_forward, _gelu_backward)


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
    """jax.nn.softmax over the last axis, whose backward keeps only the output, as torch's does; autodiff of
    jax.nn.softmax also keeps the exponentials, one more [windows, heads, N, N] tensor per block."""
    return jax.nn.softmax(x, axis=-1)


def _softmax_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    y = softmax(x)
    return y, y


def _softmax_backward(y: jax.Array, grad: jax.Array) -> tuple[jax.Array]:
    return (y * (grad - (grad * y).sum(-1, keepdims=True)),)


softmax.defvjp(_softmax_forward, _softmax_backward)


def _normalize(x: jax.Array) -> jax.Array:
    """F.normalize(x, dim=-1): x / max(||x||, 1e-12)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, NORMALIZE_EPS)


class DropPath(nnx.Module):
    """Stochastic depth per sample ("row" mode): zero whole residual branches, rescale the survivors."""

    def __init__(self, rate: float, *, rngs: nnx.RngStream, deterministic: bool = False) -> None:
        self.rate = rate
        self.deterministic = deterministic
        self.rngs = rngs

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        survival = 1.0 - self.rate
        keep = jax.random.bernoulli(self.rngs(), survival, (x.shape[0],) + (1,) * (x.ndim - 1))
        # x times a per-sample 0 or 1/survival, as torch: the backward keeps that [B, 1, ...] factor, not a copy of x.
        return x * (keep.astype(x.dtype) / survival) if survival > 0 else jnp.zeros_like(x)


class Dropout(nnx.Dropout):
    """nnx.Dropout drawing its keys from the model's one shared `dropout` stream (so one reseed covers all)."""

    def __init__(self, rate: float, *, rngs: nnx.RngStream, deterministic: bool = False) -> None:
        super().__init__(rate, deterministic=deterministic)
        self.stream = rngs

    def __call__(self, inputs: jax.Array, **kwargs: Any) -> jax.Array:
        return super().__call__(inputs, rngs=self.stream, **kwargs)


class WindowAttention(nnx.Module):
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
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.dim = dim
        self.window_size = window_size
        self.pretrained_window_size = pretrained_window_size
        self.num_heads = num_heads
        self.dtype = dtype
        wide = _at_least_float32(dtype)  # the parameters', the position bias's and the attention logits' dtype
        self.logit_scale = nnx.Param(jnp.full((num_heads, 1, 1), math.log(10.0), dtype=wide))
        self.cpb_mlp = nnx.Sequential(
            _linear(2, 512, dtype=wide, rngs=rngs),
            nnx.relu,
            _linear(512, num_heads, use_bias=False, dtype=wide, rngs=rngs),
        )
        self.qkv = _linear(dim, dim * 3, use_bias=False, dtype=dtype, rngs=rngs)
        # Official V2 learns q and v biases only; the key bias is fixed at zero.
        self.q_bias = nnx.Param(jnp.zeros((dim,), wide)) if qkv_bias else None
        self.v_bias = nnx.Param(jnp.zeros((dim,), wide)) if qkv_bias else None
        self.attn_drop = Dropout(attn_drop, rngs=rngs["dropout"])
        self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
        self.proj_drop = Dropout(proj_drop, rngs=rngs["dropout"])

    @property
    def relative_coords_table(self) -> np.ndarray:
        wide = np.dtype(_at_least_float32(self.dtype)).type  # float64 for a float64 model
        return relative_coords_table(self.window_size, self.pretrained_window_size, wide)

    @property
    def relative_position_index(self) -> np.ndarray:
        return relative_position_index(self.window_size)

    def position_bias(self) -> jax.Array:
        """[heads, w*w, w*w] bias in at least float32: 16 * sigmoid(cpb_mlp(table)) gathered for every (query, key)
        pair."""
        tokens = self.window_size**2
        table = 16.0 * jax.nn.sigmoid(self.cpb_mlp(jnp.asarray(self.relative_coords_table)))
        bias = table[self.relative_position_index].reshape(tokens, tokens, self.num_heads)
        return bias.transpose(2, 0, 1)

    def __call__(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
        """x: [B*nW, N, C]; mask: [nW, N, N] additive or None. Returns [B*nW, N, C]."""
        with jax.named_scope("attention"):  # names its operations in profiles (shared_data.op_profile)
            return self._attend(x, mask)

    def _attend(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        windows, tokens, channels = x.shape
        qkv = self.qkv(x)
        if self.q_bias is not None:
            zeros = jnp.zeros_like(self.q_bias[...])
            qkv = qkv + jnp.concatenate([self.q_bias[...], zeros, self.v_bias[...]]).astype(qkv.dtype)
        qkv = qkv.reshape(windows, tokens, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # In float32 even for bf16 activations (in float64 for a float64 model): cosine logits times the
        # temperature, plus the position bias, softmax. The logits reach 100 and the bias 16, where bf16 keeps only 2
        # to 3 digits. The temperature scales the unit queries, not the logits as the official code does (the same
        # up to rounding): XLA's CPU backend copied the per-head factor out to the logits' full
        # [windows, heads, N, N] shape to multiply it.
        logits_dtype = _at_least_float32(q.dtype)
        temperature = jnp.exp(jnp.minimum(self.logit_scale[...], MAX_LOGIT_SCALE))
        queries = _normalize(q.astype(logits_dtype)) * temperature
        attn = queries @ _normalize(k.astype(logits_dtype)).swapaxes(-2, -1)
        additive = self.position_bias()
        if mask is not None:
            # One [nW, heads, N, N] term broadcast over the batch, instead of two separate adds.
            additive = additive[None] + jnp.asarray(mask)[:, None]
            attn = attn.reshape(-1, mask.shape[0], self.num_heads, tokens, tokens)
        attn = softmax((attn + additive).reshape(windows, self.num_heads, tokens, tokens))
        attn = self.attn_drop(attn).astype(v.dtype)
        x = (attn @ v).transpose(0, 2, 1, 3).reshape(windows, tokens, channels)
        return self.proj_drop(self.proj(x))


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, *, dtype: Any = jnp.float32, rngs: nnx.Rngs) -> None:
        self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)
        self.drop = Dropout(drop, rngs=rngs["dropout"])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.fc1(x)
        with jax.named_scope("activation"):  # names its operations in profiles (shared_data.op_profile)
            x = gelu(x)
        return self.drop(self.fc2(self.drop(x)))


class SwinTransformerBlock(nnx.Module):
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
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.dim = dim
        self.input_resolution = input_resolution
        self.window_size, can_shift = effective_window(input_resolution, window_size)
        self.shift_size = self.window_size // 2 if shift and can_shift else 0
        self.attn = WindowAttention(
            dim, self.window_size, num_heads, qkv_bias, attn_drop, drop, pretrained_window_size,
            dtype=dtype, rngs=rngs,
        )
        # Residual post-norms start at zero so every block starts as the identity (official init).
        self.norm1 = _layer_norm(dim, dtype=dtype, rngs=rngs, zero=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, dtype=dtype, rngs=rngs)
        self.norm2 = _layer_norm(dim, dtype=dtype, rngs=rngs, zero=True)
        self.drop_path = DropPath(drop_path, rngs=rngs["dropout"])

    @property
    def attn_mask(self) -> np.ndarray | None:
        if not self.shift_size:
            return None
        return shifted_window_mask(self.input_resolution, self.window_size, self.shift_size)

    def _attention(self, x: jax.Array) -> jax.Array:
        side, window, shift = self.input_resolution, self.window_size, self.shift_size
        x = x.reshape(-1, side, side, self.dim)
        if shift:
            x = jnp.roll(x, shift=(-shift, -shift), axis=(1, 2))
        x = window_reverse(self.attn(window_partition(x, window), self.attn_mask), window, side, side)
        if shift:
            x = jnp.roll(x, shift=(shift, shift), axis=(1, 2))
        return x.reshape(-1, side * side, self.dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path(self.norm1(self._attention(x)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class PatchMerging(nnx.Module):
    """V2 patch merging: concatenate each 2x2 neighbourhood (4C), reduce to 2C, then normalise."""

    def __init__(self, input_resolution: int, dim: int, *, dtype: Any = jnp.float32, rngs: nnx.Rngs) -> None:
        self.input_resolution = input_resolution
        self.dim = dim
        self.reduction = _linear(4 * dim, 2 * dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm = _layer_norm(2 * dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H*W, C] -> [B, H*W/4, 2C]; channel order (row, col) offsets (0,0), (1,0), (0,1), (1,1)."""
        side = self.input_resolution
        x = x.reshape(-1, side // 2, 2, side // 2, 2, self.dim)
        x = x.transpose(0, 1, 3, 4, 2, 5).reshape(-1, (side // 2) ** 2, 4 * self.dim)
        return self.norm(self.reduction(x))


class BasicLayer(nnx.Module):
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
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nnx.List(
            [
                SwinTransformerBlock(
                    dim, input_resolution, num_heads, window_size, shift=index % 2 == 1, mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=drop_path[index],
                    pretrained_window_size=pretrained_window_size, dtype=dtype, rngs=rngs,
                )
                for index in range(depth)
            ]
        )
        self.downsample = PatchMerging(input_resolution, dim, dtype=dtype, rngs=rngs) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nnx.Module):
    """Non-overlapping patch x patch convolution to embed_dim, then optional LayerNorm: NHWC -> [B, L, C]."""

    def __init__(
        self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm: bool = True,
        *, dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ) -> None:
        # torch's default Conv2d init: weight and bias uniform in +-1/sqrt(fan_in).
        bound = 1.0 / math.sqrt(in_chans * patch_size * patch_size)
        self.proj = nnx.Conv(
            in_chans, embed_dim, kernel_size=(patch_size, patch_size), strides=(patch_size, patch_size),
            padding="VALID", kernel_init=nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound),
            dtype=dtype, param_dtype=_at_least_float32(dtype), rngs=rngs,
        )
        self.norm = _layer_norm(embed_dim, dtype=dtype, rngs=rngs) if norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.norm is not None:
            return self.norm(x)
        # The residual stream starts here: float32 for bf16 activations too (shared_data.tags).
        return x.astype(_at_least_float32(x.dtype))


class SwinTransformerV2(nnx.Module):
    """Swin Transformer V2 classifier; input NHWC float [B, img_size, img_size, in_chans], output logits in at least
    float32.

    `dtype` is what matmuls and convolutions compute in; the parameters and everything else are in at least float32.
    `jnp.bfloat16` is bf16 training as shared_data.tags defines it (PyTorch's autocast, as on a GPU);
    `jnp.float64` (under jax_enable_x64) is float64 throughout, parameters included.

    Built in training mode like a torch module: call `.eval()` for deterministic inference. Dropout and drop
    path draw keys from the `dropout` stream of `rngs`, shared by every layer, so `nnx.reseed(model,
    dropout=key)` re-seeds all of them at once.
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
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        check_config(
            img_size=img_size, embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
            window_size=window_size, pretrained_window_sizes=tuple(pretrained_window_sizes), patch_size=patch_size,
        )
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        self.dtype = dtype
        resolutions = stage_resolutions(img_size, patch_size, self.num_layers)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm, dtype=dtype, rngs=rngs)
        if ape:
            shape = (1, resolutions[0] ** 2, embed_dim)
            self.absolute_pos_embed = nnx.Param(_TRUNC_NORMAL_002(rngs.params(), shape, _at_least_float32(dtype)))
        else:
            self.absolute_pos_embed = None
        self.pos_drop = Dropout(drop_rate, rngs=rngs["dropout"])

        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        rates = np.linspace(0, drop_path_rate, sum(depths), dtype=np.float32).tolist()
        starts = [sum(depths[:i]) for i in range(self.num_layers)]
        self.layers = nnx.List(
            [
                BasicLayer(
                    dim=embed_dim * 2**i, input_resolution=resolutions[i], depth=depths[i], num_heads=num_heads[i],
                    window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                    attn_drop=attn_drop_rate, drop_path=rates[starts[i] : starts[i] + depths[i]],
                    downsample=i < self.num_layers - 1, pretrained_window_size=pretrained_window_sizes[i],
                    dtype=dtype, rngs=rngs,
                )
                for i in range(self.num_layers)
            ]
        )
        self.norm = _layer_norm(self.num_features, dtype=dtype, rngs=rngs)
        self.head = _linear(self.num_features, num_classes, dtype=dtype, rngs=rngs) if num_classes > 0 else None

    def forward_features(self, x: jax.Array) -> jax.Array:
        """NHWC images -> pooled features [B, num_features] (after the final norm, before the head)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.img_size, self.img_size, self.in_chans):
            raise ValueError(
                f"SwinTransformerV2 expects NHWC input [B, {self.img_size}, {self.img_size}, {self.in_chans}], "
                f"got {list(x.shape)}; build the model with img_size={x.shape[1]} or resize the images"
            )
        x = self.patch_embed(x.astype(self.dtype))
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed[...].astype(x.dtype)
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).mean(axis=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        features = self.forward_features(x)
        logits = features if self.head is None else self.head(features)
        return logits.astype(_at_least_float32(logits.dtype))


def create_model(name: str, num_classes: int = 1000, rngs: nnx.Rngs | None = None, **overrides: Any) -> SwinTransformerV2:
    """Build a named variant (see shared_data.variants.VARIANTS); overrides of None are ignored.

    `dtype` may be given among the overrides; `rngs` defaults to nnx.Rngs(params=0, dropout=0).
    """
    dtype = overrides.pop("dtype", None) or jnp.float32
    rngs = rngs if rngs is not None else nnx.Rngs(params=0, dropout=0)
    return SwinTransformerV2(num_classes=num_classes, dtype=dtype, rngs=rngs, **variant_config(name, **overrides))


def decay_mask(params: Any) -> Any:
    """Same-structure bool pytree: True where weight decay applies (see is_no_decay), for optax masks.

    `params` is `nnx.state(model, nnx.Param)` or any pytree keyed by the Flax attribute names.
    """
    def decays(path: tuple[Any, ...], leaf: Any) -> bool:
        return not is_no_decay(jax.tree_util.keystr(path, simple=True, separator="."), np.ndim(leaf))

    return jax.tree_util.tree_map_with_path(decays, params)
