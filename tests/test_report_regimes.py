"""report.regimes: PoH against the baseline of its own task along each regime factor."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from poh_tune.report import write_report
from poh_tune.report.oracle import oracle_all_pairs_tau
from poh_tune.report.regimes import REGIME_PLOT
from poh_tune.report.stats import holm
from tests.synthetic_experiment import ci_halfwidth, paired_p_by_hand, trial_config, write_trial

# (task key, value) -> (baseline mean, PoH gain) of mask-aware test τ; the gain at L=30 is far
# beyond the seed noise (0.01), the one at L=10 is inside it.
LENGTH = {10: (0.90, 0.0), 20: (0.95, 0.0), 30: (0.80, 0.08)}
LEVELS = {0: (0.95, 0.0), 4: (0.70, -0.05)}


def _regime_experiment(root):
    rng = np.random.default_rng(3)
    (root / "poh_experiment.yaml").write_text(yaml.safe_dump({
        "mode": "grid", "metric": "tau", "metric_mode": "max", "experiments": {
            "length": {"swept": ["model", "array_len"], "description": "lengths"},
            "dups": {"swept": ["model", "value_levels"], "description": "duplicates"}}}))
    noise = rng.normal(0, 0.01, 5)  # the split's difficulty, shared by both models of a seed

    def fin(mu):
        return {"test_tau": list(mu + noise + rng.normal(0, 0.002, 5)),
                "test_tau_all": list(mu / 2 + noise + rng.normal(0, 0.002, 5)),
                "test_perfect_sort": list(rng.uniform(0, 0.1, 5))}

    trials = {}
    tasks = [("array_len", L, (b, g)) for L, (b, g) in LENGTH.items()]
    tasks += [("value_levels", k, (b, g)) for k, (b, g) in LEVELS.items() if k != 0]
    for key, value, (b, g) in tasks:
        exps = ["length", "dups"] if (key, value) == ("array_len", 20) else [
            "length" if key == "array_len" else "dups"]
        for model, mu in (("baseline", b), ("pot", b + g)):
            tid = f"{model[0]}_{key}_{value}"
            trials[tid] = write_trial(root, tid, trial_config(model=model, **{key: value}), exps,
                                      fin(mu), 3, rng)
    return trials


@pytest.fixture
def report(tmp_path):
    trials = _regime_experiment(tmp_path)
    path = write_report(tmp_path)
    return trials, path.read_text(), pd.read_csv(tmp_path / "summary.csv", dtype={
        "trial_id": str}), tmp_path


def _section(text: str, factor: str) -> list[str]:
    part = text.split("## Regimes", 1)[1].split(f"### {factor}", 1)[1].split("###", 1)[0]
    return [ln for ln in part.splitlines() if ln.startswith("| ") and "PoH configuration" not in ln]


def test_every_poh_is_set_against_the_baseline_of_its_own_task(report):
    trials, _, summary, _ = report
    for tid in trials:
        if tid.startswith("p_"):
            row = summary.loc[summary.trial_id == tid].iloc[0]
            assert row.baseline_trial_id == "b" + tid[1:]


def test_paired_deltas_cis_and_holm_match_an_independent_computation(report):
    trials, text, _, out = report
    pohs = [t for t in trials if t.startswith("p_")]
    # Holm over the distinct PoH configurations, per metric, by hand
    p_hand = {t: paired_p_by_hand(trials[t]["final"]["test_tau"],
                                  trials["b" + t[1:]]["final"]["test_tau"]) for t in pohs}
    holm_hand = dict(zip(pohs, holm([p_hand[t] for t in pohs]), strict=True))
    rows = _section(text, "array_len")
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["10", "20", "30"]
    for r, L in zip(rows, LENGTH, strict=True):
        tid = f"p_array_len_{L}"
        d = np.subtract(trials[tid]["final"]["test_tau"], trials["b" + tid[1:]]["final"]["test_tau"])
        cells = [c.strip() for c in r.strip("|").split(" | ")]
        assert cells[3] == f"{d.mean():+.4g} ± {ci_halfwidth(d):.4g}"
        assert float(cells[4]) == pytest.approx(holm_hand[tid], abs=1e-3)
        da = np.subtract(trials[tid]["final"]["test_tau_all"],
                         trials["b" + tid[1:]]["final"]["test_tau_all"])
        assert cells[5] == f"{da.mean():+.4g} ± {ci_halfwidth(da):.4g}"
    assert (out / REGIME_PLOT).stat().st_size > 10_000
    assert f"]({REGIME_PLOT})" in text


def test_beyond_the_ci_names_the_regimes_where_poh_wins_or_loses(report):
    trials, text, _, _ = report
    line = next(ln for ln in text.splitlines()
                if ln.startswith("- test τ (mask-aware") and "beyond the 95 % CI" in ln)
    up, down = line.split("; below it:")
    assert "p_array_len_30" in up and "p_array_len_10" not in up
    assert "p_value_levels_4" in down.split("; Holm")[0]
    # the SPEC point is on both factors and counted once
    assert "in 1 of 4 tasks" in up


def test_all_pairs_share_of_the_ceiling_and_the_order_of_duplicates(report):
    trials, text, summary, _ = report
    for tid, t in trials.items():
        cfg = t["config"]
        ceiling = oracle_all_pairs_tau(cfg["array_len"], cfg["mask_rate"],
                                       value_levels=cfg["value_levels"])
        row = summary.loc[summary.trial_id == tid].iloc[0]
        assert row.oracle_tau_all == pytest.approx(ceiling)
        want = np.mean(t["final"]["test_tau_all"]) / ceiling
        assert row.test_tau_all_share_of_ceiling == pytest.approx(want)
    rows = _section(text, "value_levels")
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["0", "4"]  # none, then heavy
    share = float(rows[1].strip("|").split(" | ")[8])
    poh = trials["p_value_levels_4"]
    assert share == pytest.approx(np.mean(poh["final"]["test_tau_all"]) / oracle_all_pairs_tau(
        20, 0.5, value_levels=4), abs=1e-3)
    # the sweep tables list both swept keys
    assert "| model | array_len | configuration |" in text
    assert not math.isnan(share)
