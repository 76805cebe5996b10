"""The all-pairs τ ceiling: the expected τ of the Bayes-optimal ordering, exact or Monte Carlo."""

from __future__ import annotations

import functools

import numpy as np
from scipy import stats

# poh_tune.data and poh_tune.metrics import torch: they are imported inside the functions that
# use them, so that importing the report does not load torch.


@functools.lru_cache(maxsize=64)
def _oracle_exact(array_len: int, mask_rate: float, value_low: int, value_high: int) -> float:
    from poh_tune.data import n_visible

    N = value_high - value_low
    k = n_visible(array_len, mask_rate)
    L = array_len
    if L > N:
        raise ValueError(f"array_len={L}: at most {N} distinct values exist")
    if k >= L:
        return 1.0
    # One visible value at grid index j (j values of the range below it); the other k-1 visible
    # values are a uniform subset of the other N-1, x of them below j (hypergeometric).
    j = np.arange(N)[:, None]
    x = np.arange(k)[None, :]
    pmf = stats.hypergeom.pmf(x, N - 1, j, k - 1)  # (N, k)
    below = j - x  # candidates (values not visible) below it
    above = (N - 1 - j) - (k - 1 - x)
    # A hidden value is uniform over the N-k candidates; placed at their median, its pair with this
    # visible value scores |P(above) - P(below)| in expectation.
    gain = (pmf * np.abs(above - below)).sum(1).mean() / (N - k)
    pairs = L * (L - 1) / 2
    return float((k * (k - 1) / 2 + (L - k) * k * gain) / pairs)


def visible_in_range(values, obs_mask, value_low: int, value_high: int):
    """(n, N) bool: which values of [value_low, value_high) are visible in each sample.

    Hidden positions write to a spare last column that is dropped, so they never touch the
    slot of a real value.

    Args:
        values: (n, L) long values; obs_mask: (n, L) bool.
    """
    import torch

    N = value_high - value_low
    present = torch.zeros(values.shape[0], N + 1, dtype=torch.bool)
    present.scatter_(1, (values - value_low).masked_fill(~obs_mask, N), True)
    return present[:, :N]


def _oracle_mc(array_len: int, mask_rate: float, n_samples: int, seed: int,
               value_low: int, value_high: int) -> float:
    import torch

    from poh_tune.data import VALUE_HIGH, VALUE_LOW, make_split, n_visible
    from poh_tune.metrics import kendall_tau

    if (value_low, value_high) != (VALUE_LOW, VALUE_HIGH):
        raise ValueError("the Monte Carlo oracle uses the task's own value range")
    d = make_split(n_samples, array_len, mask_rate, seed)
    grid = torch.arange(value_low, value_high).expand(n_samples, -1)  # (n, N)
    present = visible_in_range(d.values, d.obs_mask, value_low, value_high)
    # Candidates sorted ascending, visible values pushed past the end.
    cand = torch.where(present, torch.tensor(10**6), grid).sort(dim=1).values.float()
    c = value_high - value_low - n_visible(array_len, mask_rate)
    median = (cand[:, (c - 1) // 2] + cand[:, c // 2]) / 2  # (n,)
    scores = torch.where(d.obs_mask, d.values.float(), median[:, None])
    return float(kendall_tau(scores, d.values.float()).mean())


# Monte Carlo samples of the ceiling of a task with duplicate values (standard error < 0.002).
LEVELS_MC_SAMPLES = 4000


@functools.lru_cache(maxsize=64)
def oracle_levels_tau(array_len: int, mask_rate: float, value_levels: int,
                      n_samples: int = LEVELS_MC_SAMPLES, seed: int = 0) -> float:
    """All-pairs τ ceiling of a task whose values come from `value_levels` levels (Monte Carlo).

    Values are drawn with replacement, so a hidden value is uniform over the levels whatever is
    visible: the oracle sorts the visible values exactly and puts every hidden one at the
    median of the levels. A pair of equal values is a pair tied in the target and is not
    counted (metrics.kendall_tau), so the denominator is the sample's unequal pairs.

    Args:
        array_len, mask_rate: the task.
        value_levels: K >= 2 (data.levels).
        n_samples, seed: the Monte Carlo samples, drawn by the task's own generator.
    """
    import torch

    from poh_tune.data import levels, make_split
    from poh_tune.metrics import kendall_tau

    d = make_split(n_samples, array_len, mask_rate, seed, value_levels)
    lv = levels(value_levels).float()
    median = (lv[(value_levels - 1) // 2] + lv[value_levels // 2]) / 2
    scores = torch.where(d.obs_mask, d.values.float(), median)
    return float(kendall_tau(scores, d.values.float()).mean())


def oracle_all_pairs_tau(array_len: int, mask_rate: float, n_samples: int | None = None,
                         seed: int = 0, value_low: int | None = None,
                         value_high: int | None = None, value_levels: int = 0) -> float:
    """Expected all-pairs τ of the Bayes-optimal ordering.

    Visible values are sorted exactly; the hidden ones, exchangeable, are placed together at the
    median of the values still possible; hidden-hidden pairs are ties (0 in expectation anyway).
    With duplicate values (value_levels >= 2) it is oracle_levels_tau, a Monte Carlo estimate.

    Args:
        array_len: L.
        mask_rate: share of hidden positions (n_visible as in poh_tune.data).
        n_samples: None for the exact expectation; an int for a Monte Carlo estimate on the task's
            own generator (`make_split`).
        seed: seed of the Monte Carlo samples.
        value_low: lowest value of the range (inclusive); None: the task's, data.VALUE_LOW.
        value_high: end of the range (exclusive); None: the task's, data.VALUE_HIGH.
        value_levels: 0 (distinct values) or the task's number of value levels.
    Returns:
        The expected all-pairs τ (about 0.50 at L=20, mask 0.5).
    """
    from poh_tune.data import VALUE_HIGH, VALUE_LOW

    if value_levels:
        return oracle_levels_tau(int(array_len), float(mask_rate), int(value_levels),
                                 *(() if n_samples is None else (n_samples,)), seed=seed)
    value_low = VALUE_LOW if value_low is None else value_low
    value_high = VALUE_HIGH if value_high is None else value_high
    if n_samples is None:
        return _oracle_exact(int(array_len), float(mask_rate), int(value_low), int(value_high))
    return _oracle_mc(array_len, mask_rate, n_samples, seed, value_low, value_high)
