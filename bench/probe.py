"""The machine before a GPU benchmark: imports, GPU and driver, library versions, matmul rates, what float32 means."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from report import peaks
from shared_data.environment import RECORDED_LIBRARIES, library_versions

# Every module a run of either stack, compare.py or this probe imports; a missing one stops the benchmark here.
IMPORTS = ("torch", "torchvision", "pytorch_lightning", "torchmetrics", "jax", "flax", "optax", "orbax.checkpoint",
           "clu.metrics", "clu.parameter_overview", "ml_collections", "tensorboardX", "tensorboard", "timm",
           "matplotlib", "PIL", "safetensors", "tqdm", "psutil", "yaml", "etils.epath")
# The packages the GPU image lacks, installed by scripts/gpu_benchmark.sh from wheels/: where each was imported from.
CARRIED = ("clu", "ml_collections", "tensorboardX")
LIBRARIES = RECORDED_LIBRARIES + ("lightning", "lightning-utilities", "ml-collections", "tensorboard", "tensorboardX",
                                  "timm", "matplotlib", "safetensors", "protobuf", "etils", "triton")
# Wheels named by the CUDA version they were built for: whichever of them is installed.
CUDA_PACKAGE_PREFIXES = ("jax-cuda", "nvidia-cublas", "nvidia-cudnn")
# A float32 product's relative error against float64: full float32 lands far under 1e-5, TF32 (10-bit mantissa)
# near 3e-4, bf16 operands above 1e-3.
FULL_FLOAT32_BELOW, TF32_BELOW = 1e-5, 3e-3
# The matrix side of the JAX bf16 rate with and without jax_default_matmul_precision=highest.
JAX_BF16_RATE_SIZE = 8192


def check_imports(modules: tuple[str, ...] = IMPORTS) -> dict[str, str]:
    """Module -> 'ExceptionType: message' for each of `modules` that does not import."""
    import importlib

    failed = {}
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001  (any failure to import is the finding, not a crash)
            failed[module] = f"{type(error).__name__}: {error}"
    return failed


def carried_origins() -> dict[str, str]:
    """Where each carried package was imported from (the private folder when the wheels were installed)."""
    import importlib

    origins = {}
    for module in CARRIED:
        with contextlib.suppress(ImportError):
            origins[module] = str(Path(importlib.import_module(module).__file__).parent.parent)
    return origins


def cuda_packages() -> dict[str, str]:
    """Versions of the installed CUDA-specific wheels (JAX's CUDA plugin, cuBLAS, cuDNN)."""
    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(CUDA_PACKAGE_PREFIXES):
            found[name] = dist.version
    return dict(sorted(found.items()))


def nvidia_smi() -> dict[str, Any]:
    """The GPU as nvidia-smi sees it: name, driver, memory, and its full table as text."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi is not on the PATH"}
    query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    table = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    fields = [field.strip() for field in query.stdout.strip().splitlines()[0].split(",")] if query.stdout else []
    keys = ("name", "driver", "memory", "max_sm_clock", "power_limit")
    return {**dict(zip(keys, fields)), "table": table.stdout, "error": query.stderr.strip() or None}


def precision_label(error: float) -> str:
    """What a float32 product's relative error against float64 says about how it was computed."""
    if error < FULL_FLOAT32_BELOW:
        return "full float32"
    return "TF32 (10-bit mantissa)" if error < TF32_BELOW else "bf16 or lower"


def _relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref))


def _float32_inputs() -> dict[str, np.ndarray]:
    """A 1024-deep matmul and the models' patch-embedding convolution (3 -> 96 channels, 4x4 stride 4, 256 px)."""
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((1024, 1024), dtype=np.float32),
            "b": rng.standard_normal((1024, 1024), dtype=np.float32),
            "x": rng.standard_normal((8, 3, 256, 256), dtype=np.float32),
            "w": rng.standard_normal((96, 3, 4, 4), dtype=np.float32)}


def _float64_references(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    x, w = (torch.from_numpy(inputs[name]).double() for name in ("x", "w"))
    return {"matmul": inputs["a"].astype(np.float64) @ inputs["b"].astype(np.float64),
            "conv": torch.nn.functional.conv2d(x, w, stride=4).numpy()}


def torch_float32(device: str, inputs: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> dict[str, Any]:
    """torch's float32 settings as a fresh process finds them, and the error of its float32 matmul and convolution."""
    import torch

    a, b, x, w = (torch.from_numpy(inputs[name]).to(device) for name in ("a", "b", "x", "w"))
    return {
        "settings": {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                     "backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32},
        "matmul": _relative_error((a @ b).cpu().numpy(), refs["matmul"]),
        "conv": _relative_error(torch.nn.functional.conv2d(x, w, stride=4).cpu().numpy(), refs["conv"]),
    }


def jax_float32(precision: str | None, inputs: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> dict[str, Any]:
    """The error of JAX's float32 matmul and convolution under jax_default_matmul_precision `precision` (None: the
    process's own setting, which JAX_DEFAULT_MATMUL_PRECISION gives)."""
    import jax
    import jax.numpy as jnp

    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        matmul = jnp.matmul(inputs["a"], inputs["b"])
        conv = jax.lax.conv_general_dilated(inputs["x"], inputs["w"], (4, 4), "VALID")
        return {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
                "matmul": _relative_error(np.asarray(matmul), refs["matmul"]),
                "conv": _relative_error(np.asarray(conv), refs["conv"])}


def jax_bf16_rates() -> dict[str, float]:
    """JAX's bf16 matmul rate in TFLOP/s at its default precision and under jax_default_matmul_precision=highest:
    whether the setting that makes float32 full also slows bf16 products."""
    import jax

    rates = {}
    for precision in ("default", "highest"):
        with jax.default_matmul_precision(None if precision == "default" else precision):
            # report.peaks' own timing loop, so that these figures compare with its torch ones.
            rate = peaks.best_matmul_rate("jax", "gpu", "bfloat16", (JAX_BF16_RATE_SIZE,), 0.5)
        rates[precision] = round(rate / 1e12, 1)
    return rates


def probe(gpu: bool) -> dict[str, Any]:
    """Everything this module finds out; `problems` lists what stops a benchmark (none: it may go on)."""
    result: dict[str, Any] = {"gpu": gpu, "problems": []}
    result["import_failures"] = check_imports()
    result["problems"] += [f"cannot import {module}: {error}" for module, error in result["import_failures"].items()]
    result["versions"] = library_versions(LIBRARIES)
    result["cuda_packages"] = cuda_packages()
    result["carried_from"] = carried_origins()
    result["environment"] = {name: os.environ.get(name) for name in ("JAX_DEFAULT_MATMUL_PRECISION", "PYTHONPATH",
                                                                     "XLA_FLAGS", "CUDA_VISIBLE_DEVICES")}
    if any(module.split(".")[0] in ("torch", "jax") for module in result["import_failures"]):
        return result
    import jax
    import torch

    inputs = _float32_inputs()
    refs = _float64_references(inputs)
    if gpu:
        result["nvidia_smi"] = nvidia_smi()
        if not torch.cuda.is_available():
            result["problems"].append("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
        jax_platform = jax.devices()[0].platform
        if jax_platform != "gpu":
            result["problems"].append(f"JAX sees no GPU (its devices are {jax_platform}): is its CUDA plugin there?")
        if result["problems"]:
            return result
        name = torch.cuda.get_device_name(0)
        result["device"] = {"name": name, "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                            "jax_device_kind": jax.devices()[0].device_kind}
        result["matmul_tflops"] = {precision: round(peaks.measure_gpu_matmul_rate(name, precision)[0] / 1e12, 1)
                                   for precision in ("bf16", "fp32")}
        result["jax_bf16_tflops"] = jax_bf16_rates()
    result["float32"] = {"torch": torch_float32("cuda" if gpu else "cpu", inputs, refs),
                         "jax_default": jax_float32(None, inputs, refs),
                         "jax_highest": jax_float32("highest", inputs, refs)}
    return result


def describe(result: dict[str, Any]) -> str:
    """The probe's findings as the lines a person reads first."""
    lines = []
    smi = result.get("nvidia_smi") or {}
    if result["gpu"]:
        lines.append(f"GPU: {smi.get('name', 'n/a')}, driver {smi.get('driver', 'n/a')}, {smi.get('memory', 'n/a')}, "
                     f"max SM clock {smi.get('max_sm_clock', 'n/a')}, power limit {smi.get('power_limit', 'n/a')}")
        device = result.get("device") or {}
        lines.append(f"CUDA (torch) {device.get('torch_cuda', 'n/a')}, cuDNN {device.get('cudnn', 'n/a')}; "
                     + ", ".join(f"{name} {version}" for name, version in result["cuda_packages"].items()))
    else:
        lines.append("GPU: none (rehearsal on the CPU): nvidia-smi and the GPU matmul rates are skipped")
    lines.append("versions: " + ", ".join(f"{name} {version}" for name, version in result["versions"].items()))
    lines.append("carried packages from: " + ", ".join(f"{m} {p}" for m, p in result["carried_from"].items()))
    if "matmul_tflops" in result:
        rates, jax_bf16 = result["matmul_tflops"], result["jax_bf16_tflops"]
        lines.append(f"matmul rate (torch, best of {', '.join(map(str, peaks.GPU_MATMUL_SIZES))}): "
                     f"bf16 {rates['bf16']} TFLOP/s, float32 {rates['fp32']} TFLOP/s; JAX bf16 at "
                     f"{JAX_BF16_RATE_SIZE}: {jax_bf16['default']} TFLOP/s default, {jax_bf16['highest']} with highest")
    for name, found in (result.get("float32") or {}).items():
        lines.append(f"float32 {name}: matmul {found['matmul']:.1e} ({precision_label(found['matmul'])}), "
                     f"conv {found['conv']:.1e} ({precision_label(found['conv'])})"
                     + (f"; settings {found['settings']}" if "settings" in found else ""))
    lines += [f"PROBLEM: {problem}" for problem in result["problems"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="no GPU expected: skip nvidia-smi and the GPU matmul rates")
    parser.add_argument("--json", type=Path, default=None, help="also write the findings here")
    args = parser.parse_args(argv)
    result = probe(gpu=not args.cpu)
    if result["gpu"] and "nvidia_smi" in result:
        print(result["nvidia_smi"]["table"], flush=True)
    print(describe(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 1 if result["problems"] else 0
