"""evaluate.Evaluator on a task with duplicate values: τ leaves equal values out, accuracy reads
the stable-sort target."""

from __future__ import annotations

import torch

from poh_tune.metrics import kendall_tau, ranks_from_scores
from poh_tune.trainer import TrialRunner
from tests.test_metrics import tau_reference


def test_tau_leaves_pairs_of_equal_values_out_and_accuracy_reads_stable_ranks(tiny_cfg):
    runner = TrialRunner(tiny_cfg.replace(value_levels=3, epochs=1), "cpu")
    runner.run_epoch()
    got = runner.evaluate("dev", 1.0)  # per member (seed)
    data = runner.data["dev"]
    x, obs = data.inputs()
    runner.model.eval()
    with torch.no_grad():
        scores = runner.model(x, obs, torch.ones(len(runner.seeds))).scores[-1]  # (S, N, L)
    for s, res in enumerate(got):
        sc, v, o = scores[s].tolist(), data.values[s].tolist(), data.obs_mask[s].tolist()
        want = sum(tau_reference(p, t, m) for p, t, m in zip(sc, v, o, strict=True)) / len(sc)
        want_all = sum(tau_reference(p, t, None) for p, t in zip(sc, v, strict=True)) / len(sc)
        assert abs(res["tau"] - want) < 1e-5 and abs(res["tau_all"] - want_all) < 1e-5
        # counting equal values by position (the stable ranks) is a different number here
        by_rank = kendall_tau(scores[s], data.ranks[s], data.obs_mask[s]).mean().item()
        assert abs(res["tau"] - by_rank) > 1e-6
        hits = (ranks_from_scores(scores[s]) == data.ranks[s]).float().mean().item()
        assert abs(res["accuracy"] - hits) < 1e-5
