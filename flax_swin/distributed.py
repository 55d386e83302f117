"""Join the other processes of a run on several machines: jax.distributed.initialize, bounded wait, one-line errors."""

from __future__ import annotations

import math
import os
import socket
import threading
from typing import Any

from shared_data import environment, errors
from shared_data.errors import ConfigError

# The variables JAX reads itself (JAX_COORDINATOR_ADDRESS) or that name the other two settings the same way; a
# flag given on the command line wins over its variable.
ENVIRONMENT = dict(coordinator_address="JAX_COORDINATOR_ADDRESS", num_processes="JAX_NUM_PROCESSES",
                   process_id="JAX_PROCESS_ID")
FLAGS = dict(coordinator_address="--coordinator-address", num_processes="--num-processes", process_id="--process-id")
DEFAULT_TIMEOUT_S = 300  # jax.distributed.initialize's own initialization_timeout
# jax.distributed.initialize is given this much longer than our own deadline: when its deadline passes it ends the
# process with a C++ abort and a stack trace, and ours (a one-line error) must come first.
_JAX_DEADLINE_MARGIN_S = 30


def cluster_processes() -> int | None:
    """The process count a cluster launcher announces (SLURM, Open MPI; a TPU pod: its workers), None outside one:
    under one, jax.distributed.initialize finds the coordinator, the count and this process's id itself."""
    if environment.slurm_launched() and os.environ["SLURM_NTASKS"].isdigit():
        return int(os.environ["SLURM_NTASKS"])
    if os.environ.get("OMPI_COMM_WORLD_SIZE", "").isdigit():
        return int(os.environ["OMPI_COMM_WORLD_SIZE"])
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return len(os.environ["TPU_WORKER_HOSTNAMES"].split(","))
    return None


def settings(values: dict[str, Any]) -> dict[str, Any]:
    """The multi-process settings of a config: each of --coordinator-address, --num-processes and --process-id from
    its flag, else from its JAX_* variable (ENVIRONMENT), and --coordinator-timeout; checked.

    Returns dict(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
    coordinator_timeout: float seconds). Raises ConfigError naming the flag (and the variable it came from) for a
    malformed value, and for a set that cannot start outside a cluster launcher (the count and id are needed there).
    """
    found: dict[str, Any] = {}
    for key, variable in ENVIRONMENT.items():
        value, source = values.get(key), FLAGS[key]
        if value is None and os.environ.get(variable):
            value, source = os.environ[variable], f"{FLAGS[key]} (from {variable})"
        if value is not None and key != "coordinator_address":
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{source} must be an integer, got {value!r}") from None
        found[key] = (value, source)
    (address, address_source), (count, count_source), (index, index_source) = found.values()
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{address_source} must be HOST:PORT (process 0's machine and a free port on it, e.g. "
                              f"10.0.0.1:34567), got {address!r}")
    if count is not None and count < 1:
        raise ConfigError(f"{count_source} must be a positive integer, got {count!r}")
    if index is not None and (index < 0 or (count is not None and index >= count)):
        raise ConfigError(f"{index_source} must be in 0..{count - 1 if count else 'N-1'} "
                          f"(one id per process, 0 hosts the coordinator), got {index!r}")
    timeout = values.get("coordinator_timeout")
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ConfigError(f"--coordinator-timeout must be a positive number of seconds, got {timeout!r}")
    given = [key for key, (value, _) in found.items() if value is not None]
    if given and cluster_processes() is None and not (count == 1 and address is None):
        missing = [key for key in ENVIRONMENT if key not in given]
        if missing:
            needed = " and ".join(f"{FLAGS[key]} (or {ENVIRONMENT[key]})" for key in missing)
            raise ConfigError(f"{found[given[0]][1]} needs {needed} outside SLURM or Open MPI: give every process "
                              "the same --coordinator-address and --num-processes, and its own --process-id")
    return dict(coordinator_address=address, num_processes=count, process_id=index, coordinator_timeout=float(timeout))


def is_multi_process(config: Any) -> bool:
    """Whether this process is one of several: the settings (see settings()) or a cluster launcher say so."""
    if config["coordinator_address"] is not None or (config["num_processes"] or 1) > 1:
        return True
    if config["num_processes"] == 1:  # asked for explicitly: one process, even inside a cluster launch
        return False
    return (cluster_processes() or 1) > 1


def initialize(config: Any, prog: str) -> None:
    """jax.distributed.initialize from the config's settings (None ones found by JAX from SLURM, Open MPI or a TPU
    pod), on a CPU with JAX's gloo collectives; a no-op for a single process. Blocks until every process has joined.

    Raises ConfigError naming --coordinator-address for a host that does not resolve or, on process 0, a port already
    in use, and for JAX's own refusals. When not every process has joined within --coordinator-timeout seconds, prints
    that one-line error as `prog` and ends the process with exit code 2: jax would end it later with a C++ stack trace.
    """
    if not is_multi_process(config):
        return
    import jax

    address, timeout = config["coordinator_address"], config["coordinator_timeout"]
    if address is not None:
        _check_reachable_host(address, config["process_id"])
    # Cross-process collectives on CPU (the gloo default of this JAX, set so that another default cannot leave a CPU
    # run without any); a GPU or TPU backend uses its own. Must precede the first backend use.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = f"{FLAGS['coordinator_address']} {address}" if address else "the cluster's coordinator"
    count = config["num_processes"] or cluster_processes()
    late = ConfigError(
        f"{where}: not all {count} processes joined within {timeout:g} s (--coordinator-timeout); start process 0 "
        "there and every process with the same --coordinator-address and --num-processes and its own --process-id")
    deadline = threading.Timer(timeout, errors.exit_from_thread, args=(prog, late))
    deadline.daemon = True
    deadline.start()
    try:
        jax.distributed.initialize(address, config["num_processes"], config["process_id"],
                                   initialization_timeout=int(timeout) + _JAX_DEADLINE_MARGIN_S)
    # JAX's own checks of what it was given or found, and the coordination service's refusals (a duplicate
    # --process-id, another --num-processes than process 0's, a JAX computation before initialize).
    except (ValueError, TypeError, RuntimeError) as error:
        raise ConfigError(f"{where}: jax.distributed.initialize refused the settings ({error})") from None
    finally:
        deadline.cancel()


def sync(name: str) -> None:
    """Wait until every process has reached the point called `name` (the same in all); a no-op for one process."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _check_reachable_host(address: str, process_id: int | None) -> None:
    """Fail at once, not after the timeout, for a host name that does not resolve or (process 0) a port in use."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # an IPv6 literal, [::1]:34567
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ConfigError(f"--coordinator-address {address}: cannot resolve host {host!r} ({error.strerror}); give "
                          "process 0's host name or IP address") from None
    if process_id != 0:
        return
    # Process 0 hosts the coordinator on every interface ([::]:PORT, JAX's default bind address); a port already
    # taken there makes JAX crash with a segmentation fault instead of an error.
    bind_host, _, bind_port = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{port}").rpartition(":")
    bind_host = bind_host.strip("[]")
    try:
        probe = socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET, socket.SOCK_STREAM)
    except OSError:  # a machine without IPv6: gRPC falls back to every IPv4 interface
        probe, bind_host = socket.socket(socket.AF_INET, socket.SOCK_STREAM), "0.0.0.0"
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a port in TIME_WAIT is free
        try:
            probe.bind((bind_host, int(bind_port)))
        except OSError as error:
            raise ConfigError(f"--coordinator-address {address}: process 0 cannot listen on port {bind_port} "
                              f"({error.strerror}); pick a free port") from None
