"""Ranking losses on per-position scores, mask-aware; scores are ordered like the values.

Scores are (..., L); targets and masks are (..., L) with leading dims that broadcast against the
scores' (the trainer scores every inner iteration against one set of targets).

Every loss comes in two forms: `<name>_per_sample(...) -> (N,)`, which the trainer uses to supervise
all inner iterations in one call, and `<name>_loss(...) -> scalar`, the mean over samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOFT_SORT_TEMPERATURE = 1.0
# `combined`: a weighted sum of the three score losses (the document's "combined ranking loss").
COMBINED_WEIGHTS = {"ranknet": 1.0, "listnet": 0.5, "soft_sort": 0.5}


def _pair_mask(target_ranks: torch.Tensor, obs_mask: torch.Tensor) -> torch.Tensor:
    """(N, L, L) bool: ordered pairs i != j, both observed, not tied in the target."""
    both = obs_mask.unsqueeze(-1) & obs_mask.unsqueeze(-2)
    return both & (target_ranks.unsqueeze(-1) != target_ranks.unsqueeze(-2))


def ranknet_per_sample(scores: torch.Tensor, target_ranks: torch.Tensor, obs_mask: torch.Tensor
                       ) -> torch.Tensor:
    """RankNet: BCE of sigmoid(s_i - s_j) against [rank_i > rank_j] over observed, non-tied pairs."""
    diff = scores.unsqueeze(-1) - scores.unsqueeze(-2)  # (N, L, L)
    r_i, r_j = target_ranks.unsqueeze(-1), target_ranks.unsqueeze(-2)
    label = (r_i > r_j).to(scores.dtype)
    pairs = (obs_mask.unsqueeze(-1) & obs_mask.unsqueeze(-2) & (r_i != r_j)).to(scores.dtype)
    # BCE with logits, log(1 + e^x) - x y, written out: the same value (softplus is computed
    # stably) in three aten calls where binary_cross_entropy_with_logits makes a dozen. The
    # targets' leading dims broadcast against the scores' (iterations x samples).
    bce = F.softplus(diff) - diff * label
    return (bce * pairs).sum((-1, -2)) / pairs.sum((-1, -2)).clamp_min(1)


def _masked_log_softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.masked_fill(~mask, float("-inf")), dim=-1)


def listnet_per_sample(scores: torch.Tensor, target_ranks: torch.Tensor, obs_mask: torch.Tensor
                       ) -> torch.Tensor:
    """ListNet top-one cross-entropy over observed positions, from both ends of the order.

    The target distribution is softmax(rank) (the largest value on top) plus its mirror
    softmax(-rank), so the smallest values are ranked too; scores equal to the ranks minimise it.
    """
    y = target_ranks.to(scores.dtype)
    total = scores.new_zeros(scores.shape[:-1])
    for sign in (1.0, -1.0):
        p = torch.softmax((sign * y).masked_fill(~obs_mask, float("-inf")), dim=-1)
        logq = _masked_log_softmax(sign * scores, obs_mask)
        total = total - (p * logq.masked_fill(~obs_mask, 0.0)).sum(-1)
    return total / 2


def soft_sort_per_sample(scores: torch.Tensor, target_ranks: torch.Tensor, obs_mask: torch.Tensor
                         ) -> torch.Tensor:
    """Soft ranks among observed positions from pairwise sigmoids; MSE to the true ranks, over n."""
    m = obs_mask.to(scores.dtype)
    pair = m.unsqueeze(-1) * m.unsqueeze(-2)  # (N, L, L), j observed for observed i
    pair = pair * (1 - torch.eye(scores.shape[-1], dtype=scores.dtype, device=scores.device))
    soft = (torch.sigmoid((scores.unsqueeze(-1) - scores.unsqueeze(-2)) / SOFT_SORT_TEMPERATURE)
            * pair).sum(-1)  # (N, L): soft count of observed j below i
    hard = ((target_ranks.unsqueeze(-1) > target_ranks.unsqueeze(-2)).to(scores.dtype) * pair).sum(-1)
    n = m.sum(-1).clamp_min(1)
    return (((soft - hard) / n.unsqueeze(-1)) ** 2 * m).sum(-1) / n


def combined_per_sample(scores, target_ranks, obs_mask) -> torch.Tensor:
    return sum(w * SCORE_LOSSES[name](scores, target_ranks, obs_mask)
               for name, w in COMBINED_WEIGHTS.items())


SCORE_LOSSES = {
    "ranknet": ranknet_per_sample,
    "listnet": listnet_per_sample,
    "soft_sort": soft_sort_per_sample,
    "combined": combined_per_sample,
}


def pointer_ce_per_sample(logits: torch.Tensor, perm: torch.Tensor, obs_mask: torch.Tensor
                          ) -> torch.Tensor:
    """Cross-entropy of the teacher-forced pointer decoder.

    Args:
        logits: (N, R, P) rank-by-position logits, covered positions already -inf.
        perm: (N, R) target position of every rank.
        obs_mask: (N, P) bool; only ranks whose target position is in the mask count.
    Returns:
        (N,) mean cross-entropy over the counted ranks.
    """
    ce = F.cross_entropy(logits.transpose(1, 2), perm, reduction="none")  # (N, R)
    w = obs_mask.gather(1, perm).to(logits.dtype)
    return (ce * w).sum(-1) / w.sum(-1).clamp_min(1)


def ranknet_loss(scores, target_ranks, obs_mask) -> torch.Tensor:
    return ranknet_per_sample(scores, target_ranks, obs_mask).mean()


def listnet_loss(scores, target_ranks, obs_mask) -> torch.Tensor:
    return listnet_per_sample(scores, target_ranks, obs_mask).mean()


def soft_sort_loss(scores, target_ranks, obs_mask) -> torch.Tensor:
    return soft_sort_per_sample(scores, target_ranks, obs_mask).mean()


def combined_loss(scores, target_ranks, obs_mask) -> torch.Tensor:
    return combined_per_sample(scores, target_ranks, obs_mask).mean()


def supervision_weights(kind: str, n_iters: int) -> list[float]:
    """Deep-supervision weights of the inner iterations (sum 1): none = last only."""
    if kind == "none":
        return [0.0] * (n_iters - 1) + [1.0]
    raw = [1.0] * n_iters if kind == "uniform" else [float(t + 1) for t in range(n_iters)]
    s = sum(raw)
    return [r / s for r in raw]
