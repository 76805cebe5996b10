"""The sorting task's data: distinct values, the visible count, the target permutation, splits."""

from __future__ import annotations

import pytest
import torch

from poh_tune.data import (
    VALUE_HIGH,
    VALUE_LOW,
    VALUE_SCALE,
    levels,
    make_split,
    make_splits,
    n_visible,
)


def test_rows_hold_distinct_values_in_range_and_exactly_the_visible_count():
    d = make_split(64, 12, 0.5, seed=5)
    assert d.values.shape == (64, 12) and len(d) == 64
    assert int(d.values.min()) >= VALUE_LOW and int(d.values.max()) < VALUE_HIGH
    for row in d.values.tolist():
        assert len(set(row)) == 12
    assert d.obs_mask.sum(1).tolist() == [n_visible(12, 0.5)] * 64


def test_perm_sorts_the_values_and_ranks_invert_it():
    d = make_split(32, 10, 0.3, seed=1)
    for values, perm, ranks in zip(d.values.tolist(), d.perm.tolist(), d.ranks.tolist(),
                                   strict=True):
        assert [values[p] for p in perm] == sorted(values)
        assert [perm[r] for r in ranks] == list(range(10))
        # rank of a position = how many values of the row are smaller than it
        assert ranks == [sum(w < v for w in values) for v in values]


def test_at_least_two_positions_are_visible():
    assert n_visible(20, 0.5) == 10
    assert n_visible(20, 0.99) == 2
    assert n_visible(3, 0.9) == 2
    assert make_split(8, 3, 0.9, seed=0).obs_mask.sum(1).tolist() == [2] * 8


def test_inputs_are_scaled_values_where_observed_and_zero_where_hidden():
    d = make_split(16, 8, 0.5, seed=2)
    x, obs = d.inputs()
    assert torch.equal(obs, d.obs_mask)
    assert torch.all(x[~obs] == 0)
    assert torch.allclose(x[obs], d.values[obs].float() / VALUE_SCALE)


def test_same_seed_same_data_and_the_splits_are_different_streams():
    a = make_splits(8, 0.5, seed=3, train=16, dev=16, test=16)
    b = make_splits(8, 0.5, seed=3, train=16, dev=16, test=16)
    for name in ("train", "dev", "test"):
        assert torch.equal(a[name].values, b[name].values)
        assert torch.equal(a[name].obs_mask, b[name].obs_mask)
    assert not torch.equal(a["train"].values, a["dev"].values)
    assert not torch.equal(a["dev"].values, a["test"].values)
    other = make_splits(8, 0.5, seed=4, train=16, dev=16, test=16)
    assert not torch.equal(a["train"].values, other["train"].values)
    assert [len(a[n]) for n in ("train", "dev", "test")] == [16, 16, 16]


def test_more_positions_than_distinct_values_is_refused():
    with pytest.raises(ValueError, match="array_len=201"):
        make_split(2, VALUE_HIGH - VALUE_LOW + 1, 0.5, seed=0)


def test_default_draws_the_distinct_values_of_before():
    # The first L entries of a seeded random permutation of the range, then the visible
    # positions: the draw written out here, independent of make_split's code.
    n, L, seed = 16, 10, 7
    g = torch.Generator().manual_seed(seed)
    want = torch.rand(n, VALUE_HIGH - VALUE_LOW, generator=g).argsort(dim=1)[:, :L] + VALUE_LOW
    want_vis = torch.rand(n, L, generator=g).argsort(dim=1)[:, :n_visible(L, 0.5)]
    d = make_split(n, L, 0.5, seed)
    assert torch.equal(d.values, want)
    assert d.obs_mask.gather(1, want_vis).all()
    assert torch.equal(make_split(n, L, 0.5, seed, value_levels=0).values, want)


@pytest.mark.parametrize("k", [2, 5, 10, 200])
def test_value_levels_draw_with_replacement_from_k_levels(k):
    L = 20
    d = make_split(400, L, 0.5, seed=3, value_levels=k)
    lv = levels(k).tolist()
    assert len(set(lv)) == k and min(lv) >= VALUE_LOW and max(lv) < VALUE_HIGH
    assert set(d.values.flatten().tolist()) <= set(lv)
    # With replacement: the mean number of distinct values per row is k (1 - (1 - 1/k)^L).
    distinct = sum(len(set(r)) for r in d.values.tolist()) / 400
    assert distinct == pytest.approx(k * (1 - (1 - 1 / k) ** L), rel=0.05)
    assert d.obs_mask.sum(1).tolist() == [n_visible(L, 0.5)] * 400
    # levels spread over the range: each equally likely
    counts = torch.bincount(torch.searchsorted(torch.tensor(lv), d.values.flatten()),
                            minlength=k).float()
    assert counts.min() > 0.5 * counts.mean()


def test_duplicates_target_is_the_stable_argsort():
    d = make_split(64, 12, 0.3, seed=2, value_levels=4)
    assert any(len(set(r)) < 12 for r in d.values.tolist())
    for values, perm, ranks in zip(d.values.tolist(), d.perm.tolist(), d.ranks.tolist(),
                                   strict=True):
        # equal values keep their positions' order
        assert perm == sorted(range(12), key=lambda i: (values[i], i))
        assert [perm[r] for r in ranks] == list(range(12))


def test_duplicates_are_deterministic_per_seed_and_splits_differ():
    a = make_splits(12, 0.5, 5, 32, 32, 32, value_levels=6)
    b = make_splits(12, 0.5, 5, 32, 32, 32, value_levels=6)
    for name in ("train", "dev", "test"):
        assert torch.equal(a[name].values, b[name].values)
        assert torch.equal(a[name].obs_mask, b[name].obs_mask)
    assert not torch.equal(a["train"].values, a["dev"].values)
    assert not torch.equal(a["train"].values,
                           make_splits(12, 0.5, 6, 32, 32, 32, value_levels=6)["train"].values)
    # more positions than distinct values is fine with replacement
    assert make_split(4, 300, 0.5, 0, value_levels=10).values.shape == (4, 300)


def test_value_levels_config_errors_name_the_key():
    from poh_tune.config import ConfigError, TrialConfig

    assert TrialConfig().value_levels == 0
    with pytest.raises(ConfigError, match="value_levels=1"):
        TrialConfig().replace(value_levels=1)
    with pytest.raises(ConfigError, match="value_levels=201: must be in"):
        TrialConfig().replace(value_levels=201)
    with pytest.raises(ConfigError, match="array_len=300.*value_levels >= 2"):
        TrialConfig().replace(array_len=300)
    assert TrialConfig().replace(array_len=300, value_levels=50).array_len == 300
