"""Measure the Flax loop's per-step Python overhead: steps/s of the training loop vs the jitted step in a bare loop."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/benchmark_flax_overhead.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402
from tqdm import tqdm  # noqa: E402

from flax_swin import train  # noqa: E402
from flax_swin.configs import default  # noqa: E402
from shared_data import batches, run_config  # noqa: E402

NUM_CLASSES = 10


class _InMemorySplit:
    """Random uint8 images standing in for a decoded split (the overhead does not depend on content)."""

    def __init__(self, n: int, resolution: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, size=(n, resolution, resolution, 3), dtype=np.uint8)
        self.labels = rng.integers(0, NUM_CLASSES, size=n, dtype=np.int32)


def measure(steps: int, batch_size: int, img_size: int, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` steps/s of (bare jitted loop, training loop) on the same pre-made host batches."""
    config = default.resolve(dict(default.get_config("smoke").to_dict(), batch_size=batch_size, img_size=img_size,
                                  max_steps=steps, run_name="overhead"))
    cfg = config.to_dict()
    mesh = train.make_mesh()
    split = _InMemorySplit(batch_size * steps, img_size, config.seed)
    host = [batches.train_batch(split, seed=config.seed, epoch=0, index=i, batch_size=batch_size, img_size=img_size)
            for i in range(steps)]
    graphdef, state, rest, optimizer = train.create_model_and_state(config, NUM_CLASSES, mesh, steps)
    train_step = train.make_train_step(graphdef, optimizer, config, mesh, NUM_CLASSES)
    sharding = NamedSharding(mesh, PartitionSpec(train.BATCH_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    new_metrics = lambda: jax.device_put(train.TrainMetrics.empty(), replicated)  # noqa: E731

    # Compile (and warm the allocator) outside the timed loops.
    state, metrics, outputs = train_step(state, new_metrics(), rest, *train.to_global(host[0], sharding))
    jax.block_until_ready(outputs)

    device_batches = [train.to_global(b, sharding) for b in host]
    bare, loop = [], []
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir=logdir)
        for _ in range(repeats):
            metrics = new_metrics()
            start = time.perf_counter()
            for batch in device_batches:
                state, metrics, outputs = train_step(state, metrics, rest, *batch)
            jax.block_until_ready(outputs["loss"])
            bare.append(steps / (time.perf_counter() - start))

            with tqdm(total=steps, desc="loop", leave=False) as bar:
                logger = train.StepLogger(writer, bar, lambda step: run_config.learning_rate(step, cfg, steps))
                start = time.perf_counter()
                state, metrics = train.run_epoch_steps(
                    train_step, state, new_metrics(), rest, iter(host), steps, 1, sharding,
                    lambda step, _state, outs, step_s, wait_s: logger(step, outs, step_s, wait_s))
                jax.block_until_ready(state.step)
                loop.append(steps / (time.perf_counter() - start))
        writer.close()
    return {"bare_steps_per_s": max(bare), "loop_steps_per_s": max(loop)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed loop (default 40)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch size (default 8)")
    parser.add_argument("--img-size", type=int, default=64, help="image size for the nano model (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, best kept (default 3)")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--steps must be >= 2, --batch-size and --repeats >= 1")
    result = measure(args.steps, args.batch_size, args.img_size, args.repeats)
    ratio = result["loop_steps_per_s"] / result["bare_steps_per_s"]
    print(f"bare jitted loop: {result['bare_steps_per_s']:.2f} steps/s")
    print(f"training loop:    {result['loop_steps_per_s']:.2f} steps/s ({ratio:.1%} of bare, "
          f"overhead {1 - ratio:+.1%})")


if __name__ == "__main__":
    main()
