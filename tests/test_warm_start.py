"""`launch optuna --warm-start GRID_DIR` end to end: the smoke grid's points of the Optuna space
reach the study as COMPLETE trials with the grid's values; without any, the base goes first."""

from __future__ import annotations

import csv

import optuna
import pytest
from optuna.trial import TrialState

from poh_tune.search import open_study
from tests.cli_runs import launch_popen

SEARCHED = ("entropy_reg", "temperature_min", "temperature_init", "temperature_decay")


def run(args: list[str]) -> str:
    proc = launch_popen(args)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_smoke_grid_warm_starts_a_smoke_optuna_search(tmp_path):
    common = ["--storage", str(tmp_path), "--no-report", "--num-cpus", "2", "--reuse-actors"]
    # The grid's experiments whose configurations can lie in the Optuna space, and the
    # baseline, which cannot (another model).
    run(["grid", "--smoke", "--name", "g", "--experiment", "baseline_vs_hrm", "--experiment",
         "entropy_weight", "--experiment", "temperature_init", *common])
    grid = list(csv.DictReader(open(tmp_path / "g" / "results.csv")))
    # Independent expectation, from results.csv: every PoH configuration, its final τ.
    expected = sorted((tuple(float(r[f"config.{k}"]) for k in SEARCHED), float(r["final_tau"]))
                      for r in grid if r["config.model"] == "pot")
    assert len(grid) == 6 and len(expected) == 5
    out = run(["optuna", "--smoke", "--name", "o", "--num-samples", "1", "--warm-start",
               str(tmp_path / "g"), *common, "max_inner_iters=3", "hrm_period=2"])
    assert "warm start: 5 of the 6 configurations" in out
    study = open_study(tmp_path / "o")
    warm = [t for t in study.trials if "warm_start_from" in t.user_attrs]
    assert [t.number for t in warm] == [0, 1, 2, 3, 4]  # told before the first suggestion
    assert all(t.state == TrialState.COMPLETE for t in warm)
    got = sorted((tuple(float(t.params[k]) for k in SEARCHED), t.value) for t in warm)
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected])
    assert [g[1] for g in got] == pytest.approx([e[1] for e in expected], abs=1e-9)
    assert {t.user_attrs["warm_start_from"] for t in warm} == {
        r["trial_id"] for r in grid if r["config.model"] == "pot"}
    searched = [t for t in study.trials if "ray_trial_id" in t.user_attrs]
    assert len(searched) == 1 and searched[0].number == 5
    print("\n" + study.trials_dataframe(attrs=("number", "value", "state", "params",
                                               "user_attrs")).to_string())

    # The default smoke base (2 iterations, hrm_period 1) differs in fixed keys: nothing
    # lies in the space, one line says so, and the base configuration is evaluated first.
    out = run(["optuna", "--smoke", "--name", "o2", "--num-samples", "1", "--warm-start",
               str(tmp_path / "g"), *common])
    assert "warm start: none of the 6 configurations" in out
    study = open_study(tmp_path / "o2")
    assert len(study.trials) == 1
    from poh_tune.spaces import SPACES_DIR, load_space

    base = load_space(SPACES_DIR / "optuna_refine.yaml", smoke=True).base
    assert study.trials[0].params == pytest.approx({k: getattr(base, k) for k in SEARCHED})
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
