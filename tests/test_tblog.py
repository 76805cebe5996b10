"""TensorBoard layout: grouped tags, typed HParams, one experiment with domains (read back by TensorBoard)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from poh_tune.record import flat
from poh_tune.tblog import (
    EPOCHS_DONE_TAG,
    STOPPED_EARLY_TAG,
    hparam_values,
    tb_scalars,
    tb_tag,
    write_hparams_experiment,
    write_session_end,
    write_session_start,
)
from poh_tune.trainer import TrialRunner


def test_tags_are_grouped_numbered_from_one_and_sort():
    assert tb_tag("tau") == "tau/dev"
    assert tb_tag("train_loss") == "loss/train" and tb_tag("train_loss_rank") == "loss/train_rank"
    assert tb_tag("herfindahl") == "routing/herfindahl"
    assert tb_tag("tau_ci95") == "ci95/tau"
    assert tb_tag("epoch") is None
    record = {"epoch": 2, "tau": 0.5, "tau_iter": [0.1 * t for t in range(12)],
              "entropy_iter": [1.0] * 12, "alpha": [[0.5, 0.5]] * 12,
              "per_seed": [{"seed": 3, "tau": 0.4, "test_tau": 0.6}]}
    tags = tb_scalars(record, 12)
    assert tags["tau/iter_01"] == 0.0 and tags["tau/iter_12"] == pytest.approx(1.1)
    assert tags["entropy/iter_12"] == 1.0
    assert tags["alpha/iter_03_head_1"] == 0.5 and tags["alpha/iter_12_head_2"] == 0.5
    assert tags["seeds/test_tau_seed_3"] == 0.6 and tags["seeds/tau_seed_3"] == 0.4
    assert len(tags) == 1 + 12 + 12 + 24 + 2 + 1  # + trial/epochs_done
    assert "tau/iter_100" in tb_scalars({"tau_iter": [0.0] * 100}, 100)
    # Zero-padded: the text order TensorBoard uses is the iteration order.
    iters = [t for t in tags if t.startswith("tau/iter_")]
    assert sorted(iters) == iters


def test_a_real_epoch_maps_to_few_groups_and_keeps_every_value(tiny_cfg):
    import torch

    torch.set_num_threads(1)
    m = TrialRunner(tiny_cfg.replace(epochs=1), "cpu").run_epoch()
    scalars = tb_scalars(m, tiny_cfg.max_inner_iters)
    numeric = [k for k, v in flat(m).items() if isinstance(v, (int, float)) and k != "epoch"
               and math.isfinite(v)]
    assert len(scalars) == len(numeric) + 1  # one tag per value, no collisions, + epochs_done
    assert not [t for t in scalars if t.startswith("ci95/")]  # 2 seeds: no CI (small-n rule)
    groups = {t.split("/")[0] for t in scalars}
    assert len(groups) <= 15, groups
    assert "other" not in groups, [t for t in scalars if t.startswith("other/")]
    assert scalars["tau/dev"] == pytest.approx(m["tau"])
    assert scalars[f"tau/iter_{tiny_cfg.max_inner_iters:02d}"] == pytest.approx(m["tau_iter"][-1])
    assert scalars[EPOCHS_DONE_TAG] == 1.0


def test_hparam_values_keep_types():
    v = hparam_values({"epochs": 3, "lr": 1e-3, "diagnostics": True, "model": "pot",
                       "seeds": [1, 2, 3]})
    assert v == {"epochs": 3, "lr": 1e-3, "diagnostics": True, "model": "pot",
                 "seeds": "1,2,3", "n_seeds": 3}
    assert type(v["epochs"]) is int and type(v["diagnostics"]) is bool


def test_integers_reach_hparams_as_exact_doubles_because_it_has_no_integer_type():
    """HParams' schema types and its value message have one numeric kind, a double: so an
    integer goes as a number (filterable and sortable, which a string would not be), and the
    double it becomes is the integer exactly. If TensorBoard gains an integer type, this fails."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2

    from poh_tune.tblog import _type, _value

    assert not [n for n in api_pb2.DataType.keys() if "INT" in n]
    assert [f.name for f in struct_pb2.Value.DESCRIPTOR.oneofs_by_name["kind"].fields] == [
        "null_value", "number_value", "string_value", "bool_value", "struct_value", "list_value"]
    for n in (0, 12, 2**53):
        v = _value(n)
        assert v.WhichOneof("kind") == "number_value" and int(v.number_value) == n
        assert v.number_value.is_integer()
    assert _type(12) == api_pb2.DATA_TYPE_FLOAT64 and _value(True).bool_value is True


def _hparams_content(run_dir: Path) -> dict[str, bytes]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    return ea.PluginTagToContent("hparams")


def test_experiment_session_start_and_end_read_back(tmp_path, tiny_cfg):
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboardX import SummaryWriter

    base = tiny_cfg.to_dict()
    write_hparams_experiment(tmp_path, base, {"max_inner_iters": {"values": [1, 2, 4]},
                                              "entropy_reg": {"low": 2e-4, "high": 5e-3},
                                              "model": {"values": ["baseline", "pot"]}})
    content = _hparams_content(tmp_path)
    exp = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.EXPERIMENT_TAG]).experiment
    infos = {h.name: h for h in exp.hparam_infos}
    assert [h.name for h in exp.hparam_infos][:3] == ["max_inner_iters", "entropy_reg", "model"]
    assert {k for k, h in infos.items() if h.differs} == {"max_inner_iters", "entropy_reg",
                                                          "model"}
    assert list(infos["max_inner_iters"].domain_discrete) == [1, 2, 4]
    assert infos["max_inner_iters"].type == api_pb2.DATA_TYPE_FLOAT64
    assert (infos["entropy_reg"].domain_interval.min_value,
            infos["entropy_reg"].domain_interval.max_value) == (2e-4, 5e-3)
    assert list(infos["model"].domain_discrete) == ["baseline", "pot"]
    assert infos["model"].type == api_pb2.DATA_TYPE_STRING
    assert infos["diagnostics"].type == api_pb2.DATA_TYPE_BOOL
    assert list(infos["seeds"].domain_discrete) == ["1,2"] and not infos["seeds"].differs
    assert list(infos["n_seeds"].domain_discrete) == [2]
    assert "tau/dev" in {m.name.tag for m in exp.metric_infos}

    tb = tmp_path / "trial" / "tb"
    writer = SummaryWriter(str(tb))
    write_session_start(writer, base, "t1")
    writer.close()
    write_session_end(tb, "TERMINATED", 2, stopped_early=True)
    content = _hparams_content(tb)
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content[metadata.SESSION_START_INFO_TAG]).session_start_info
    assert start.hparams["max_inner_iters"].number_value == tiny_cfg.max_inner_iters
    assert start.hparams["model"].string_value == "pot"
    assert start.hparams["diagnostics"].bool_value is True
    end = plugin_data_pb2.HParamsPluginData.FromString(
        content[metadata.SESSION_END_INFO_TAG]).session_end_info
    assert end.status == api_pb2.STATUS_SUCCESS
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars(STOPPED_EARLY_TAG)] == [(2, 1.0)]
