"""The Flax training loop end to end: learning, tags, retention, trash, resume, NaN stop, two devices, no TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flax_swin import checkpointing, train
from flax_swin.configs import default
from shared_data import tags, trash_safe
from tests import stacks
from shared_data.errors import NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]
# The tiny synthetic set (conftest): 200 training images at batch 32 -> 6 steps an epoch, 100 val images.
# Drop path on (the smoke preset has none), so resuming must also replay the random streams.
TINY = dict(synthetic_size="tiny", max_steps=10, checkpoint_every_steps=4, drop_path=0.1)
TINY_FLAGS = ["--preset", "smoke", "--synthetic-size", "tiny", "--max-steps", "10", "--checkpoint-every-steps", "4",
              "--drop-path", "0.1"]


def _train(run_dir: Path, data_dir: Path, preset: str = "smoke", hooks=(), **overrides) -> dict:
    config = default.get_config(preset)
    config.update(dict(data_dir=str(data_dir), logdir=str(run_dir.parent.parent), run_name=run_dir.name, num_workers=1,
                       **overrides))
    return train.train_and_evaluate(config, run_dir, hooks=hooks)


def nan_weights_at(step: int):
    """A hook that turns every parameter into NaN just before step `step`, so that step's real loss is NaN."""
    def hook(steps_done, state):
        if steps_done + 1 == step:
            return state.replace(params=jax.tree_util.tree_map(lambda p: p * np.nan, state.params))
        return state
    return hook


def _final_arrays(run_dir: Path) -> tuple[int, dict[str, np.ndarray]]:
    latest = max((i for i in checkpointing.list_checkpoints(run_dir) if i.complete), key=lambda i: i.step)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(latest.path / checkpointing.STATE_ITEM)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return latest.step, {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ------------------------------------------------------------------------------------------------
# One whole smoke-preset run (small synthetic set, 5 epochs), deletions going to a simulated trash.


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, compilation_cache):
    root = tmp_path_factory.mktemp("smoke")
    trash = root / "trash"
    trash.mkdir()
    moved = []

    def move_to_trash(path):
        moved.append(Path(path))
        os.rename(path, trash / f"{len(moved)}-{Path(path).name}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trash_safe, "_unlink", move_to_trash)
        run_dir = root / "runs" / "flax" / "smoke"
        summary = _train(run_dir, root / "data", checkpoint_every_steps=10)
    return run_dir, summary, trash, moved


def test_smoke_preset_loss_falls_and_val_accuracy_is_well_above_chance(smoke_run):
    run_dir, summary, _, _ = smoke_run
    losses = [value for _, value in _scalars(run_dir)[tags.TRAIN_LOSS]]
    assert len(losses) == 155  # 5 epochs x (1000 // 32) steps
    assert np.mean(losses[-20:]) < 0.75 * np.mean(losses[:20])
    assert summary["best_val_accuracy"] > 0.4, summary  # 10 classes: chance is 0.1
    assert summary["steps"] == 155 and summary["epochs_completed"] == 5
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["final_val_accuracy"] == pytest.approx(summary["final_val_accuracy"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["stack"] == "flax" and config["dataset"] == "synthetic" and config["steps_per_epoch"] == 31
    assert config["num_devices"] == 1 and config["num_params"] > 0 and config["device"].startswith("cpu: ")


def test_every_tensorboard_tag_is_written_at_the_right_steps(smoke_run):
    scalars = _scalars(smoke_run[0])
    missing = [tag for tag in tags.REQUIRED if tag not in scalars]
    assert not missing
    for tag in tags.PER_STEP:
        assert [step for step, _ in scalars[tag]] == list(range(1, 156)), tag
    for tag in tags.PER_EPOCH:
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4, 5], tag
    assert [step for step, _ in scalars[tags.FIRST_STEP_TIME]] == [1]
    assert tags.DEVICE_PEAK_MB not in scalars  # the CPU reports no device memory
    for (_, step_s), (_, wait_s), (_, compute_s) in zip(scalars[tags.STEP_TIME], scalars[tags.DATA_WAIT_TIME],
                                                        scalars[tags.COMPUTE_TIME]):
        assert step_s == pytest.approx(wait_s + compute_s, abs=1e-5) and wait_s >= 0


def test_retention_after_a_run_keeps_exactly_the_best_epoch_and_the_latest_step(smoke_run):
    run_dir = smoke_run[0]
    accuracies = dict(_scalars(run_dir)[tags.VAL_ACCURACY])
    best_epoch = max(accuracies, key=lambda epoch: (accuracies[epoch], -epoch))
    expected = sorted({best_epoch * 31, 155})
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == expected
    infos = checkpointing.list_checkpoints(run_dir)
    assert [i.step for i in infos] == expected and all(i.complete for i in infos)
    assert checkpointing.leftovers(run_dir) == []


def test_deleted_checkpoints_leave_only_empty_files_in_a_simulated_trash(smoke_run):
    _, _, trash, moved = smoke_run
    # 15 mid-epoch saves and 5 epoch-end saves, at most 2 kept: many deletions, all through trash_safe.
    assert len({path.parent for path in moved}) > 10 and len(list(trash.iterdir())) == len(moved)
    assert [p.name for p in trash.iterdir() if p.stat().st_size] == []


# ------------------------------------------------------------------------------------------------
# Short runs on the tiny set (10 steps, checkpoints every 4): all share one compiled step.


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, compilation_cache, synthetic_data_dir):
    """An uninterrupted run, as a subprocess in which `import tensorflow` fails."""
    root = tmp_path_factory.mktemp("reference")
    hooks = root / "hooks"
    # A broken TensorFlow shadowing any real one: found by find_spec, but importing it fails.
    (hooks / "tensorflow").mkdir(parents=True)
    (hooks / "tensorflow" / "__init__.py").write_text('raise ImportError("tensorflow is blocked in this test")\n')
    env = dict(os.environ, **compilation_cache,
               PYTHONPATH=os.pathsep.join([str(hooks), str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, str(REPO / "scripts" / "train_flax.py"), *TINY_FLAGS, "--data-dir",
               str(synthetic_data_dir), "--logdir", str(root / "runs"), "--run-name", "reference"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return root / "runs" / "flax" / "reference", result


def test_stack_imports_and_trains_with_tensorflow_unimportable(reference_run):
    run_dir, result = reference_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (run_dir / "summary.json").is_file()
    assert "tensorflow is blocked" not in result.stderr


def test_resume_mid_epoch_gives_bit_identical_parameters(reference_run, tmp_path, synthetic_data_dir):
    run_dir = tmp_path / "runs" / "flax" / "resumed"
    with pytest.raises(KeyboardInterrupt):  # after step 9; the last save was step 8, mid-epoch 2
        _train(run_dir, synthetic_data_dir, hooks=[stacks.interrupt_after("flax", 9, KeyboardInterrupt)], **TINY)
    assert [i.step for i in checkpointing.list_checkpoints(run_dir)] == [6, 8]
    summary = _train(run_dir, synthetic_data_dir, resume=True, **TINY)
    assert summary["steps"] == 10

    reference_step, reference = _final_arrays(reference_run[0])
    step, arrays = _final_arrays(run_dir)
    assert step == reference_step == 10
    assert arrays.keys() == reference.keys() and len(arrays) > 20
    differing = [key for key in reference if not np.array_equal(arrays[key], reference[key])]
    assert differing == []
    # The resumed run wrote steps 9 and 10 again with the same learning rate and loss.
    resumed_loss = [v for s, v in _scalars(run_dir)[tags.TRAIN_LOSS] if s == 10]
    reference_loss = [v for s, v in _scalars(reference_run[0])[tags.TRAIN_LOSS] if s == 10]
    assert resumed_loss[-1] == reference_loss[-1]


def test_nan_loss_stops_the_run_naming_the_step_and_the_last_checkpoint_restores(tmp_path, synthetic_data_dir,
                                                                                  compilation_cache):
    run_dir = tmp_path / "runs" / "flax" / "nan"
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 5: stopped; last good checkpoint: .*checkpoints/4; "):
        _train(run_dir, synthetic_data_dir, hooks=[nan_weights_at(5)], **TINY)
    infos = checkpointing.list_checkpoints(run_dir)
    assert [i.step for i in infos] == [4] and infos[0].complete
    assert checkpointing.verify_checkpoint(infos[0].path)["step"] == 4
    assert not (run_dir / "summary.json").exists()


ONE_STEP = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec
    from flax_swin import input_pipeline, steps
    from flax_swin.configs import default


    def one_step(devices):
        \"\"\"(initial, updated) parameter leaves after one full-lr step on a fixed global batch over `devices`.\"\"\"
        # The tiny runs' configuration, so the one-device step comes from the compilation cache.
        config = default.resolve(dict(default.get_config("smoke").to_dict(), synthetic_size="tiny", max_steps=10,
                                      drop_path=0.1, run_name="x"))
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(32, 64, 64, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=32, dtype=np.int32)
        mesh = steps.make_mesh(devices)
        graphdef, state, rest, optimizer = steps.create_model_and_state(config, 10, mesh, steps_per_epoch=6)
        initial = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state.params))]
        # Step 7, after the warm-up: the full learning rate, so the update is large enough to compare.
        state = state.replace(step=jnp.asarray(6, jnp.int32),
                              opt_state=optax.tree_utils.tree_set(state.opt_state, count=jnp.asarray(6, jnp.int32)))
        state = jax.tree_util.tree_map(jnp.copy, state)  # one buffer per leaf: the step donates them all
        train_step = steps.make_train_step(graphdef, optimizer, config, mesh, 10)
        metrics = jax.device_put(steps.TrainMetrics.empty(), NamedSharding(mesh, PartitionSpec()))
        batch = input_pipeline.to_global((images, labels), NamedSharding(mesh, PartitionSpec(steps.BATCH_AXIS)))
        state, metrics, out = train_step(state, metrics, rest, *batch)
        return initial, [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state.params))]
''')


@pytest.mark.slow  # 38 s; tests/test_multi_process.py covers two Flax processes by default
def test_two_devices_give_the_same_parameters_as_one_to_float32_rounding(compilation_cache, reference_run, tmp_path):
    # The two-device step runs in a process with two host devices; the one-device step here, where the
    # tiny runs already compiled it (XLA flags are part of the cache key, so it could not be shared).
    out = tmp_path / "two.npz"
    script = ONE_STEP + textwrap.dedent(f'''
        assert len(jax.devices()) == 2, jax.devices()
        np.savez({str(out)!r}, *one_step(jax.devices()[:2])[1])
    ''')
    env = dict(os.environ, **compilation_cache, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    namespace: dict = {}
    exec(ONE_STEP, namespace)
    initial, one = namespace["one_step"](jax.devices()[:1])
    with np.load(out) as saved:
        two = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    assert len(one) == len(two) > 20
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(one, initial))
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(one, two))
    # One step at the full lr (2e-3) moves weights by ~1e-3; the two meshes agree to float32 rounding
    # (the batch sums are split differently; dropout keys do not depend on the sharding).
    assert moved > 1e-3 and worst < 2e-5, (moved, worst)
