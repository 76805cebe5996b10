"""report.stats: Welch's and paired p, Holm, the success bands and routing health."""

from __future__ import annotations

import math

import pytest
from synthetic_experiment import trial_config, welch_p_by_hand

from poh_tune.report.load import Trial
from poh_tune.report.stats import band_status, holm, routing_row, welch_p


def test_welch_p_matches_hand_formula_and_edge_cases():
    a, b = [0.3, 0.35, 0.28, 0.4], [0.2, 0.22, 0.19, 0.25, 0.3, 0.21]
    assert welch_p(a, b) == pytest.approx(welch_p_by_hand(a, b), rel=1e-9)
    assert math.isnan(welch_p([0.3], b))
    assert math.isnan(welch_p([0.3, 0.3], [0.2, 0.2]))


def test_bands():
    assert band_status(0.16, 0.26, 0.625) == {"minimum": True, "target": False, "stretch": False}
    assert band_status(0.21, 0.32, 0.52) == {"minimum": True, "target": True, "stretch": True}
    # The relative gain is its own criterion.
    assert band_status(0.21, 0.32, 0.19)["minimum"] is False
    assert band_status(0.15, 0.30, 1.0)["minimum"] is False  # strictly above 0.15


def test_holm_matches_the_textbook_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    got = holm([0.5, math.nan, 0.2])  # nan is not counted in the family
    assert got[0] == pytest.approx(0.5) and math.isnan(got[1]) and got[2] == pytest.approx(0.4)
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def test_routing_health_is_the_trainers_verdict_every_seed_in_band(tmp_path):
    """Seeds at (Herfindahl, max α) (0.45, 0.25) and (0.45, 0.45): the means (0.45, 0.35) are in
    the band but the first seed is not, so the trial is flagged by the trainer and the report."""
    from poh_tune.trainer import aggregate

    per_seed = [{"epoch": 1, "tau": 0.5, "epoch_s": 1.0, "herfindahl": h, "max_alpha": m,
                 "routing_healthy": h < 0.5 and 0.3 <= m <= 0.6}
                for h, m in ((0.45, 0.25), (0.45, 0.45))]
    row = aggregate(per_seed, [1, 2])
    assert row["routing_healthy"] is False
    assert (row["herfindahl"], row["max_alpha"]) == pytest.approx((0.45, 0.35))
    tdir = tmp_path / "t"
    tdir.mkdir()
    trial = Trial("t", tdir, trial_config(seeds=[1, 2]), [], [row])
    rr = routing_row(trial)
    assert rr["healthy"] is False and rr["unhealthy_epochs"] == 1
