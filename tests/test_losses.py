import pytest
import torch

from poh_tune import losses
from poh_tune.data import make_split
from poh_tune.metrics import kendall_tau

# The score losses as the trainer calls them: losses.SCORE_LOSSES[cfg.loss], per sample.
SCORE_LOSS_NAMES = list(losses.SCORE_LOSSES)


@pytest.fixture
def batch():
    return make_split(16, 20, 0.5, seed=3)


def test_every_score_loss_of_the_config_has_an_implementation():
    from poh_tune.config import CHOICES

    assert set(SCORE_LOSS_NAMES) == set(CHOICES["loss"]) - {"pointer_ce"}


@pytest.mark.parametrize("name", SCORE_LOSS_NAMES)
def test_perfect_beats_reversed_and_has_gradient(name, batch):
    loss_fn = losses.SCORE_LOSSES[name]
    perfect = batch.ranks.float().requires_grad_()
    reversed_ = (-batch.ranks.float()).requires_grad_()
    # Orientation: scores ordered like the values give τ = 1.
    assert torch.equal(kendall_tau(perfect.detach(), batch.ranks, batch.obs_mask), torch.ones(16))
    lp = loss_fn(perfect, batch.ranks, batch.obs_mask)
    lr = loss_fn(reversed_, batch.ranks, batch.obs_mask)
    assert lp.shape == lr.shape == (16,)  # one loss per sample
    assert torch.isfinite(lp).all() and torch.isfinite(lr).all()
    assert lp.mean().item() < lr.mean().item()
    noisy = torch.randn(16, 20, requires_grad=True)
    loss_fn(noisy, batch.ranks, batch.obs_mask).mean().backward()
    assert torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0


@pytest.mark.parametrize("name", SCORE_LOSS_NAMES)
def test_observed_mask_ignores_hidden_positions(name, batch):
    scores = torch.randn(16, 20, requires_grad=True)
    losses.SCORE_LOSSES[name](scores, batch.ranks, batch.obs_mask).mean().backward()
    assert torch.all(scores.grad[~batch.obs_mask] == 0)
    assert scores.grad[batch.obs_mask].abs().sum() > 0


@pytest.mark.parametrize("name", SCORE_LOSS_NAMES)
def test_every_iteration_against_one_target_equals_each_alone(name, batch):
    """The trainer scores all inner iterations (T, N, L) against one set of targets (N, L) in
    one call: the targets broadcast, and iteration t's losses equal scoring it alone."""
    scores = torch.randn(3, 16, 20)
    together = losses.SCORE_LOSSES[name](scores, batch.ranks, batch.obs_mask)
    assert together.shape == (3, 16)
    for t in range(3):
        alone = losses.SCORE_LOSSES[name](scores[t], batch.ranks, batch.obs_mask)
        torch.testing.assert_close(together[t], alone, rtol=1e-6, atol=1e-7)


def test_ranknet_matches_pairwise_bce_by_hand():
    s = torch.tensor([[0.3, -1.0, 2.0]])
    r = torch.tensor([[1, 0, 2]])
    obs = torch.tensor([[True, True, True]])
    sig = torch.sigmoid
    # ordered pairs (i, j), label [r_i > r_j]
    terms = []
    for i in range(3):
        for j in range(3):
            if i != j:
                p = sig(s[0, i] - s[0, j])
                terms.append(-torch.log(p) if r[0, i] > r[0, j] else -torch.log(1 - p))
    got = losses.SCORE_LOSSES["ranknet"](s, r, obs)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_pointer_ce_is_finite_and_prefers_the_target(batch):
    N, L = batch.perm.shape
    r = torch.arange(L).view(1, L, 1)
    covered = batch.ranks.unsqueeze(1) < r
    good = torch.zeros(N, L, L).scatter_(2, batch.perm.unsqueeze(-1), 5.0).masked_fill(covered, float("-inf"))
    bad = torch.zeros(N, L, L).masked_fill(covered, float("-inf"))
    lg = losses.pointer_ce_per_sample(good, batch.perm, batch.obs_mask)
    lb = losses.pointer_ce_per_sample(bad, batch.perm, batch.obs_mask)
    assert torch.isfinite(lg).all() and torch.isfinite(lb).all()
    assert (lg < lb).all()


def test_supervision_weights():
    assert losses.supervision_weights("none", 4) == [0, 0, 0, 1]
    assert losses.supervision_weights("uniform", 4) == [0.25] * 4
    assert losses.supervision_weights("linear", 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert losses.supervision_weights("linear", 1) == [1.0]
