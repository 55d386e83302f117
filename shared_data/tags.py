"""The TensorBoard tag names and units both stacks write, defined once so the traces can be diffed."""

# The clock, defined once; both stacks measure these the same way, in seconds of the host's perf_counter.
# Both keep one step in flight: the host queues step k+1 before it waits for step k, and learns that step k
# is complete when it reads step k's loss.
# - step time: the interval between the completions of consecutive optimiser steps;
# - data wait: the host time spent obtaining the next batch from the loader within that interval;
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
