"""TensorBoard layout of an experiment: grouped scalar tags, one HParams experiment with domains."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from poh_tune.io import TB_DIR
from poh_tune.record import ALPHA, PER_ITERATION, PER_SEED

# Scalar metrics of an epoch's record -> "group/name" TensorBoard tags. TensorBoard
# makes one card group per text before the first "/", so a trial shows about ten groups instead
# of 50 loose cards. Keys not listed here fall into the patterns of `tb_tag`.
TAGS = {
    "tau": "tau/dev", "tau_all": "tau/dev_all_pairs", "best_tau": "tau/best_dev",
    "test_tau": "tau/test", "test_tau_all": "tau/test_all_pairs", "best_epoch": "tau/best_epoch",
    "accuracy": "accuracy/dev", "perfect_sort": "accuracy/dev_perfect_sort",
    "test_accuracy": "accuracy/test", "test_perfect_sort": "accuracy/test_perfect_sort",
    "train_loss": "loss/train", "train_entropy": "entropy/train",
    "herfindahl": "routing/herfindahl", "max_alpha": "routing/max_alpha",
    "routing_healthy": "routing/healthy",
    "temperature": "schedule/temperature", "entropy_weight": "schedule/entropy_weight",
    "controller_frozen": "schedule/controller_frozen",
    "epoch_s": "trial/epoch_s",
}
EPOCHS_DONE_TAG = "trial/epochs_done"  # HParams metric: an ASHA stop shows as fewer epochs
STOPPED_EARLY_TAG = "trial/stopped_early"  # written by the driver when the trial has ended
# HParams metrics (tag, what it is); TensorBoard shows each session's last value of the tag.
HPARAMS_METRICS = (
    ("tau/dev", "dev τ (mask-aware), mean over seeds, last epoch"),
    ("tau/best_dev", "best dev τ, mean over seeds"),
    ("tau/test", "test τ at the best dev epoch, mean over seeds"),
    ("tau/test_all_pairs", "test all-pairs τ at the best dev epoch"),
    (EPOCHS_DONE_TAG, "epochs trained (fewer than `epochs`: ASHA stopped the trial)"),
    (STOPPED_EARLY_TAG, "1 if the scheduler stopped the trial before its last epoch"),
)
_CI = "_ci95"


def tb_tag(key: str) -> str | None:
    """The grouped TensorBoard tag of a scalar metric of the record; None for the step itself
    ("epoch"). Per-iteration and per-seed values are tagged by `tb_scalars`."""
    if key == "epoch":
        return None
    if key in TAGS:
        return TAGS[key]
    if key.startswith("train_loss_"):
        return f"loss/train_{key[len('train_loss_'):]}"
    if key.endswith(_CI):
        return f"ci95/{key[:-len(_CI)]}"
    return f"other/{key}"


def tb_scalars(record: dict[str, Any], max_inner_iters: int) -> dict[str, float]:
    """Finite numeric values of one epoch's record (poh_tune.record) under grouped tags, plus
    trial/epochs_done.

    Inner iterations and heads are numbered from 1, as in the report's plots, and iterations are
    zero-padded so that TensorBoard's text sort keeps their order: tau_iter -> tau/iter_01, ...;
    alpha -> alpha/iter_01_head_1, ...; per_seed -> seeds/<metric>_seed_<seed>.
    """
    width = max(2, len(str(max_inner_iters)))
    tagged: list[tuple[str | None, Any]] = []
    for k, v in record.items():
        if k in PER_ITERATION:
            group = k[:-len("_iter")]
            tagged += [(f"{group}/iter_{t + 1:0{width}d}", x) for t, x in enumerate(v)]
        elif k == ALPHA:
            tagged += [(f"alpha/iter_{t + 1:0{width}d}_head_{h + 1}", x)
                       for t, row in enumerate(v) for h, x in enumerate(row)]
        elif k == PER_SEED:
            tagged += [(f"seeds/{name}_seed_{m['seed']}", x)
                       for m in v for name, x in m.items() if name != "seed"]
        else:
            tagged.append((tb_tag(k), v))
    out = {tag: float(v) for tag, v in tagged
           if tag is not None and isinstance(v, (int, float)) and math.isfinite(float(v))}
    if "epoch" in record:
        out[EPOCHS_DONE_TAG] = float(record["epoch"])
    return out


def hparam_values(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """A trial's config as HParams values: numbers stay numbers, bools bools.

    HParams knows numbers, strings and bools only: a list (the seeds) becomes its text, and its
    length is added as `n_seeds`.
    """
    out: dict[str, bool | int | float | str] = {}
    for k, v in config.items():
        if isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = ",".join(map(str, v))
            if k == "seeds":
                out["n_seeds"] = len(v)
        elif v is not None:
            out[k] = str(v)
    return out


def _value(v: bool | int | float | str):
    """An HParams value. HParams has no integer type (its DataType is string, bool or float64,
    its values protobuf Values, whose only number is a double), so an integer goes as the double
    equal to it: still a number that TensorBoard filters and sorts, which text would not be."""
    from google.protobuf import struct_pb2

    if isinstance(v, bool):
        return struct_pb2.Value(bool_value=v)
    if isinstance(v, (int, float)):
        return struct_pb2.Value(number_value=float(v))
    return struct_pb2.Value(string_value=str(v))


def _summary(tag: str, **plugin_data: Any):
    """A tensorboardX Summary carrying HParams plugin data under `tag`."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION,
                                                **plugin_data)
    smd = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=smd)])


def write_session_start(writer: Any, config: dict[str, Any], trial_id: str) -> None:
    """A trial's HParams session (its hyperparameters); the driver writes how it ended."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    ssi = plugin_data_pb2.SessionStartInfo(group_name=trial_id, start_time_secs=time.time())
    for k, v in hparam_values(config).items():
        ssi.hparams[k].CopyFrom(_value(v))
    writer.file_writer.add_summary(_summary(metadata.SESSION_START_INFO_TAG,
                                            session_start_info=ssi))


def _type(v: Any) -> int:
    from tensorboard.plugins.hparams import api_pb2

    if isinstance(v, bool):
        return api_pb2.DATA_TYPE_BOOL
    if isinstance(v, (int, float)):
        return api_pb2.DATA_TYPE_FLOAT64
    return api_pb2.DATA_TYPE_STRING


def hparams_experiment(base: dict[str, Any], domains: dict[str, dict[str, Any]]):
    """The experiment's HParams definition (a tensorboard api_pb2.Experiment).

    Args:
        base: the base config (every hyperparameter, with its constant value).
        domains: swept key -> {"values": [...]} (a grid, or an Optuna choice) or
            {"low": x, "high": y} (an Optuna interval).
    Returns:
        The Experiment: swept keys first with their domains and `differs` set, then the constant
        ones with their single value.
    """
    from tensorboard.plugins.hparams import api_pb2

    exp = api_pb2.Experiment(name="poh_tune", time_created_secs=time.time())
    values = hparam_values(base)
    for key in [*domains, *(k for k in values if k not in domains)]:
        info = exp.hparam_infos.add(name=key, differs=key in domains)
        dom = domains.get(key)
        if dom is not None and "values" in dom:
            vals = [hparam_values({key: v})[key] for v in dom["values"]]
            info.type = _type(vals[0]) if len({_type(v) for v in vals}) == 1 else \
                api_pb2.DATA_TYPE_STRING
            if info.type == api_pb2.DATA_TYPE_STRING:
                vals = [str(v) for v in vals]
            info.domain_discrete.extend(vals)
        elif dom is not None:
            info.type = api_pb2.DATA_TYPE_FLOAT64
            info.domain_interval.min_value = float(dom["low"])
            info.domain_interval.max_value = float(dom["high"])
        else:
            info.type = _type(values[key])
            info.domain_discrete.append(values[key])
    for tag, description in HPARAMS_METRICS:
        exp.metric_infos.add(name=api_pb2.MetricName(tag=tag), display_name=tag,
                             description=description)
    return exp


def write_hparams_experiment(exp_dir: Path, base: dict[str, Any],
                             domains: dict[str, dict[str, Any]]) -> None:
    """Write the one HParams experiment of the run into the experiment directory's own events.

    TensorBoard reads a single experiment definition per logdir (the first it finds); one per
    trial left it to pick any of them, with no domains and every hyperparameter constant.
    """
    from tensorboard.plugins.hparams import metadata
    from tensorboardX import SummaryWriter

    # A file name of its own: tensorboardX names files by the second and would overwrite one.
    writer = SummaryWriter(str(exp_dir), filename_suffix=".hparams")
    try:
        writer.file_writer.add_summary(_summary(metadata.EXPERIMENT_TAG,
                                                experiment=hparams_experiment(base, domains)))
    finally:
        writer.close()


def write_session_end(tb_dir: Path, status: str, epochs_done: int, stopped_early: bool) -> None:
    """How a trial ended, in its own TensorBoard run: HParams status and trial/stopped_early.

    Args:
        tb_dir: the trial's TensorBoard folder.
        status: "TERMINATED" (success) or "ERROR" (failure), as results.csv.
        epochs_done: the last epoch it logged (the step of the stopped_early scalar).
        stopped_early: the scheduler stopped it before its last epoch.
    """
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboardX import SummaryWriter

    sei = plugin_data_pb2.SessionEndInfo(
        status=api_pb2.STATUS_FAILURE if status == "ERROR" else api_pb2.STATUS_SUCCESS,
        end_time_secs=time.time())
    writer = SummaryWriter(str(tb_dir), filename_suffix=".end")  # never the trial's file name
    try:
        writer.add_scalar(STOPPED_EARLY_TAG, float(stopped_early), max(0, epochs_done))
        writer.file_writer.add_summary(_summary(metadata.SESSION_END_INFO_TAG,
                                                session_end_info=sei))
    finally:
        writer.close()


class TensorBoardWriter:
    """A configuration's TensorBoard run, as a RecordWriter (poh_tune.trackers): its HParams
    session start and grouped scalars in `<folder>/tb/`. How it ended is written by the driver
    (write_session_end), which also knows whether a scheduler stopped it early.
    """

    name = "TensorBoard"

    def __init__(self) -> None:
        self.writer: Any = None
        self.max_inner_iters = 1

    def open(self, config: dict[str, Any], run: Any) -> bool:
        """Args: config, the resolved TrialConfig dict; run, a trackers.RunInfo. Returns True
        when nothing was logged before (a reopened run's event files hold its epochs)."""
        from tensorboardX import SummaryWriter

        self.max_inner_iters = int(config["max_inner_iters"])
        self.writer = SummaryWriter(str(Path(run.folder) / TB_DIR), flush_secs=5)
        if run.epochs_logged == 0:
            write_session_start(self.writer, config, run.trial_id)
        return run.epochs_logged == 0

    def epoch(self, record: dict[str, Any], step: int) -> None:
        for tag, v in tb_scalars(record, self.max_inner_iters).items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()
