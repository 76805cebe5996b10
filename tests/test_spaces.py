"""Search-space files: one schema, one loader, errors that name the file, key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from poh_tune.config import ConfigError
from poh_tune.spaces import SPACES_DIR, canonical, grid_variants, load_space

GRID = SPACES_DIR / "document_grid.yaml"
OPTUNA = SPACES_DIR / "optuna_refine.yaml"


def test_document_grid_deduplicates_the_shared_default():
    space = load_space(GRID)
    assert space.base.array_len == 20 and space.base.epochs == 100
    assert space.base.seeds == (1, 2, 3, 4, 5) and space.base.batch_size == 32
    variants, membership = grid_variants(space)
    # 2 + 4 + 3 + 3 + 3 = 15 listed configurations; the default PoH-HRM appears in all five.
    assert len(variants) == 11
    assert len({canonical(v) for v in variants}) == 11
    default = {"model": "pot", "max_inner_iters": 12, "hrm_period": 4, "entropy_reg": 0.001,
               "temperature_init": 2.0}
    assert set(membership[canonical(default)]) == {
        "baseline_vs_hrm", "iterations", "hrm_period", "entropy_weight", "temperature_init"}
    assert sum(len(m) for m in membership.values()) == 15


def test_experiments_selectable_one_by_one():
    space = load_space(GRID)
    variants, _ = grid_variants(space, ["iterations"])
    assert sorted(v["max_inner_iters"] for v in variants) == [6, 8, 12, 16]
    with pytest.raises(ConfigError, match="iteration.*did you mean 'iterations'"):
        grid_variants(space, ["iteration"])


def test_smoke_keeps_the_structure():
    full, _ = grid_variants(load_space(GRID))
    space = load_space(GRID, smoke=True)
    small, membership = grid_variants(space)
    assert len(small) == len(full)
    assert space.base.array_len == 8 and space.base.epochs == 3 and space.base.seeds == (1, 2)
    iters = sorted(v["max_inner_iters"] for v in small if v["model"] == "pot"
                   and v["hrm_period"] == space.base.hrm_period
                   and v["entropy_reg"] == 0.001 and v["temperature_init"] == 2.0)
    assert iters == [1, 2, 3, 4]
    assert max(len(m) for m in membership.values()) == 5


def test_optuna_space():
    space = load_space(OPTUNA)
    assert set(space.search) == {"entropy_reg", "temperature_min", "temperature_init",
                                 "temperature_decay"}
    assert space.search["entropy_reg"]["type"] == "loguniform"
    assert space.scheduler == "asha" and space.metric == "tau" and space.metric_mode == "max"
    assert load_space(OPTUNA, smoke=True).num_samples <= 8


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


GOOD_GRID = "base: {epochs: 2}\nexperiments:\n  a: {sweep: {max_inner_iters: [1, 2]}}\n"


@pytest.mark.parametrize("text, needle", [
    ("base: {epochs: 2}\nexperimnts: {}\n", "unknown key 'experimnts'.*did you mean 'experiments'"),
    ("base: {epoch: 2}\nexperiments: {a: {}}\n", "base: unknown config key 'epoch'"),
    ("experiments:\n  a: {sweep: {max_inner_iters: [1, two]}}\n",
     "max_inner_iters='two': expected an integer"),
    ("experiments:\n  a: {sweep: {hrm_period: [0]}}\n", "hrm_period=0: must be >= 1"),
    ("experiments:\n  a: {sweep: {max_inner_iters: 3}}\n", "non-empty list"),
    ("experiments:\n  a: {sweep: {max_inner_iters: [1], hrm_period: 2}}\n",
     "experiments.a.sweep.hrm_period=2: expected a non-empty list"),
    ("experiments:\n  a: {sweep: {model: [pot], array_len: [12, 12]}}\n",
     "experiments.a.sweep.array_len=\\[12, 12\\]: a value is listed twice"),
    ("experiments:\n  a: {sweep: {model: [pot], value_levels: [0, 1]}}\n", "value_levels=1"),
    ("experiments:\n  a: {sweep: {model: [pot], arry_len: [12]}}\n",
     "unknown key 'arry_len'.*did you mean 'array_len'"),
    # each value fits the base; one combination does not
    ("experiments:\n  a: {sweep: {d_model: [32, 36], n_heads: [4, 8]}}\n",
     "sweep \\{'d_model': 36, 'n_heads': 8\\}: n_heads=8: must divide d_model=36"),
    ("search:\n  entropy_reg: {type: loguniform, low: 0, high: 0.01}\n",
     "entropy_reg.low=0: a log-uniform bound must be > 0"),
    ("search:\n  entropy_reg: {type: normal, low: 0.1, high: 1}\n", "type='normal'"),
    ("search:\n  entropy_reg: {type: uniform, low: 1, high: 0.1}\n", "low=1 must be < high=0.1"),
    ("search:\n  temperature_min: {type: uniform, low: 0.5, high: 3.0}\n",
     "temperature_min=3.0: must be <="),
    ("search:\n  temprature_min: {type: uniform, low: 0.5, high: 1}\n",
     "did you mean 'temperature_min'"),
    ("scheduler: hyperband\n" + GOOD_GRID, "scheduler='hyperband': expected one of fifo, asha"),
    ("asha: {grace_period: 0}\n" + GOOD_GRID, "asha.grace_period=0: must be >= 1"),
    ("resources: {cpu: 0}\n" + GOOD_GRID, "resources.cpu=0: must be > 0"),
    ("metric_mode: up\n" + GOOD_GRID, "metric_mode='up'"),
    ("base: [1, 2]\n", "base: expected a mapping"),
    ("base: {epochs: 2\n", "malformed YAML"),
])
def test_errors_name_file_key_and_value(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=needle) as e:
        load_space(p)
    assert str(p) in str(e.value)


def test_missing_file_and_swept_override(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_space(tmp_path / "nope.yaml")
    p = _write(tmp_path, GOOD_GRID)
    with pytest.raises(ConfigError, match="max_inner_iters is swept"):
        load_space(p, overrides={"max_inner_iters": 3})
    assert load_space(p, overrides={"epochs": 5}).base.epochs == 5


def test_what_a_file_leaves_out_takes_the_file_defaults(tmp_path):
    from poh_tune.config import TrialConfig
    from poh_tune.spaces import FILE_DEFAULTS

    space = load_space(_write(tmp_path, "experiments: {a: {}}\n"))
    assert space.name == "space" and space.description == ""  # the file's stem
    assert (space.metric, space.metric_mode, space.scheduler) == ("tau", "max", "fifo")
    assert (space.grace_period, space.reduction_factor) == (1, 2)
    assert (space.cpu, space.gpu, space.max_concurrent, space.num_samples, space.seed) == (
        1.0, 0.0, 0, 1, 0)
    assert space.base == TrialConfig()
    assert space.experiments[0].swept is None and space.experiments[0].description == ""
    assert {k: getattr(space, k) for k in ("metric", "scheduler", "num_samples")} == {
        k: FILE_DEFAULTS[k] for k in ("metric", "scheduler", "num_samples")}
    # a nested mapping given in part keeps the defaults of the keys it leaves out
    part = load_space(_write(tmp_path, "asha: {reduction_factor: 3}\nresources: {gpu: 0.5}\n"
                                       "experiments: {a: {}}\n"))
    assert (part.grace_period, part.reduction_factor, part.cpu, part.gpu) == (1, 3, 1.0, 0.5)


CROSS = """base: {epochs: 2, model: pot, array_len: 20}
experiments:
  length:
    sweep: {model: [baseline, pot], array_len: [12, 20, 50]}
  samples:
    sweep: {model: [baseline, pot], train_samples: [100, 1000]}
  single:
    sweep: {max_inner_iters: [6, 12]}
"""


def test_cross_product_sweeps_give_every_combination_deduplicated(tmp_path):
    import itertools

    space = load_space(_write(tmp_path, CROSS))
    length = space.experiments[0]
    assert length.keys == ("model", "array_len") and length.swept is None
    expected = [dict(model=m, array_len=n) for m, n in itertools.product(
        ["baseline", "pot"], [12, 20, 50])]
    assert length.points() == expected
    variants, membership = grid_variants(space, ["length"])
    assert len(variants) == 6
    assert [{k: v[k] for k in ("model", "array_len")} for v in variants] == expected
    variants, membership = grid_variants(space)
    # 6 + 4 + 2 listed; (model, L=20, 1000 samples, 12 iterations) is in all three (pot) or two
    # (baseline) experiments.
    listed = 6 + 4 + 2
    spec_pot = {"model": "pot", "array_len": 20, "train_samples": 1000, "max_inner_iters": 12}
    spec_base = {**spec_pot, "model": "baseline"}
    assert len(variants) == listed - 2 - 1
    assert len({canonical(v) for v in variants}) == len(variants)
    assert membership[canonical(spec_pot)] == ["length", "samples", "single"]
    assert membership[canonical(spec_base)] == ["length", "samples"]
    assert sum(len(m) for m in membership.values()) == listed
    # the one-key syntax of before: same Experiment, one key
    single = space.experiments[2]
    assert single.swept == "max_inner_iters" and single.points() == [
        {"max_inner_iters": 6}, {"max_inner_iters": 12}]
    with pytest.raises(ConfigError, match="array_len is swept"):
        load_space(_write(tmp_path, CROSS), overrides={"array_len": 30})


def test_smoke_keeps_a_swept_task_key_distinct_and_small(tmp_path):
    full = load_space(_write(tmp_path, CROSS))
    small = load_space(_write(tmp_path, CROSS), smoke=True)
    fv, _ = grid_variants(full)
    sv, membership = grid_variants(small)
    assert len(sv) == len(fv)  # no two configurations merged
    lengths = sorted({v["array_len"] for v in sv})
    samples = sorted({v["train_samples"] for v in sv})
    assert len(lengths) == 3 and len(samples) == 2
    assert max(lengths) < 12 and max(samples) < 100  # tiny, in the same order
    by_full = {canonical(a): canonical(b) for a, b in zip(fv, sv, strict=True)}
    _, full_membership = grid_variants(full)
    assert {by_full[k]: m for k, m in full_membership.items()} == membership
    # the base takes the rank of its own value among the swept ones (20 is the middle length)
    assert small.base.array_len == lengths[1] and small.base.train_samples == samples[1]
    # an unswept task key keeps the smoke task's value
    assert load_space(GRID, smoke=True).base.train_samples == 64


def test_regimes_space_pairs_baseline_and_poh_on_every_task():
    space = load_space(SPACES_DIR / "regimes.yaml")
    variants, membership = grid_variants(space)
    task_keys = ("array_len", "mask_rate", "train_samples", "value_levels")
    tasks = {tuple(v[k] for k in task_keys) for v in variants}
    assert len(tasks) >= 6
    for task in tasks:  # a baseline and a PoH-HRM configuration on each task
        models = sorted(v["model"] for v in variants if tuple(v[k] for k in task_keys) == task)
        assert models == ["baseline", "pot"]
    spec = tuple(getattr(space.base, k) for k in task_keys)
    assert spec == (20, 0.5, 1000, 0)
    for key in task_keys:  # one factor at a time around the SPEC point
        along = {t for t in tasks if all(t[i] == spec[i] for i, k in enumerate(task_keys)
                                         if k != key)}
        assert len(along) >= 3, key
    lengths = {t[0] for t in tasks}
    samples = {t[2] for t in tasks}
    masks = {t[1] for t in tasks}
    assert min(lengths) <= 12 and max(lengths) >= 50
    assert min(samples) <= 100 and max(samples) >= 1000
    assert min(masks) <= 0.3 and max(masks) >= 0.7
    assert space.base.controller == "hrm" and space.base.max_inner_iters == 12
    assert space.base.hrm_period == 4
    assert len(load_space(SPACES_DIR / "regimes.yaml", smoke=True).experiments) == 4


def test_cross_product_hparams_domains_list_every_swept_key(tmp_path):
    from poh_tune.cli import hparam_domains
    from poh_tune.tblog import hparams_experiment

    space = load_space(_write(tmp_path, CROSS))
    domains = hparam_domains("grid", space, {"experiment_names": []})
    assert domains == {"array_len": {"values": [12, 20, 50]},
                       "max_inner_iters": {"values": [6, 12]},
                       "model": {"values": ["baseline", "pot"]},
                       "train_samples": {"values": [100, 1000]}}
    exp = hparams_experiment(space.base.to_dict(), domains)
    differs = {h.name for h in exp.hparam_infos if h.differs}
    assert differs == set(domains)
