"""Ranking losses on per-position scores, mask-aware; scores are ordered like the values.

Scores are (..., L); targets and masks are (..., L) with leading dims that broadcast against the
scores' (the trainer scores every inner iteration against one set of targets).

Every loss is per sample, `<name>_per_sample(...) -> (...)`: the trainer supervises all inner
iterations of all members in one call (`TrialLoss`), and weighs and sums them itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from poh_tune.metrics import routing_entropy

if TYPE_CHECKING:
    from poh_tune.config import TrialConfig
    from poh_tune.data import SortData
    from poh_tune.model import ForwardOut, PointerDecoder

SOFT_SORT_TEMPERATURE = 1.0
# `combined`: a weighted sum of the three score losses (the document's "combined ranking loss").
COMBINED_WEIGHTS = {"ranknet": 1.0, "listnet": 0.5, "soft_sort": 0.5}


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


def supervision_weights(kind: str, n_iters: int) -> list[float]:
    """Deep-supervision weights of the inner iterations (sum 1): none = last only."""
    if kind == "none":
        return [0.0] * (n_iters - 1) + [1.0]
    raw = [1.0] * n_iters if kind == "uniform" else [float(t + 1) for t in range(n_iters)]
    s = sum(raw)
    return [r / s for r in raw]


class TrialLoss:
    """A training step's loss of every member: the ranking loss of every inner iteration,
    deep-supervision weighted, plus the routing entropy term.

    Args:
        cfg: the trial's configuration (loss, loss_pairs, deep_supervision).
        n_iters: readouts per forward pass (ModelConfig.n_iters).
        pointer: the model's pointer decoder (read by loss pointer_ce).
        device: where the model runs.
    """

    def __init__(self, cfg: TrialConfig, n_iters: int, pointer: PointerDecoder,
                 device: torch.device):
        self.loss, self.loss_pairs, self.pointer = cfg.loss, cfg.loss_pairs, pointer
        self.ds_weights = torch.tensor(supervision_weights(cfg.deep_supervision, n_iters),
                                       device=device)
        self._ds_weights_per_sample: dict[int, torch.Tensor] = {}

    def __call__(self, out: ForwardOut, batch: SortData, entropy_w: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member losses (S,) and their parts (3, S): total, ranking, routing entropy.

        entropy_w: (S,) each member's entropy weight."""
        T, S, B, L = out.scores.shape
        mask = batch.obs_mask if self.loss_pairs == "observed" else torch.ones_like(batch.obs_mask)
        if self.loss == "pointer_ce":
            h = out.hidden.transpose(0, 1).reshape(S, T * B, L, -1)  # members first
            ranks_S = batch.ranks.expand(T, S, B, L).transpose(0, 1).reshape(S, T * B, L)
            logits = self.pointer.teacher_forced(h, ranks_S)  # (S, T*B, R, P)
            perm = batch.perm.expand(T, S, B, L).transpose(0, 1).reshape(-1, L)
            mask_S = mask.expand(T, S, B, L).transpose(0, 1).reshape(-1, L)
            per = pointer_ce_per_sample(logits.reshape(-1, L, L), perm, mask_S)
            per = per.view(S, T, B).transpose(0, 1)  # back to (T, S, B)
        else:  # every iteration's scores (T, S, B, L) against the same targets (S, B, L)
            per = SCORE_LOSSES[self.loss](out.scores, batch.ranks, mask)  # (T, S, B)
        # Deep supervision: iteration t's mean loss over the batch weighted by ds_weights[t];
        # the weights / B are made once per batch size (a division by a number is several
        # aten calls, forward and backward, every step).
        if B not in self._ds_weights_per_sample:
            self._ds_weights_per_sample[B] = (self.ds_weights / B).view(T, 1, 1)
        rank_loss = (per.view(T, S, B) * self._ds_weights_per_sample[B]).sum((0, 2))  # (S,)
        if out.alphas is None:
            return rank_loss, torch.stack([rank_loss, rank_loss, torch.zeros_like(rank_loss)]
                                          ).detach()
        # Mean routing entropy over tokens and iterations, per member, kept in the graph.
        ent = routing_entropy(out.alphas).mean((0, 2, 3))  # (S,)
        loss = torch.addcmul(rank_loss, entropy_w, ent)
        return loss, torch.stack([loss, rank_loss, ent]).detach()
