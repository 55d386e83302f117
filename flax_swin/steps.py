"""The Flax train and eval steps over a data-parallel mesh: their state, losses and metrics, and the AdamW
warm-up-cosine recipe (the mirror of lightning_swin/module.py)."""

# No `from __future__ import annotations`: clu's metric Collections read their fields' classes from the annotations.
import contextlib
import functools
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax import nnx
from jax.extend import random as jax_random
from jax.interpreters import mlir
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_swin import input_pipeline
from flax_swin.devices import set_arithmetic
from flax_swin.model import create_model, decay_mask
from flax_swin.weights import load_pretrained
from shared_data import augment, run_config

BATCH_AXIS = "batch"  # the mesh axis the global batch is split along
# fold_in tags keeping the dropout stream independent of the parameter-init stream of the same seed.
_DROPOUT_STREAM = 1


class TrainState(flax.struct.PyTreeNode):
    """What training changes: the step (which fixes lr, data position and dropout keys), params, optimiser state."""

    step: jax.Array
    params: Any
    opt_state: Any


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Accuracy


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Accuracy
    accuracy_top5: clu_metrics.Average.from_output("top5")


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh over every device of every process: the batch is split along it, params replicated."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A pytree of arrays equal in every process -> the same tree replicated over every device of the mesh.

    With several processes, jax.device_put refuses arrays already placed on this process's device (the model's,
    built under jit) and checks host arrays with one collective per leaf; each process supplies its own copy instead.
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(functools.partial(_replicated_leaf, sharding=sharding), tree)


def _replicated_leaf(leaf: Any, sharding: NamedSharding) -> jax.Array:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # typed keys (dropout streams) travel as their data
        data = _replicated_leaf(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up then cosine, per optimiser step: the optax form of run_config.learning_rate."""
    cfg = config.to_dict()
    peak = cfg["lr"]
    warm = run_config.warmup_steps(cfg, steps_per_epoch)
    total = run_config.total_steps(cfg, steps_per_epoch)
    cosine = optax.cosine_decay_schedule(peak, decay_steps=max(total - warm, 1), alpha=cfg["cosine_end_factor"])
    if warm == 0:
        return cosine
    warmup = optax.linear_schedule(peak * cfg["warmup_start_factor"], peak, transition_steps=warm)
    return optax.join_schedules([warmup, cosine], boundaries=[warm])


def make_optimizer(config: ml_collections.ConfigDict, params: Any,
                   steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW (official betas and eps) with the official no-decay mask, after global-norm clipping."""
    adamw = optax.adamw(
        learning_rate_schedule(config, steps_per_epoch), b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=config.weight_decay, mask=decay_mask(params),
    )
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw


# XLA:CPU compiles the initialisation at LLVM optimisation level 1 in 3.8 s against 5.6 s at the default level (whole
# build of the nano model; tiny window 8 at 256 px: 6.2 against 9.4 s; 2-core AVX-512 CPU) and gives bitwise the same
# parameters (tests/test_flax_startup.py): the program runs once, and level 3's extra LLVM passes change loop speed,
# not IEEE results (level 0 does change them). Other backends keep their defaults. Together with the unrolled threefry
# below, the same test holds for both.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


@contextlib.contextmanager
def unrolled_threefry_on_cpu() -> Iterator[None]:
    """Within the block, programs lowered for a CPU take jax's unrolled threefry (the other backends' lowering).

    On a CPU jax lowers each threefry hash as a rolled five-round loop. The nano model's initialisation holds 72 of
    them (a key derived per parameter, then its draw); XLA:CPU compiles every loop as its own computations and cannot
    fold a loop of constants, so the keys of the constant seed are hashed at run time. Unrolled, the key derivations
    fold away and the draws fuse: XLA compile 2.0-2.2 -> 1.3-1.5 s for the nano model at INIT_COMPILER_OPTIONS
    (2-core AVX-512 CPU; lowering 0.5 -> 0.7 s, the unrolled hash traced once per shape), the same integers (the
    same hash) and, at those options, bitwise the same parameters (tests/test_flax_startup.py).
    jax offers no public switch for this lowering, so the block registers jax's own two rules (private names of
    jax._src.random.threefry2x32) through the public mlir.register_lowering, and restores jax's CPU rule on exit (not
    whatever was registered before; not re-entrant); a jax without those names (one that lowers it otherwise) is
    left as it is. Not thread-safe: nothing else may lower for a CPU meanwhile.
    """
    try:
        from jax._src.random import threefry2x32  # private: see above
        unrolled, rolled = threefry2x32._threefry2x32_lowering_rule, threefry2x32._threefry2x32_cpu_lowering_rule
    except (ImportError, AttributeError):
        unrolled = rolled = None
    if unrolled is None:
        yield
        return
    mlir.register_lowering(jax_random.threefry2x32_p, unrolled, platform="cpu", inline=False)
    try:
        yield
    finally:
        mlir.register_lowering(jax_random.threefry2x32_p, rolled, platform="cpu")


def build_model(build: Callable[[], nnx.Module]) -> nnx.Module:
    """`build()` (a model's construction) run as one jitted program, compiled quickly on a CPU with the same bits.

    One program, not eager construction: eagerly, every initializer of every shape compiles on its own (103 XLA
    programs, 7.0 s for the nano model on a 2-core CPU, against 4.5 s jitted at the default options then, 2.1 s
    now), with bitwise the same parameters.
    On a CPU the program is lowered with unrolled_threefry_on_cpu and compiled with INIT_COMPILER_OPTIONS.
    nnx.jit takes no compiler options, so the model crosses jax.jit as nnx.split's (graph, state).
    """
    with unrolled_threefry_on_cpu():  # changes CPU lowerings only
        lowered = jax.jit(lambda: nnx.split(build())).trace().lower()
    options = INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    graphdef, state = lowered.compile(compiler_options=options)()
    return nnx.merge(graphdef, state)


def initial_optimizer_state(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """`optimizer.init(params)` for make_optimizer's chain, made on the host as numpy zeros of the shapes it gives.

    Every state that chain starts from is zeros (AdamW's step count and moments; clipping and the schedule keep
    none or a count), so no XLA program is compiled for it: this takes 4 ms for the nano model on a 2-core CPU, where
    a jitted optimizer.init took 0.2 s (1.1 s eagerly: each zeros_like of each shape its own dispatch). A chain that
    starts elsewhere (inject_hyperparams, say) would need optimizer.init again: tests/test_flax_startup.py compares
    this with optax's own init, leaf for leaf, with and without clipping.
    """
    shapes = jax.eval_shape(optimizer.init, params)  # traces optax's init, computes nothing
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)


def create_model_and_state(config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh,
                           steps_per_epoch: int) -> tuple[nnx.GraphDef, TrainState, Any, optax.GradientTransformation]:
    """The model split into (graph, params, rest), with params and optimiser state replicated over the mesh.

    The parameters are the seed's initialisation, or the weights of --pretrained (the head kept at its
    initialisation when its class count differs); raises ConfigError when those weights do not fit.
    """
    dtype = jnp.bfloat16 if config.precision == "bf16" else jnp.float32
    set_arithmetic(config.precision)  # full float32 in fp32, as the Lightning stack's
    model = build_model(lambda: create_model(config.model, num_classes,
                                             nnx.Rngs(params=config.seed, dropout=config.seed), img_size=config.img_size,
                                             drop_path_rate=config.drop_path, dtype=dtype))
    if config.pretrained:
        run_config.load_pretrained(load_pretrained, model, config.pretrained, announce=jax.process_index() == 0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Plain nested dicts of arrays: each jitted call flattens them far faster than nnx.State's Variables.
    params, rest = params.to_pure_dict(), rest.to_pure_dict()
    optimizer = make_optimizer(config, params, steps_per_epoch)
    state = TrainState(step=np.zeros((), np.int32), params=params, opt_state=initial_optimizer_state(optimizer, params))
    return graphdef, replicate(state, mesh), replicate(rest, mesh), optimizer


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of -sum(targets * log_softmax(logits)): the training loss on soft targets [B, classes]."""
    return optax.softmax_cross_entropy(logits, targets).mean()


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    mesh: Mesh, num_classes: int) -> Callable:
    """jit(state, metrics, rest, images, labels[, targets]) -> (state, metrics, {loss, accuracy}); state and metrics
    donated. `targets` (soft, from shared_data.augment) come with --augment official; without them the targets are
    the label-smoothed one-hot labels."""
    dropout_root = jax.random.fold_in(jax.random.key(config.seed), _DROPOUT_STREAM)
    smoothing = config.label_smoothing

    def train_step(state: TrainState, metrics: TrainMetrics, rest: Any, images: jax.Array, labels: jax.Array,
                   targets: jax.Array | None = None):
        model = nnx.merge(graphdef, state.params, rest)
        # A fresh key every step, a pure function of (seed, step): resuming replays the same stream.
        nnx.reseed(model, dropout=jax.random.fold_in(dropout_root, state.step))
        inputs = input_pipeline.normalize_images(images)
        if targets is None:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)

        def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
            logits = model(inputs)
            return soft_target_cross_entropy(logits, targets), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        grads = grads.to_pure_dict()
        with jax.named_scope("optimizer"):  # names the update's operations in profiles (shared_data.op_profile)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        batch_metrics = TrainMetrics.single_from_model_output(loss=loss, logits=logits, labels=labels)
        return new_state, metrics.merge(batch_metrics), batch_metrics.compute()

    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    batch_arrays = 3 if config.augment == augment.OFFICIAL else 2
    return jax.jit(
        train_step, in_shardings=(replicated, replicated, replicated) + (sharded,) * batch_arrays,
        out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1),
    )


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh) -> Callable:
    """jit(params, rest, metrics, images, labels, mask) -> metrics: plain cross-entropy, top-1, top-5 of mask-1 rows."""

    def eval_step(params: Any, rest: Any, metrics: EvalMetrics, images: jax.Array, labels: jax.Array, mask: jax.Array):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        logits = model(input_pipeline.normalize_images(images))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        top5 = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
        batch_metrics = EvalMetrics.single_from_model_output(logits=logits, labels=labels, loss=loss, top5=top5,
                                                             mask=mask)
        return metrics.merge(batch_metrics)

    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    return jax.jit(eval_step, in_shardings=(replicated, replicated, replicated, sharded, sharded, sharded),
                   out_shardings=replicated, donate_argnums=(2,))
