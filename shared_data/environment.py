"""Where a run ran: host peak memory, the device string, library versions, the machine load, a SLURM launch."""

from __future__ import annotations

import os
import platform
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


def cpu_description() -> str:
    """'cpu: <model name> x<cores> cores', read from /proc/cpuinfo where it exists."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name} x{os.cpu_count()} cores"


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
