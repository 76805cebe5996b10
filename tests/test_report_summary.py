"""report.summary: summary.csv's statistics and A/B against independent computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic_experiment import build_and_report, ci_halfwidth, paired_p_by_hand, welch_p_by_hand


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_and_report(tmp_path_factory.mktemp("exp"))


def test_means_and_ci_match_independent_computation(built):
    _, trials, _, summary = built
    for tid, tr in trials.items():
        r = summary.set_index("trial_id").loc[tid]
        if tid == "p4":
            assert r.isna()[["test_tau_mean", "dev_tau_mean", "test_tau_ci95"]].all()
            continue
        for stat in ("test_tau", "test_tau_all", "test_perfect_sort"):
            vals = tr["final"][stat]
            assert r[f"{stat}_mean"] == pytest.approx(np.mean(vals), abs=1e-12)
            assert r[f"{stat}_ci95"] == pytest.approx(ci_halfwidth(vals), rel=1e-9)
        best_dev = tr["dev"].max(0)  # each seed's best dev τ
        assert r["dev_tau_mean"] == pytest.approx(best_dev.mean(), abs=1e-12)
        assert r["dev_tau_ci95"] == pytest.approx(ci_halfwidth(best_dev), rel=1e-9)


def test_ab_deltas_and_welch_p(built):
    _, trials, _, summary = built
    s = summary.set_index("trial_id")
    pairs = {"p1": "b1", "p2": "b1", "p3": "b2"}  # p3 is on another task: its own baseline
    assert pd.isna(s.loc["p4", "delta_test_tau"])  # no metrics, no Δ
    for poh, base in pairs.items():
        assert s.loc[poh, "baseline_trial_id"] == base
        for stat in ("test_tau", "test_tau_all"):
            a, b = trials[poh]["final"][stat], trials[base]["final"][stat]
            d = np.mean(a) - np.mean(b)
            assert s.loc[poh, f"delta_{stat}"] == pytest.approx(d, abs=1e-12)
            assert s.loc[poh, f"rel_delta_{stat}"] == pytest.approx(d / np.mean(b), rel=1e-9)
            assert s.loc[poh, f"p_{stat}"] == pytest.approx(welch_p_by_hand(a, b), rel=1e-6)
            assert s.loc[poh, f"p_paired_{stat}"] == pytest.approx(paired_p_by_hand(a, b),
                                                                   rel=1e-6)
    assert pd.isna(s.loc["b1", "baseline_trial_id"])


def test_statuses_in_summary_csv(built):
    _, _, _, summary = built
    s = summary.set_index("trial_id")["status"].to_dict()
    assert s == {"b1": "finished", "p1": "finished", "p2": "stopped early", "b2": "finished",
                 "p3": "errored", "p4": "errored"}
    flagged = summary.set_index("trial_id")["routing_healthy"]
    assert not flagged["p2"] and flagged["p1"]
