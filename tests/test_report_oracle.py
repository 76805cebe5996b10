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
