import itertools
import math

import pytest
import torch

from poh_tune.metrics import kendall_tau, mean_ci95, ranks_from_scores, routing_stats


def tau_reference(pred, target, obs):
    """Straightforward O(L^2) loop, written from the SPEC's definition."""
    conc = disc = n = 0
    for i, j in itertools.combinations(range(len(pred)), 2):
        if obs is not None and not (obs[i] and obs[j]):
            continue
        t = (target[i] > target[j]) - (target[i] < target[j])
        if t == 0:
            continue  # tied in the target: not counted at all
        n += 1
        p = (pred[i] > pred[j]) - (pred[i] < pred[j])
        if p == t:
            conc += 1
        elif p == -t:
            disc += 1
    return (conc - disc) / n if n else 0.0


def test_matches_reference_with_ties_and_masks():
    g = torch.Generator().manual_seed(0)
    B, L = 64, 12
    pred = torch.randint(0, 5, (B, L), generator=g).float()  # many ties in the prediction
    target = torch.randint(0, 8, (B, L), generator=g).float()  # and some in the target
    obs = torch.rand(B, L, generator=g) < 0.6
    got_masked = kendall_tau(pred, target, obs)
    got_all = kendall_tau(pred, target)
    for b in range(B):
        p, t, o = pred[b].tolist(), target[b].tolist(), obs[b].tolist()
        assert got_masked[b].item() == pytest.approx(tau_reference(p, t, o), abs=1e-6)
        assert got_all[b].item() == pytest.approx(tau_reference(p, t, None), abs=1e-6)


def test_sorted_is_one_reversed_is_minus_one():
    target = torch.randperm(20).unsqueeze(0).repeat(3, 1)
    obs = torch.rand(3, 20) < 0.5
    obs[:, :2] = True
    assert torch.equal(kendall_tau(target.float() * 3 + 1, target, obs), torch.ones(3))
    assert torch.equal(kendall_tau(-target.float(), target, obs), -torch.ones(3))
    assert torch.equal(kendall_tau(-target.float(), target), -torch.ones(3))


def test_hidden_positions_never_change_mask_aware_tau():
    g = torch.Generator().manual_seed(1)
    B, L = 32, 20
    target = torch.rand(B, L, generator=g).argsort(-1)
    obs = torch.rand(B, L, generator=g) < 0.5
    pred = torch.randn(B, L, generator=g)
    base = kendall_tau(pred, target, obs)
    for _ in range(5):
        changed = torch.where(obs, pred, torch.randn(B, L, generator=g) * 100)
        assert torch.equal(kendall_tau(changed, target, obs), base)
    # ...while the all-pairs τ does see them.
    assert not torch.equal(kendall_tau(changed, target), kendall_tau(pred, target))


def test_only_signs_matter_scores_and_ranks_agree():
    scores = torch.randn(16, 10)
    target = torch.randn(16, 10)
    assert torch.allclose(kendall_tau(scores, target), kendall_tau(ranks_from_scores(scores), target))


def test_routing_stats_on_uniform_and_one_hot():
    uni = torch.full((2, 5, 4), 0.25)
    st = routing_stats(uni)
    assert torch.allclose(st["entropy"], torch.full((2, 5), math.log(4)))
    assert torch.allclose(st["herfindahl"], torch.full((2, 5), 0.25))
    one = torch.zeros(2, 5, 4)
    one[..., 1] = 1
    st = routing_stats(one)
    assert torch.allclose(st["entropy"], torch.zeros(2, 5))
    assert torch.allclose(st["max_alpha"], torch.ones(2, 5))


def test_mean_ci95_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    vals = [0.91, 0.95, 0.93, 0.97, 0.90]
    m, hw = mean_ci95(vals)
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=sum(vals) / 5, scale=stats.sem(vals))
    assert m == pytest.approx((lo + hi) / 2)
    assert hw == pytest.approx((hi - lo) / 2)


def test_mean_ci95_gives_no_half_width_below_three_values():
    """The small-n rule: one or two values have a mean and no CI (nan), three have one."""
    assert mean_ci95([0.5])[0] == 0.5 and math.isnan(mean_ci95([0.5])[1])
    m, hw = mean_ci95([0.4, 0.6])
    assert m == pytest.approx(0.5) and math.isnan(hw)
    assert math.isfinite(mean_ci95([0.4, 0.5, 0.6])[1])


def test_equal_values_are_target_ties_not_counted():
    """τ on a task with duplicate values (SPEC "Metrics"): a pair of equal values is not counted.

    Checked against the brute-force loop and against scipy's tau-b: with no ties in the
    prediction, (C - D) / (pairs not tied in the target) = tau_b * sqrt(n0 / (n0 - n1))."""
    from scipy import stats

    from poh_tune.data import make_split

    d = make_split(48, 12, 0.0, seed=4, value_levels=4)
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(48, 12, generator=g)  # no ties in the prediction
    got = kendall_tau(pred, d.values)
    for b in range(48):
        p, v = pred[b].tolist(), d.values[b].tolist()
        assert got[b].item() == pytest.approx(tau_reference(p, v, None), abs=1e-6)
        n0 = 12 * 11 / 2
        n1 = sum(c * (c - 1) / 2 for c in torch.unique(d.values[b], return_counts=True)[1].tolist())
        tau_b = stats.kendalltau(p, v, variant="b").statistic
        assert got[b].item() == pytest.approx(tau_b * math.sqrt(n0 / (n0 - n1)), abs=1e-6)
    # The stable-sort ranks would count equal values by position: a prediction that keeps
    # equal values in reverse position order scores 1 on values, less on the ranks.
    rev = d.values.float() - torch.arange(12) * 1e-3  # equal values: later position first
    assert torch.allclose(kendall_tau(rev, d.values), torch.ones(48))
    assert (kendall_tau(rev, d.ranks) < 1).all()
