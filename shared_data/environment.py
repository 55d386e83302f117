"""Where a run ran: host peak memory, the device string and a CPU's vector ISA, library versions, the machine load,
a SLURM launch."""

from __future__ import annotations

import os
import platform
import re
import resource
import sys
from importlib import metadata

RECORDED_LIBRARIES = (
    "torch", "torchvision", "pytorch-lightning", "torchmetrics", "timm",
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "clu", "numpy", "pillow",
)


def host_peak_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def machine_load_text() -> str:
    """'load average 0.52 / 0.61 / 0.70 on 2 cores': the 1, 5 and 15-minute load, for every printed figure."""
    return f"load average {' / '.join(f'{load:.2f}' for load in os.getloadavg())} on {os.cpu_count()} cores"


def slurm_launched() -> bool:
    """Whether srun started this process as one of a job's tasks: SLURM_NTASKS is set and the job is not named for
    interactive use (salloc's or `srun --pty bash`'s shell), Lightning's own test (SLURMEnvironment.detect)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


# The widest vector extension a CPU advertises, widest first: /proc/cpuinfo flag -> the name we print. The
# Flax/PyTorch speed ratio on a CPU changes with it (XLA's CPU kernels use AVX-512 where torch's do not).
VECTOR_ISAS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"),
               ("sve", "SVE"), ("asimd", "NEON"))


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of /proc/cpuinfo's first processor, or (the platform's name, no flags) without it."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                found.setdefault(key.strip(), value.strip())  # the first processor's line of each key
    except OSError:
        pass
    name = found.get("model name") or platform.processor() or platform.machine()
    return name, set((found.get("flags") or found.get("Features") or "").split())


def cpu_vector_isa() -> str:
    """The widest vector instruction set this CPU advertises ('AVX-512', 'AVX2', ..., 'NEON'), or 'unknown'."""
    _, flags = _cpuinfo()
    return next((label for flag, label in VECTOR_ISAS if flag in flags), "unknown")


def cpu_description() -> str:
    """'cpu: <model name> (<widest vector ISA>) x<cores> cores', read from /proc/cpuinfo where it exists."""
    name, _ = _cpuinfo()
    return f"cpu: {name} ({cpu_vector_isa()}) x{os.cpu_count()} cores"


def vector_isa_of(device: str | None) -> str | None:
    """The vector ISA a device string of cpu_description names ('AVX2'), 'unknown' for a CPU string without one
    (written before the ISA was recorded), None for a device that is not a CPU."""
    if not isinstance(device, str) or not device.startswith("cpu:"):
        return None
    match = re.search(r"\(([^()]+)\) x\d+ cores$", device)
    return match.group(1) if match else "unknown"


def library_versions(names: tuple[str, ...] = RECORDED_LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries that decide speed and numerics, plus Python's."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def device_description(platform: str, name: str, count: int) -> str:
    """One string for where a run ran, the same in both stacks: 'cpu: <model> x<cores> cores' on a CPU,
    else '<platform>: <device name> x<devices>' (platform 'cuda' for NVIDIA GPUs, whatever the framework calls it)."""
    if platform == "cpu":
        return cpu_description()
    return f"{'cuda' if platform == 'gpu' else platform}: {name} x{count}"
