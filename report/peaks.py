"""Peak FLOP/s of a device: datasheet table for GPUs, measured matmul rate on a CPU."""

from __future__ import annotations

import functools
import re
import time
from typing import Callable

import numpy as np

from shared_data.environment import cpu_description

# Dense peak TFLOP/s per precision (vendor datasheets; fp32 is the non-tensor-core rate, so a run that
# lets the library use TF32 can show an MFU above what fp32 allows). Most specific patterns first.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float | None]], ...] = (
    (r"h100.*pcie", {"bf16": 756.0, "fp32": 51.2}),
    (r"h100.*nvl", {"bf16": 835.0, "fp32": 60.0}),
    (r"h100|h800", {"bf16": 989.4, "fp32": 66.9}),
    (r"h200", {"bf16": 989.4, "fp32": 66.9}),  # GH200 too
    (r"a100|a800", {"bf16": 312.0, "fp32": 19.5}),
    (r"a10g", {"bf16": 70.0, "fp32": 31.2}),
    (r"\ba10\b", {"bf16": 125.0, "fp32": 31.2}),
    (r"l40s", {"bf16": 362.1, "fp32": 91.6}),
    (r"\bl4\b", {"bf16": 121.0, "fp32": 30.3}),
    (r"rtx a6000|a6000", {"bf16": 154.8, "fp32": 38.7}),
    (r"4090", {"bf16": 165.2, "fp32": 82.6}),
    (r"3090", {"bf16": 71.0, "fp32": 35.6}),
    (r"v100", {"bf16": None, "fp32": 15.7}),  # no bf16 units: an MFU would be meaningless
    (r"\bt4\b", {"bf16": None, "fp32": 8.1}),
)


# Square matrix sides the matmul rate is measured at; the peak is the best of them.
CPU_MATMUL_SIZES = (512, 1024, 2048)
GPU_MATMUL_SIZES = (2048, 4096, 8192)


def _torch_matmul(size: int, platform: str, dtype: str) -> Callable[[], object]:
    import torch

    device = "cuda" if platform == "gpu" else "cpu"
    a, b = torch.randn((2, size, size), dtype=getattr(torch, dtype), device=device)
    if device == "cuda":
        return lambda: (a @ b, torch.cuda.synchronize())
    return lambda: a @ b


def _jax_matmul(size: int, platform: str, dtype: str) -> Callable[[], object]:
    import jax
    import jax.numpy as jnp

    device = jax.devices(platform)[0]  # the CPU even where JAX would default to a GPU
    a, b = (jax.device_put(m, device).astype(dtype)
            for m in np.random.default_rng(0).standard_normal((2, size, size), dtype=np.float32))
    # Full float32 precision, as the datasheet's fp32 figure means (a GPU would otherwise use TF32 for float32).
    precision = jax.lax.Precision.HIGHEST if dtype == "float32" else None
    matmul = jax.jit(functools.partial(jnp.matmul, precision=precision))
    return lambda: matmul(a, b).block_until_ready()


_MATMULS = {"torch": _torch_matmul, "jax": _jax_matmul}


def best_matmul_rate(framework: str, platform: str, dtype: str, sizes: tuple[int, ...], seconds: float) -> float:
    """Best rate in FLOP/s of `framework`'s size x size matmuls on `platform`, each size timed for `seconds`."""
    best = 0.0
    for size in sizes:
        matmul = _MATMULS[framework](size, platform, dtype)
        matmul()  # the first call pays for thread start-up and compilation
        deadline = time.perf_counter() + seconds
        for _ in range(1000):
            start = time.perf_counter()
            matmul()
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
            if time.perf_counter() > deadline:
                break
    return best


@functools.cache  # measured once per process: every CPU row of a report shares the figure
def measure_cpu_matmul_peak(framework: str, sizes: tuple[int, ...] = CPU_MATMUL_SIZES, seconds: float = 0.5) -> float:
    """Best float32 matmul rate `framework` ('torch' or 'jax') reaches on this CPU, in FLOP/s: each stack's own peak,
    since a numpy (or the other framework's) matmul can be slower than the kernels the stack really runs."""
    return best_matmul_rate(framework, "cpu", "float32", sizes, seconds)


@functools.cache
def measure_gpu_matmul_rate(device: str, precision: str) -> tuple[float, str] | None:
    """(matmul FLOP/s, framework) of the GPU `device` names, measured here with torch, else JAX; None when this
    process sees no such GPU."""
    dtype = "bfloat16" if precision == "bf16" else "float32"
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.get_device_name(0) in device:
            return best_matmul_rate("torch", "gpu", dtype, GPU_MATMUL_SIZES, 0.5), "torch"
    except ImportError:
        pass
    try:
        import jax

        if any(gpu.device_kind in device for gpu in jax.devices("gpu")):
            return best_matmul_rate("jax", "gpu", dtype, GPU_MATMUL_SIZES, 0.5), "jax"
    except (ImportError, RuntimeError):  # RuntimeError: no GPU backend in this JAX
        pass
    return None


def device_peak_flops(device: str, precision: str, cpu_peak: float | None = None,
                      framework: str = "torch") -> tuple[float, str] | None:
    """(peak FLOP/s, where it comes from) for a device string, or None when unknown; `cpu_peak` in FLOP/s.

    On a CPU the peak is `framework`'s own float32 matmul rate measured here; on a GPU, the datasheet figure, with the
    matmul rate measured on the device beside it when this process can see that GPU.
    """
    name = device.lower()
    if name.startswith("cpu"):
        if cpu_peak is not None:
            return cpu_peak, "given CPU peak"
        if device != cpu_description():
            return None  # a peak measured here says nothing about another machine's CPU
        sizes = ", ".join(map(str, CPU_MATMUL_SIZES))
        peak = measure_cpu_matmul_peak(framework)
        return peak, (f"{framework} float32 matmul peak measured on this CPU: {peak / 1e9:.1f} GFLOP/s "
                      f"(best of sizes {sizes})")
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, name):
            peak = peaks.get(precision)
            if not peak:
                return None
            measured = measure_gpu_matmul_rate(device, precision)
            beside = (f"measured {measured[1]} {precision} matmul on this GPU: {measured[0] / 1e12:.1f} TFLOP/s"
                      if measured else "matmul rate not measured (this GPU is not visible to the report's process)")
            return peak * 1e12, f"datasheet dense {precision} {peak:g} TFLOP/s, pattern {pattern!r}; {beside}"
    return None
