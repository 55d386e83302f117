"""Training on several machines, tested on 127.0.0.1: two processes of each stack train as one with two devices,
write one run folder from process 0, survive a kill and a resume, and a coordinator that never comes is one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import psutil
import pytest

from flax_swin import checkpointing as flax_checkpointing
from flax_swin import distributed
from lightning_swin.configs import default as lightning_default
from shared_data import run_config
from shared_data.errors import ConfigError
from tests import stacks
from tests.test_resume import assert_each_step_once

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {stack: REPO / "scripts" / f"train_{stack}.py" for stack in stacks.STACKS}
# Two epochs of the tiny set cut at step 8 (6 steps per epoch), a save every 2 steps: a kill lands mid-epoch.
STEPS, EPOCHS = 8, 2
RUN_FLAGS = [*stacks.SMOKE_TINY, "--epochs", str(EPOCHS), "--max-steps", str(STEPS), "--checkpoint-every-steps", "2"]
# Variables of a launcher or of a run on several machines that must not leak in from the shell running the tests.
LAUNCHER_PREFIXES = ("JAX_", "SLURM_", "OMPI_", "TORCHELASTIC_", "PMI_")
LAUNCHER_VARIABLES = {"RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "TPU_WORKER_HOSTNAMES", lightning_default.RUN_NAME_ENV}
# One thread per process: two processes share the two cores, and XLA's Eigen pool would fight over them.
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
TIMEOUT_S = 420


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environment(*extra: dict[str, str], **variables: str) -> dict[str, str]:
    """This environment without any launcher's variables, one thread per process, the repository importable."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(LAUNCHER_PREFIXES) and key not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for more in extra:
        env.update(more)
    env.update(variables)
    return env


class Processes:
    """Processes started together, their output in files; whatever is still running when the block ends is killed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, command: Sequence[str], env: dict[str, str], name: str) -> None:
        log = self.folder / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(list(command), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.started.append((process, log))

    def wait(self, timeout_s: float = TIMEOUT_S) -> list[tuple[int, str]]:
        """(exit code, output) of each process, in the order started; raises TimeoutExpired after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        for process, _ in self.started:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
        return [(process.returncode, log.read_text(errors="replace")) for process, log in self.started]

    def kill(self) -> None:
        """SIGKILL each process and every process below it, as a machine that fails would end them (torchrun starts
        its workers in sessions of their own, out of reach of a kill of its own process group)."""
        for process, _ in self.started:
            if process.poll() is None:
                try:
                    tree = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
                except psutil.NoSuchProcess:
                    tree = []
                for member in tree:
                    try:
                        member.send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        pass
            process.wait()

    def __enter__(self) -> "Processes":
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def flax_command(logdir: Path, data_dir: Path, run_name: str, *flags: str) -> list[str]:
    return [sys.executable, str(SCRIPTS["flax"]), *RUN_FLAGS, "--data-dir", str(data_dir), "--logdir", str(logdir),
            "--run-name", run_name, *flags]


def start_two_flax_processes(processes: Processes, logdir: Path, data_dir: Path, run_name: str, cache: dict[str, str],
                             *flags: str) -> None:
    """Process 0 told by flags, process 1 by JAX's variables, as a user might start them on two machines."""
    address = f"127.0.0.1:{free_port()}"
    command = flax_command(logdir, data_dir, run_name, *flags)
    env = clean_environment(cache, XLA_FLAGS=XLA_ONE_THREAD)
    processes.start([*command, "--coordinator-address", address, "--num-processes", "2", "--process-id", "0"], env,
                    f"{run_name}-0")
    processes.start(command, dict(env, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1"),
                    f"{run_name}-1")


def start_two_lightning_nodes(processes: Processes, logdir: Path, data_dir: Path, run_name: str, *flags: str,
                              torchrun: bool = False) -> None:
    """Two nodes of one process each: by Lightning's variables (MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE),
    or each under its own torchrun."""
    port = str(free_port())
    script = [str(SCRIPTS["lightning"]), *RUN_FLAGS, "--data-dir", str(data_dir), "--logdir", str(logdir),
              "--run-name", run_name, "--accelerator", "cpu", "--num-nodes", "2", "--devices", "1", *flags]
    for node in range(2):
        if torchrun:
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                       "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port, *script]
            env = clean_environment()
        else:
            command = [sys.executable, *script]
            env = clean_environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node), WORLD_SIZE="2")
        processes.start(command, env, f"{run_name}-{node}")


def assert_all_succeeded(results: list[tuple[int, str]]) -> None:
    for index, (code, output) in enumerate(results):
        assert code == 0, f"process {index} exited {code}:\n{output[-4000:]}"


def assert_written_by_process_0_only(run_dir: Path, results: list[tuple[int, str]], launches: int) -> None:
    """One event file per launch, one summary and config, and no progress bar or report from process 1."""
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == launches
    assert (run_dir / "config.json").is_file() and (run_dir / "summary.json").is_file()
    assert "done: best val accuracy" in results[0][1]
    assert "done: best val accuracy" not in results[1][1] and "epoch 1/2" not in results[1][1]


def flax_parameters(run_dir: Path) -> tuple[int, dict[str, np.ndarray]]:
    """(step, parameters by key path) of a Flax run's newest checkpoint."""
    import jax

    newest = flax_checkpointing.list_checkpoints(run_dir)[-1]
    state = flax_checkpointing.read_state(newest.path)
    leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return int(state["step"]), {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def lightning_parameters(run_dir: Path) -> tuple[int, dict[str, np.ndarray]]:
    """(step, floating-point state_dict entries) of a Lightning run's "last" checkpoint."""
    import torch

    from lightning_swin.checkpointing import list_checkpoints

    last = [info for info in list_checkpoints(run_dir) if info.role == "last"][-1]
    checkpoint = torch.load(last.path, map_location="cpu", weights_only=False)
    return checkpoint["global_step"], {key: value.numpy() for key, value in checkpoint["state_dict"].items()
                                       if value.is_floating_point()}


def assert_trained_alike(label: str, two: tuple[int, dict], one: tuple[int, dict]) -> None:
    """Both runs ended at STEPS with parameters equal to float32 rounding; prints the largest difference."""
    (two_step, two_params), (one_step, one_params) = two, one
    assert two_step == one_step == STEPS
    assert_float32_close(two_params, one_params)
    print(f"{label}, max |difference| {max_difference(two_params, one_params):.3g}")


def max_difference(one: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> float:
    assert one.keys() == other.keys() and len(one) > 20
    return max(float(np.max(np.abs(one[key] - other[key]))) for key in one)


def assert_float32_close(one: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> None:
    differing = [key for key in one if not np.allclose(one[key], other[key], rtol=1e-5, atol=1e-6)]
    assert differing == [], (differing[:5], max_difference(one, other))


def kill_after_checkpoint(processes: Processes, run_dir: Path, stack: str, step: int) -> None:
    """SIGKILL every process once a complete checkpoint of `step` or later exists, before the run ends."""
    from lightning_swin.checkpointing import list_checkpoints as lightning_list

    listing = flax_checkpointing.list_checkpoints if stack == "flax" else lightning_list
    deadline = time.monotonic() + TIMEOUT_S
    while not any(info.complete and info.step >= step for info in listing(run_dir)):
        ended = [log for process, log in processes.started if process.poll() is not None]
        assert not ended, ended[0].read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, f"no checkpoint of step {step} in {run_dir}"
        time.sleep(0.05)
    processes.kill()
    assert max(info.step for info in listing(run_dir) if info.complete) < STEPS, "the run ended before the kill"


# ------------------------------------------------------------------------------------------------
# Flax: jax.distributed, process 0 told by flags, process 1 by JAX's variables


@pytest.fixture(scope="module")
def flax_two_processes(tmp_path_factory, synthetic_data_dir, compilation_cache) -> tuple[Path, list[tuple[int, str]]]:
    """The run of two Flax processes of one CPU device each: its folder and each process's (exit code, output)."""
    root = tmp_path_factory.mktemp("flax-two")
    with Processes(root / "logs") as processes:
        start_two_flax_processes(processes, root / "runs", synthetic_data_dir, "two", compilation_cache)
        results = processes.wait()
    return root / "runs" / "flax" / "two", results


def test_two_flax_processes_write_one_run_folder_from_process_0(flax_two_processes):
    run_dir, results = flax_two_processes
    assert_all_succeeded(results)
    assert_written_by_process_0_only(run_dir, results, launches=1)
    assert_each_step_once(run_dir, STEPS, epochs=EPOCHS)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_processes"] == 2 and config["num_devices"] == 2
    # One checkpoint set, both processes' shards in it: the last two saves (retention keeps best and latest).
    assert [info.step for info in flax_checkpointing.list_checkpoints(run_dir)] == [6, 8]


@pytest.mark.slow
def test_two_flax_processes_train_like_one_process_with_two_devices(flax_two_processes, tmp_path, synthetic_data_dir,
                                                                    compilation_cache):
    two_dir, results = flax_two_processes
    assert_all_succeeded(results)
    command = flax_command(tmp_path, synthetic_data_dir, "one")
    env = clean_environment(compilation_cache, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {XLA_ONE_THREAD}")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_trained_alike("flax: two processes vs one process with two devices",
                         flax_parameters(two_dir), flax_parameters(tmp_path / "flax" / "one"))


@pytest.mark.slow
def test_two_flax_processes_killed_after_a_checkpoint_resume_to_the_same_parameters(
        flax_two_processes, tmp_path, synthetic_data_dir, compilation_cache):
    reference_dir, _ = flax_two_processes
    run_dir = tmp_path / "runs" / "flax" / "killed"
    with Processes(tmp_path / "logs") as processes:
        start_two_flax_processes(processes, tmp_path / "runs", synthetic_data_dir, "killed", compilation_cache)
        kill_after_checkpoint(processes, run_dir, "flax", step=2)
    with Processes(tmp_path / "logs-resumed") as processes:
        start_two_flax_processes(processes, tmp_path / "runs", synthetic_data_dir, "killed", compilation_cache,
                                 "--resume")
        results = processes.wait()
    assert_all_succeeded(results)
    assert "resumed from step" in results[0][1]
    assert_written_by_process_0_only(run_dir, results, launches=2)
    assert_each_step_once(run_dir, STEPS, epochs=EPOCHS)
    assert_trained_alike("flax: killed and resumed vs uninterrupted", flax_parameters(run_dir),
                         flax_parameters(reference_dir))


def test_a_coordinator_that_never_comes_is_one_line_exit_2_within_the_timeout(tmp_path):
    command = flax_command(tmp_path, tmp_path / "data", "lonely")
    command += ["--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "1",
                "--coordinator-timeout", "2"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=clean_environment(), capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_flax.py: error: --coordinator-address 127.0.0.1:"), lines
    assert "not all 2 processes joined within 2 s" in lines[0]
    assert elapsed < 30  # the 2 s wait, JAX's import and start; never JAX's own 300 s
    assert not (tmp_path / "data").exists()


def test_coordinator_settings_come_from_flags_over_jax_variables(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed.settings({}) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                                            coordinator_timeout=distributed.DEFAULT_TIMEOUT_S)
    given = distributed.settings(dict(coordinator_address="host:99", process_id=1, coordinator_timeout=5))
    assert given == dict(coordinator_address="host:99", num_processes=4, process_id=1, coordinator_timeout=5.0)
    assert distributed.is_multi_process(given)


def test_one_process_inside_a_cluster_launch_or_an_interactive_slurm_shell_stays_one(monkeypatch):
    for name in (*distributed.ENVIRONMENT.values(), "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert distributed.is_multi_process(distributed.settings({}))  # srun's tasks
    assert not distributed.is_multi_process(distributed.settings(dict(num_processes=1)))  # asked for one
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # salloc's shell: Lightning's rule too
    assert not distributed.is_multi_process(distributed.settings({}))


@pytest.mark.parametrize("values, environment, named", [
    (dict(coordinator_address="127.0.0.1"), {}, "--coordinator-address must be HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, "--process-id must be in 0..1"),
    (dict(num_processes=0), {}, "--num-processes must be a positive integer"),
    (dict(coordinator_timeout=0), {}, "--coordinator-timeout must be a positive number"),
    (dict(coordinator_timeout=float("inf")), {}, "--coordinator-timeout must be a positive number"),
    ({}, dict(JAX_NUM_PROCESSES="two"), "--num-processes (from JAX_NUM_PROCESSES) must be an integer"),
    # The first try: only the coordinator, outside any cluster launcher.
    ({}, dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:34567"),
     "--coordinator-address (from JAX_COORDINATOR_ADDRESS) needs --num-processes (or JAX_NUM_PROCESSES) and "
     "--process-id (or JAX_PROCESS_ID)"),
])
def test_a_coordinator_setting_that_cannot_work_is_a_config_error_naming_it(monkeypatch, values, environment, named):
    for name in distributed.ENVIRONMENT.values():
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        distributed.settings(values)
    assert str(error.value).startswith(named)


def test_process_0_refuses_a_coordinator_port_already_in_use_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = dict(coordinator_address=address, num_processes=2, process_id=0, coordinator_timeout=300.0)
        with pytest.raises(ConfigError, match=r"--coordinator-address .*: process 0 cannot listen on port \d+ "
                                              r"\(Address already in use\); pick a free port"):
            distributed.initialize(config, "train_flax.py")
    with pytest.raises(ConfigError, match="--coordinator-address no-such-host.invalid:1: cannot resolve host"):
        distributed.initialize(dict(config, coordinator_address="no-such-host.invalid:1", process_id=1), "x")


# ------------------------------------------------------------------------------------------------
# Lightning: DDP over two nodes, by Lightning's variables and by torchrun


@pytest.fixture(scope="module")
def lightning_two_nodes(tmp_path_factory, synthetic_data_dir) -> tuple[Path, list[tuple[int, str]]]:
    """The run of two Lightning nodes of one CPU process each: its folder and each node's (exit code, output)."""
    root = tmp_path_factory.mktemp("lightning-two")
    with Processes(root / "logs") as processes:
        start_two_lightning_nodes(processes, root / "runs", synthetic_data_dir, "two")
        results = processes.wait()
    return root / "runs" / "lightning" / "two", results


def test_two_lightning_nodes_train_like_one_process_with_the_same_global_batch(lightning_two_nodes, tmp_path,
                                                                               synthetic_data_dir):
    import torch

    run_dir, results = lightning_two_nodes
    assert_all_succeeded(results)
    assert_written_by_process_0_only(run_dir, results, launches=1)
    assert_each_step_once(run_dir, STEPS, epochs=EPOCHS)
    with stacks.torch_threads(1):
        stacks.train("lightning", tmp_path, synthetic_data_dir, *RUN_FLAGS[len(stacks.SMOKE_TINY):],
                     "--accelerator", "cpu", run_name="one")
    # Averaging two half-batch gradients rounds differently from one mean over the whole batch.
    assert_trained_alike("lightning: two nodes vs one process", lightning_parameters(run_dir),
                         lightning_parameters(tmp_path / "lightning" / "one"))


@pytest.mark.slow
def test_two_lightning_nodes_under_torchrun_killed_after_a_checkpoint_resume_to_the_same_parameters(
        lightning_two_nodes, tmp_path, synthetic_data_dir):
    reference_dir, _ = lightning_two_nodes
    run_dir = tmp_path / "runs" / "lightning" / "killed"
    with Processes(tmp_path / "logs") as processes:
        start_two_lightning_nodes(processes, tmp_path / "runs", synthetic_data_dir, "killed", torchrun=True)
        kill_after_checkpoint(processes, run_dir, "lightning", step=2)
    with Processes(tmp_path / "logs-resumed") as processes:
        start_two_lightning_nodes(processes, tmp_path / "runs", synthetic_data_dir, "killed", "--resume",
                                  torchrun=True)
        results = processes.wait()
    assert_all_succeeded(results)
    assert_written_by_process_0_only(run_dir, results, launches=2)
    assert_each_step_once(run_dir, STEPS, epochs=EPOCHS)
    assert_trained_alike("lightning: killed and resumed vs uninterrupted", lightning_parameters(run_dir),
                         lightning_parameters(reference_dir))


@pytest.mark.parametrize("environment, flags, named", [
    (dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="1", NODE_RANK="1"), ["--num-nodes", "2"], "--run-name is needed"),
    (dict(RANK="1", LOCAL_RANK="0", WORLD_SIZE="2"), ["--num-nodes", "2"], "--run-name is needed"),
    (dict(NODE_RANK="1", WORLD_SIZE="2"), ["--num-nodes", "1", "--run-name", "r"],
     "--devices 1 x --num-nodes 1 must equal the 2 processes the launcher started (WORLD_SIZE)"),
    (dict(NODE_RANK="2"), ["--num-nodes", "2", "--run-name", "r"], "--num-nodes 2: this node has NODE_RANK 2"),
])
def test_a_lightning_node_launched_inconsistently_is_a_config_error_naming_the_flag(monkeypatch, tmp_path, environment,
                                                                                      flags, named):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    parser = run_config.build_parser(lightning_default.STACK, lightning_default.add_stack_flags)
    args = parser.parse_args(["--preset", "smoke", "--logdir", str(tmp_path), "--accelerator", "cpu", *flags])
    with pytest.raises(ConfigError) as error:
        lightning_default.resolve(vars(args))
    assert str(error.value).startswith(named)


def test_several_processes_without_a_run_name_exit_2_naming_it_in_both_stacks(tmp_path):
    launches = {
        "flax": (clean_environment(), ["--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
                                        "--process-id", "1"]),
        "lightning": (clean_environment(MASTER_ADDR="127.0.0.1", MASTER_PORT="1", NODE_RANK="1"),
                      ["--num-nodes", "2", "--accelerator", "cpu"]),
    }
    for stack, (env, flags) in launches.items():
        command = [sys.executable, str(SCRIPTS[stack]), "--preset", "smoke", "--logdir", str(tmp_path), *flags]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (stack, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"train_{stack}.py: error: --run-name is needed with "), (stack, last)
        assert "Traceback" not in result.stderr
