"""report.oracle: the Bayes-optimal all-pairs τ against a plain simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from poh_tune.report.oracle import oracle_all_pairs_tau, visible_in_range


def test_monte_carlo_candidates_keep_a_visible_lowest_value():
    """The lowest value (-100) visible at position 0 and hidden positions after it: it is not a
    candidate for the hidden values (hidden positions once overwrote its slot)."""
    values = torch.tensor([[-100, 5, -7, 60]])
    obs = torch.tensor([[True, False, True, False]])
    present = visible_in_range(values, obs, -100, 100)
    assert present.shape == (1, 200)
    assert present[0].nonzero().flatten().tolist() == [0, 93]  # -100 and -7


def _simulate_oracle(L: int, mask_rate: float, n: int, seed: int) -> tuple[float, float]:
    """A separate plain simulation: mean and standard error of the oracle's all-pairs τ."""
    rng = np.random.default_rng(seed)
    k = max(2, int(L * (1 - mask_rate)))
    universe = np.arange(-100, 100)
    taus = []
    for _ in range(n):
        vals = rng.choice(universe, size=L, replace=False)
        visible = vals[:k]
        median = np.median(np.setdiff1d(universe, visible))
        pred = np.concatenate([visible.astype(float), np.full(L - k, median)])
        iu = np.triu_indices(L, 1)
        c = np.sign(pred[:, None] - pred[None, :])[iu] * np.sign(vals[:, None] - vals[None, :])[iu]
        taus.append(c.mean())
    return float(np.mean(taus)), float(np.std(taus, ddof=1) / math.sqrt(n))


@pytest.mark.parametrize("L,mask", [(20, 0.5), (10, 0.3), (8, 0.75)])
def test_oracle_ceiling_matches_monte_carlo(L, mask):
    exact = oracle_all_pairs_tau(L, mask)
    mc, se = _simulate_oracle(L, mask, 3000, seed=L)
    assert abs(exact - mc) < 4 * se + 1e-3
    own_mc = oracle_all_pairs_tau(L, mask, n_samples=20000, seed=1)
    assert own_mc == pytest.approx(exact, abs=0.002)


def test_oracle_values():
    assert oracle_all_pairs_tau(20, 0.5) == pytest.approx(0.50, abs=0.01)
    assert oracle_all_pairs_tau(20, 0.0) == 1.0
    # The task's own range is the default; an explicit one gives the same value.
    assert oracle_all_pairs_tau(20, 0.5, value_low=-100, value_high=100) == oracle_all_pairs_tau(
        20, 0.5)


def _simulate_levels_oracle(L: int, mask_rate: float, k: int, n: int, seed: int,
                            place: float | None = None) -> tuple[float, float]:
    """Plain simulation of the ceiling with duplicates: values i.i.d. over k levels, hidden ones
    at the levels' median (or at `place`), pairs of equal values left out of τ."""
    rng = np.random.default_rng(seed)
    nvis = max(2, int(L * (1 - mask_rate)))
    lv = np.array([-100 + (i * 200) // k for i in range(k)])
    spot = float(np.median(lv)) if place is None else place
    iu = np.triu_indices(L, 1)
    taus = []
    for _ in range(n):
        vals = rng.choice(lv, size=L, replace=True)
        pred = np.concatenate([vals[:nvis].astype(float), np.full(L - nvis, spot)])
        t = np.sign(vals[:, None] - vals[None, :])[iu]
        p = np.sign(pred[:, None] - pred[None, :])[iu]
        taus.append((p * t).sum() / max(1, (t != 0).sum()))
    return float(np.mean(taus)), float(np.std(taus, ddof=1) / math.sqrt(n))


@pytest.mark.parametrize("L,mask,k", [(20, 0.5, 4), (20, 0.5, 10), (12, 0.3, 5)])
def test_ceiling_with_duplicate_values_matches_a_plain_simulation(L, mask, k):
    got = oracle_all_pairs_tau(L, mask, value_levels=k)
    mc, se = _simulate_levels_oracle(L, mask, k, 3000, seed=k)
    assert abs(got - mc) < 4 * se + 0.003  # the report's own estimate has its own MC error
    # the median beats a spot at either end (a spot between the two middle levels ties it)
    for end in (-100.0, 100.0):
        other, _ = _simulate_levels_oracle(L, mask, k, 3000, seed=k, place=end)
        assert mc > other + 4 * se
    assert oracle_all_pairs_tau(L, 0.0, value_levels=k) == pytest.approx(1.0)
    # distinct values (0) keep the exact ceiling
    assert oracle_all_pairs_tau(L, mask, value_levels=0) == oracle_all_pairs_tau(L, mask)
