"""The sorting task's data: distinct values, the visible count, the target permutation, splits."""

from __future__ import annotations

import pytest
import torch

from poh_tune.data import VALUE_HIGH, VALUE_LOW, VALUE_SCALE, make_split, make_splits, n_visible


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
