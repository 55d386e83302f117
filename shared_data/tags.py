"""The TensorBoard tag names and units both stacks write, defined once so the traces can be diffed."""

# The clock, defined once; both stacks measure these the same way (shared_data.clock), in seconds.
# - completion of step k: the moment step k's work finished, measured by each stack as faithfully as it can:
#     torch on a CPU (eager or compiled), where the step runs synchronously: when the optimiser step returns, on the
#       host's perf_counter;
#     torch on a GPU: a CUDA event recorded after the optimiser step; a step's time is the device's elapsed_time
#       between consecutive events, read one step later without synchronising the device every step;
#     JAX, whose dispatch is asynchronous on every device: the host's perf_counter when step k's outputs become
#       ready, stamped by a thread that waits on them (jax.block_until_ready), so the stamp does not wait for the
#       loop's next fetch. The loop keeps one step in flight: it waits for step k before it queues step k+2. The
#       stamp can lag the true end by the thread's wake-up; measured against steps each closed by block_until_ready
#       in the loop (bench.clock_check), the medians agree to within the measurement's noise (docs/performance.md).
# - step time: the interval between the completions of consecutive optimiser steps, less the host time spent
#   between them in a checkpoint save or in starting or stopping a profile; an epoch's first step (or a resumed run's)
#   counts from the start of the epoch's training;
# - data wait: the host time spent fetching the step's own batch from the loader, counted inside the step's interval
#   (a fetch that overlapped the previous step's computation counts from that step's completion); where completion
#   is device time (torch on a GPU) the host's fetch cannot be placed on it, and the wait is capped at the step time;
# - compute: step time minus data wait (the device's work and whatever host work it did not hide);
# - evaluation: a whole validation pass, from its first batch to its metrics on the host;
# - checkpoint: the time saving blocked training (an asynchronous save's background writing excluded);
# - compilation: what the first step costs beyond a steady step (first step time minus the median step time).

# Step = global optimiser step.
TRAIN_LOSS = "train/loss"
TRAIN_ACCURACY = "train/accuracy"
TRAIN_LR = "train/lr"
STEP_TIME = "time/step_s"
DATA_WAIT_TIME = "time/data_wait_s"
COMPUTE_TIME = "time/compute_s"
FIRST_STEP_TIME = "time/first_step_s"  # once, at step 1: includes compilation and allocation

# Step = epoch number, 1-based.
EPOCH_TRAIN_TIME = "epoch/train_time_s"
EPOCH_VAL_TIME = "epoch/val_time_s"
EPOCH_TRAIN_IMAGES_PER_S = "epoch/train_images_per_s"
EPOCH_VAL_IMAGES_PER_S = "epoch/val_images_per_s"
EPOCH_CHECKPOINT_TIME = "epoch/checkpoint_time_s"
EPOCH_WALL_TIME = "epoch/wall_time_s"  # the whole epoch, logging and bookkeeping included
# Optimiser steps that epoch/train_time_s covers: fewer than the epoch's steps when a resume split the epoch
# (a partial epoch, whose speed figures say nothing about the stack).
EPOCH_STEPS_TIMED = "epoch/steps_timed"
VAL_LOSS = "val/loss"
VAL_ACCURACY = "val/accuracy"
VAL_ACCURACY_TOP5 = "val/accuracy_top5"
HOST_PEAK_MB = "memory/host_peak_mb"
DEVICE_PEAK_MB = "memory/device_peak_mb"  # only where the device reports it

PER_STEP = (TRAIN_LOSS, TRAIN_ACCURACY, TRAIN_LR, STEP_TIME, DATA_WAIT_TIME, COMPUTE_TIME)
PER_EPOCH = (
    EPOCH_TRAIN_TIME, EPOCH_VAL_TIME, EPOCH_TRAIN_IMAGES_PER_S, EPOCH_VAL_IMAGES_PER_S,
    EPOCH_CHECKPOINT_TIME, EPOCH_WALL_TIME, EPOCH_STEPS_TIMED, VAL_LOSS, VAL_ACCURACY, VAL_ACCURACY_TOP5, HOST_PEAK_MB,
)
# Every tag whose TensorBoard step is the epoch number.
EPOCH_AXIS = PER_EPOCH + (DEVICE_PEAK_MB,)
# Every tag a run on any device must write (DEVICE_PEAK_MB only where the device reports memory).
REQUIRED = PER_STEP + (FIRST_STEP_TIME,) + PER_EPOCH

# Once per run, when its training ends, at its last global step: the outcome the HParams dashboard compares
# (shared_data.dashboards). Not in REQUIRED: an interrupted run has none.
RUN_BEST_VAL_ACCURACY = "run/best_val_accuracy"  # 0..1, the best of every epoch's val/accuracy
RUN_MEDIAN_STEP_TIME = "run/median_step_s"  # the median time/step_s, every step but the first (compilation)
RUN_TRAIN_IMAGES_PER_S = "run/train_images_per_s"  # summary.json's: the median over the whole epochs
RUN_OUTCOME = (RUN_BEST_VAL_ACCURACY, RUN_MEDIAN_STEP_TIME, RUN_TRAIN_IMAGES_PER_S)


# bf16 training, defined once (--precision bf16, both stacks). The reference is mixed precision as PyTorch's autocast
# does it on a GPU, because it is what a PyTorch user gets: torch runs under torch.autocast(dtype=torch.bfloat16)
# (Lightning's "bf16-mixed"), the Flax model is built with dtype=jnp.bfloat16. Both models follow it explicitly, so the
# same arithmetic holds on a CPU as on a GPU: on a CPU, autocast alone keeps layer_norm, softmax and GELU in bf16
# after a bf16 input (on a GPU, layer_norm and softmax are on its float32 list), so the torch model computes its
# LayerNorms and the attention logits in float32 with autocast off.
# - bf16: the inputs of every matmul and convolution and what they return: the patch-embedding convolution; the qkv,
#   output-projection, MLP (fc1, fc2), patch-merging and head linears; the softmax's probabilities times the values.
#   The element-wise steps between two of them (the q and v biases, GELU, dropout) take and return bf16; GELU is
#   computed inside in float32, as PyTorch's kernels do.
# - float32: the parameters, their gradients and the optimiser state; the residual stream (from the patch embedding's
#   norm on: the absolute position embedding, each block's residual adds and drop path); every LayerNorm's statistics
#   and output; the attention logits (the normalised queries and keys, their product, the temperature), the position
#   bias (its MLP included), the shift mask and the softmax; the pooled features; the loss.
# - Every upcast goes to the promoted type of its input and float32, never down: a float64 model (torch's
#   model.double(), the Flax model's dtype=jnp.float64 under jax_enable_x64) computes in float64 throughout.
# Where a framework cannot follow it exactly, so that the stacks agree on which tensors are bf16 but not bit for bit:
# - PyTorch adds a linear's or the convolution's bias to the product before rounding to bf16, once; Flax's nnx.Linear
#   and nnx.Conv round the product to bf16, then add the bias in bf16 and round again (the Flax model adds the q and v
#   biases after the qkv product too);
# - XLA may leave out a rounding to bf16 inside a fused computation (its default xla_allow_excess_precision), keeping
#   a product in float32 until the next float32 step;
# - the torch model returns the head's bf16 logits, which the loss upcasts; the Flax model returns them in float32.
# The definition in one line, for config.json's "arithmetic" and the report's runs table:
BF16_SUMMARY = ("bf16 as shared_data.tags defines it: matmul and convolution inputs and outputs bf16; parameters, "
                "optimiser state, residual stream, norms, attention logits, bias, mask, softmax and loss float32")
# Where the stacks' bf16 differs, in one line (the report prints it under a bf16 comparison):
BF16_DIFFERENCES = ("PyTorch rounds a linear's product and bias once to bf16, Flax rounds the product then the sum; "
                    "XLA may keep a fused product in float32 (xla_allow_excess_precision); the torch model returns "
                    "bf16 logits, the Flax model float32 ones")
# The named tensors that tests/test_precision.py reads in each stack's bf16 training step:
BF16_TENSORS = (
    "patch embedding convolution", "qkv projection", "attention-weighted values", "attention output projection",
    "MLP hidden", "GELU", "MLP output", "patch merging reduction", "head",
)
FLOAT32_TENSORS = (
    "parameters", "gradients", "residual stream", "norm outputs", "normalised queries and keys", "position bias MLP",
    "position bias", "attention logits", "softmax", "pooled features", "loss",
)
