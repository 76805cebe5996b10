"""An epoch's record: nested in metrics.jsonl, flat for Tune."""

from __future__ import annotations

from poh_tune.record import flat, seed_value

RECORD = {"epoch": 4, "tau": 0.5, "tau_iter": [0.2, 0.5], "entropy_iter": [1.3, 1.1],
          "alpha": [[0.7, 0.3], [0.4, 0.6]],
          "per_seed": [{"seed": 7, "tau": 0.45, "test_tau": 0.4},
                       {"seed": 2, "tau": 0.55, "test_tau": 0.6}],
          "tau_ci95": 0.1}


def test_flat_spells_every_value_as_one_scalar_key():
    assert flat(RECORD) == {
        "epoch": 4, "tau": 0.5, "tau_iter_0": 0.2, "tau_iter_1": 0.5,
        "entropy_iter_0": 1.3, "entropy_iter_1": 1.1,
        "alpha_iter_0_head_0": 0.7, "alpha_iter_0_head_1": 0.3,
        "alpha_iter_1_head_0": 0.4, "alpha_iter_1_head_1": 0.6,
        "tau_seed_7": 0.45, "test_tau_seed_7": 0.4, "tau_seed_2": 0.55, "test_tau_seed_2": 0.6,
        "tau_ci95": 0.1}


def test_flat_leaves_a_record_without_nested_values_as_it_is():
    assert flat({"epoch": 1, "tau": 0.1, "node_id": "n"}) == {"epoch": 1, "tau": 0.1, "node_id": "n"}


def test_seed_value_finds_the_seed_not_the_position():
    assert seed_value(RECORD, "test_tau", 2) == 0.6
    assert seed_value(RECORD, "tau", 7) == 0.45
    assert seed_value(RECORD, "tau", 3) is None
    assert seed_value(RECORD, "accuracy", 7) is None
    assert seed_value({"tau": 0.1}, "tau", 1) is None
