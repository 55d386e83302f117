"""The TensorBoard dashboards both stacks fill, defined once: the custom-scalars layout and the HParams of each run."""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from shared_data import augment, event_files, run_config, run_report, tags

# The custom-scalars layout: each chart overlays one tag of every run in the logdir (both stacks, eager and
# compiled, every repeat), a line per run. TensorBoard merges the layouts of all runs by category title and skips a
# chart already seen, so each run writing this same layout leaves one layout however many runs or resumes wrote it.
LAYOUT: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Both stacks: speed", (
        (tags.STEP_TIME, "step time, s (per global step)"),
        (tags.DATA_WAIT_TIME, "data wait, s (per global step)"),
        (tags.EPOCH_TRAIN_IMAGES_PER_S, "train images/s (per epoch)"),
        (tags.EPOCH_VAL_IMAGES_PER_S, "validation images/s (per epoch)"),
    )),
    ("Both stacks: learning", (
        (tags.TRAIN_LOSS, "train loss (per global step)"),
        (tags.VAL_ACCURACY, "val top-1 accuracy, 0..1 (per epoch)"),
    )),
    ("Both stacks: memory", (
        (tags.HOST_PEAK_MB, "host peak memory, MB (per epoch)"),
        (tags.DEVICE_PEAK_MB, "device peak memory, MB (per epoch; where the device reports it)"),
    )),
)

# The HParams keys: config.json's names (the flag behind each), their display names and, where the values are a
# closed set, its domain; the same in both stacks. "compile" is torch.compile: always False in the Flax stack, whose
# XLA compiles every jitted step.
HPARAMS: tuple[hp.HParam, ...] = (
    hp.HParam("stack", hp.Discrete(list(run_config.STACKS)), display_name="stack"),
    hp.HParam("compile", hp.Discrete([False, True]), display_name="compiled"),
    hp.HParam("model", display_name="model"),
    hp.HParam("img_size", display_name="image size"),
    hp.HParam("batch_size", display_name="global batch"),
    hp.HParam("precision", hp.Discrete(list(run_config.PRECISIONS)), display_name="precision"),
    hp.HParam("augment", hp.Discrete(list(augment.AUGMENTS)), display_name="augmentation"),
    hp.HParam("seed", display_name="seed"),
    hp.HParam("dataset", hp.Discrete(list(run_config.DATASETS)), display_name="dataset",
              description="the dataset trained on (config.json's: 'synthetic' after a fallback)"),
    hp.HParam("device", display_name="device"),
)
# The outcome columns, each the last value of its tag (shared_data.tags) in the run.
METRICS: tuple[hp.Metric, ...] = (
    hp.Metric(tags.RUN_BEST_VAL_ACCURACY, display_name="best val accuracy"),
    hp.Metric(tags.RUN_MEDIAN_STEP_TIME, display_name="median step s"),
    hp.Metric(tags.RUN_TRAIN_IMAGES_PER_S, display_name="train images/s"),
)


def layout() -> layout_pb2.Layout:
    """The custom-scalars layout of LAYOUT: one multiline chart per tag, matching that tag exactly in every run."""
    return layout_pb2.Layout(category=[
        layout_pb2.Category(title=title, chart=[
            layout_pb2.Chart(title=f"{tag}: {meaning}",
                             multiline=layout_pb2.MultilineChartContent(tag=[f"^{re.escape(tag)}$"]))
            for tag, meaning in charts])
        for title, charts in LAYOUT])


def layout_summary() -> Summary:
    """The layout as the custom-scalars plugin reads it: its config tag, holding the serialized Layout."""
    # What tensorboard.plugins.custom_scalar.summary.pb builds; that function needs TensorFlow, this does not.
    return Summary(value=[Summary.Value(
        tag=custom_scalar_metadata.CONFIG_SUMMARY_TAG, metadata=custom_scalar_metadata.create_summary_metadata(),
        tensor=tensor_util.make_tensor_proto(layout().SerializeToString()))])


def hparams(record: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The HPARAMS values of a run from its config.json `record`; raises KeyError naming a key it lacks."""
    return {param.name: record[param.name] for param in HPARAMS}


def run_start(run_dir: str | os.PathLike) -> list[Summary]:
    """What each run writes at TensorBoard step 0 when its process starts (a resume too): the layout, the HParams
    experiment (its keys and metrics) and the run's session, named <stack>/<run name>, with the settings of its
    config.json. TensorBoard keeps a run's first session, which a resume's copy repeats."""
    record = json.loads((Path(run_dir) / "config.json").read_text())
    session = hp.hparams_pb({param: record[param.name] for param in HPARAMS},
                            trial_id=f"{record['stack']}/{record['run_name']}")
    return [layout_summary(), hp.hparams_config_pb(list(HPARAMS), list(METRICS)), session]


def outcome(run_dir: str | os.PathLike, history: list[dict[str, float]],
            best_val_accuracy: float | None = None) -> dict[str, float]:
    """The outcome tags of a run whose training ended (tags.RUN_OUTCOME), from the epoch `history` (run_report's
    entries) and the step times in its event files, which must be flushed: those of every process of the run, a
    resumed one included. A figure the run has none of (no step tags: --step-timing off) is left out."""
    step_times = sorted((point.step, point.value) for point in event_files.read_points(run_dir)
                        if point.tag == tags.STEP_TIME)
    # Every step but the first, which holds the compilation: the median report/stats.py reports.
    later = [seconds for _, seconds in step_times[1:]] or [seconds for _, seconds in step_times]
    values = {tags.RUN_BEST_VAL_ACCURACY: run_report.best_accuracy(history, best_val_accuracy),
              tags.RUN_MEDIAN_STEP_TIME: statistics.median(later) if later else None,
              tags.RUN_TRAIN_IMAGES_PER_S: run_report.whole_epoch_median(history, "train_images_per_s")}
    return {tag: float(value) for tag, value in values.items() if value is not None}


def write_layout(logdir: str | os.PathLike) -> None:
    """Write the layout alone into an event file directly in `logdir` (its root run, '.'): a benchmark's runs
    folder shows it before any run has started."""
    writer = EventFileWriter(str(logdir))
    writer.add_event(Event(wall_time=time.time(), step=0, summary=layout_summary()))
    writer.close()
