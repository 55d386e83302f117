"""Time forward and train steps of our PyTorch, timm's, torchvision's and our Flax Swin V2 in one process."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from shared_data import environment, host_allocator
from shared_data.variants import VARIANTS

# Official model zoo figures (millions of parameters, 1000-class head).
OFFICIAL_PARAMS_M = {"tiny": 28.35}
TORCHVISION_EQUIVALENT = "swinv2_tiny_window8_256"  # torchvision's swin_v2_t is this variant
IMPLEMENTATIONS = ("torch", "timm", "torchvision", "flax")
OURS_TORCH, TIMM, TORCHVISION, OURS_FLAX = "ours (pytorch)", "timm", "torchvision swin_v2_t", "ours (flax, jit)"
# (faster candidate, reference): the speed ratios printed under the table, when both ran.
RATIOS = ((OURS_FLAX, OURS_TORCH), (OURS_TORCH, TIMM), (OURS_FLAX, TIMM))


@dataclass
class Timing:
    """Seconds per batch for one model and one kind of step; compile_s only for jitted code."""

    model: str
    step: str
    seconds: list[float]
    batch_size: int
    compile_s: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=TORCHVISION_EQUIVALENT, choices=sorted(VARIANTS), help="variant to time")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (after any compile)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--skip", nargs="*", default=(), choices=IMPLEMENTATIONS,
                        help="implementations to leave out (timm and torchvision run only for variants they have)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch-size and --steps must be positive and --warmup non-negative")
    return args


@dataclass
class Contender:
    """One implementation: per step kind, a function that puts the model in the right mode, and one step."""

    name: str
    modes: dict[str, Callable[[], None]]
    steps: dict[str, Callable[[], None]]
    compile_s: dict[str, float] = field(default_factory=dict)


def torch_contender(name: str, model, images: np.ndarray, labels: np.ndarray) -> Contender:
    """Eval forward under no_grad, and a training step: forward, cross-entropy, backward, AdamW."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return Contender(name, {"forward": model.eval, "train step": model.train},
                     {"forward": forward, "train step": train_step})


def flax_contender(model, images: np.ndarray, labels: np.ndarray) -> Contender:
    """Jitted eval forward and jitted train step (AdamW with the official decay mask), in the Flax stack's form:
    parameters and optimiser state as plain dicts, donated to the step (flax_swin.steps); the first call compiles."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from flax_swin.model import decay_mask

    x, y = jnp.asarray(images), jnp.asarray(labels)
    graphdefs = {}
    for mode in ("forward", "train step"):  # the mode (dropout, drop path on or off) is part of the graph
        (model.eval if mode == "forward" else model.train)()
        graphdefs[mode], params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = params.to_pure_dict(), rest.to_pure_dict()
    optimizer = optax.adamw(1e-4, weight_decay=0.05, mask=decay_mask(params))
    state = {"params": params, "opt_state": optimizer.init(params)}

    @jax.jit
    def forward(params, rest, x):
        return nnx.merge(graphdefs["forward"], params, rest)(x)

    @jax.jit(donate_argnums=(0,))
    def train_step(state, rest, x, y):
        def loss_fn(params):
            logits = nnx.merge(graphdefs["train step"], params, rest)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        with jax.named_scope("optimizer"):
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    def run_train_step() -> None:
        nonlocal state
        state, loss = train_step(state, rest, x, y)
        jax.block_until_ready(loss)

    contender = Contender(
        OURS_FLAX, {"forward": lambda: None, "train step": lambda: None},
        {"forward": lambda: jax.block_until_ready(forward(state["params"], rest, x)), "train step": run_train_step},
    )
    for step, call in contender.steps.items():
        start = time.perf_counter()
        call()
        contender.compile_s[step] = time.perf_counter() - start  # compile + one step; the step is subtracted later
    return contender


def time_round_robin(contenders: list[Contender], steps: int, warmup: int, batch_size: int) -> list[Timing]:
    """Interleave the contenders step by step, so load from other processes hits them all alike, and rotate their
    order each round, so none always follows the same one (XLA's threads go on spinning for a moment after a step)."""
    timings = []
    for step in ("forward", "train step"):
        seconds: dict[str, list[float]] = {contender.name: [] for contender in contenders}
        for contender in contenders:
            contender.modes[step]()
            for _ in range(warmup):
                contender.steps[step]()
        for round_index in tqdm(range(steps), desc=step, unit="round", leave=False):
            turn = round_index % len(contenders)
            for contender in contenders[turn:] + contenders[:turn]:
                contender.modes[step]()
                start = time.perf_counter()
                contender.steps[step]()
                seconds[contender.name].append(time.perf_counter() - start)
        for contender in contenders:
            compile_s = contender.compile_s.get(step)
            if compile_s is not None:
                compile_s = max(compile_s - min(seconds[contender.name]), 0.0)
            timings.append(Timing(contender.name, step, seconds[contender.name], batch_size, compile_s))
    return timings


def parameter_counts(name: str, num_classes: int, skip: Sequence[str]) -> list[tuple[str, int]]:
    """(label, count) for each implementation, built abstractly or on CPU without running it."""
    counts = []
    if "torch" not in skip:
        from lightning_swin.model import create_model as create_torch_model

        model = create_torch_model(name, num_classes)
        counts.append(("ours (pytorch)", sum(p.numel() for p in model.parameters())))
    if "torchvision" not in skip and name == TORCHVISION_EQUIVALENT:
        from torchvision.models import swin_v2_t

        counts.append(("torchvision swin_v2_t", sum(p.numel() for p in swin_v2_t(num_classes=num_classes).parameters())))
    if "flax" not in skip:
        import jax
        from flax import nnx

        from flax_swin.model import create_model as create_flax_model

        abstract = nnx.eval_shape(lambda: create_flax_model(name, num_classes, nnx.Rngs(0)))
        counts.append(("ours (flax)", sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))))
    return counts


def timm_has(name: str) -> bool:
    """Whether timm (the pinned release) builds this variant under the same name."""
    import timm

    return name in timm.list_models(name)


def speed_ratios(timings: list[Timing]) -> list[str]:
    """'ours (flax, jit) / ours (pytorch), train step: 0.93x' lines: reference seconds / candidate seconds, so above
    1x the candidate is faster; for each pair of RATIOS that ran."""
    median = {(t.model, t.step): t.median_s for t in timings}
    lines = []
    for step in ("forward", "train step"):
        for candidate, reference in RATIOS:
            if (candidate, step) in median and (reference, step) in median:
                ratio = median[(reference, step)] / median[(candidate, step)]
                lines.append(f"  {step:<11} {candidate} against {reference}: {ratio:.2f}x "
                             f"({'faster' if ratio >= 1 else 'slower'})")
    return lines


def run(args: argparse.Namespace) -> tuple[list[Timing], list[tuple[str, int]]]:
    import torch

    args.load_before = environment.machine_load_text()  # printed with the figures: what else was running

    img_size = VARIANTS[args.model]["img_size"]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size, img_size, img_size, 3), dtype=np.float32)
    labels = rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)
    contenders: list[Contender] = []
    if "torch" not in args.skip:
        from lightning_swin.model import create_model as create_torch_model

        torch.manual_seed(0)
        model = create_torch_model(args.model, args.num_classes)
        contenders.append(torch_contender(OURS_TORCH, model, images, labels))
    if "timm" not in args.skip and timm_has(args.model):
        import timm

        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=args.num_classes)
        contenders.append(torch_contender(TIMM, model, images, labels))
    if "torchvision" not in args.skip and args.model == TORCHVISION_EQUIVALENT:
        from torchvision.models import swin_v2_t

        torch.manual_seed(0)
        model = swin_v2_t(num_classes=args.num_classes)
        contenders.append(torch_contender(TORCHVISION, model, images, labels))
    if "flax" not in args.skip:
        from flax import nnx

        from flax_swin.model import create_model as create_flax_model
        from flax_swin.steps import build_model

        # As training builds it: the seed's parameters in one program, compiled quickly on a CPU.
        model = build_model(lambda: create_flax_model(args.model, args.num_classes, nnx.Rngs(params=0, dropout=1)))
        contenders.append(flax_contender(model, images, labels))
    timings = time_round_robin(contenders, args.steps, args.warmup, args.batch_size)
    return timings, parameter_counts(args.model, args.num_classes, args.skip)


def format_report(args: argparse.Namespace, timings: list[Timing], counts: list[tuple[str, int]]) -> str:
    import jax
    import torch

    img_size = VARIANTS[args.model]["img_size"]
    lines = [
        f"{args.model}, {img_size}x{img_size}, batch {args.batch_size}, float32, median of {args.steps} interleaved steps; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} on {jax.default_backend()}; "
        f"before timing: {getattr(args, 'load_before', 'not measured')}, after: {environment.machine_load_text()}",
        f"host {environment.cpu_description()} (the Flax/PyTorch ratio on a CPU changes with its vector ISA); "
        f"allocator {host_allocator.describe()}",
        f"{'model':<24}{'step':<12}{'s/batch':>10}{'images/s':>10}{'compile s':>11}",
    ]
    for timing in timings:
        compile_s = f"{timing.compile_s:.1f}" if timing.compile_s is not None else "-"
        lines.append(
            f"{timing.model:<24}{timing.step:<12}{timing.median_s:>10.3f}"
            f"{timing.batch_size / timing.median_s:>10.1f}{compile_s:>11}"
        )
    ratios = speed_ratios(timings)
    if ratios:
        lines += ["", "speed (reference s / candidate s; above 1x the candidate is faster)"] + ratios
    size = args.model.split("_")[1]
    official = OFFICIAL_PARAMS_M.get(size) if args.num_classes == 1000 else None
    lines.append("")
    lines.append(f"parameters ({args.num_classes}-class head)" + (f", official {official:.2f}M" if official else ""))
    for label, count in counts:
        lines.append(f"  {label:<24}{count:>12,}  ({count / 1e6:.2f}M)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    timings, counts = run(args)
    print(format_report(args, timings, counts))
    return 0
