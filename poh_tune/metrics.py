"""Mask-aware Kendall τ, sort accuracy, routing statistics and confidence intervals over seeds."""

from __future__ import annotations

import math

import torch

from poh_tune.fmt import MIN_CI_SEEDS


def kendall_tau(pred: torch.Tensor, target: torch.Tensor, obs_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Per-sample Kendall τ (tau-a style denominator) over pairs both observed.

    A pair tied in the target is not counted; a pair tied in the prediction counts as neither
    concordant nor discordant but stays in the denominator. Only the signs of pairwise differences
    matter, so `pred` may be scores or ranks.

    Args:
        pred: (B, L) predicted scores or ranks.
        target: (B, L) target values or ranks.
        obs_mask: (B, L) bool, True where observed; None counts every pair.
    Returns:
        (B,) float τ; 0 for a sample with no countable pair.
    """
    ps = torch.sign(pred.unsqueeze(-1) - pred.unsqueeze(-2))  # (B, L, L)
    ts = torch.sign(target.unsqueeze(-1) - target.unsqueeze(-2))  # (B, L, L)
    L = pred.shape[-1]
    upper = torch.ones(L, L, dtype=torch.bool, device=pred.device).triu(1)  # pairs i < j
    pairs = upper & (ts != 0)
    if obs_mask is not None:
        pairs = pairs & obs_mask.unsqueeze(-1) & obs_mask.unsqueeze(-2)
    num = (ps * ts * pairs).sum(dim=(-1, -2)).float()
    den = pairs.sum(dim=(-1, -2)).float()
    return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))


def ranks_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """(B, L) scores -> (B, L) predicted rank of every position (ascending score = ascending rank)."""
    return scores.argsort(dim=-1, stable=True).argsort(dim=-1)


def sort_accuracy(pred_ranks: torch.Tensor, target_ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-position accuracy (B,) and perfect-sort indicator (B,) of predicted ranks."""
    hit = pred_ranks == target_ranks
    return hit.float().mean(dim=-1), hit.all(dim=-1).float()


def routing_entropy(alpha: torch.Tensor) -> torch.Tensor:
    """Entropy of α (..., H) -> (...): what the training loss needs of routing_stats.

    log is taken of α clamped at 1e-12, so a weight that underflowed to 0 has a finite
    gradient (torch.special.entr's is infinite at 0)."""
    return -(alpha * alpha.clamp_min(1e-12).log()).sum(-1)


def routing_stats(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """Routing statistics of α (..., H) over tokens: entropy, Herfindahl index, mean max α."""
    return {
        "entropy": routing_entropy(alpha),
        "herfindahl": (alpha * alpha).sum(-1),
        "max_alpha": alpha.amax(-1),
    }


# Routing health band of the document: flag (never fail) a trial whose routing leaves it.
HERFINDAHL_MAX = 0.5
MAX_ALPHA_BAND = (0.3, 0.6)


def routing_healthy(herfindahl: list[float], max_alpha: list[float]) -> bool:
    """The one rule for routing health: every seed inside the document's band.

    A trial is flagged when any one seed's routing collapses; the seed means could sit inside
    the band while one seed is outside it.

    Args:
        herfindahl: mean Herfindahl index of α, one value per seed.
        max_alpha: mean max α, one value per seed.
    """
    return all(h < HERFINDAHL_MAX and MAX_ALPHA_BAND[0] <= m <= MAX_ALPHA_BAND[1]
               for h, m in zip(herfindahl, max_alpha, strict=True))


def t_quantile_975(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with `df` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and 95 % CI half-width (Student's t) of a list.

    The half-width is nan below fmt.MIN_CI_SEEDS values (the small-n rule: at n=2 the t interval
    is 12.7 standard errors wide), so every record, results.csv and the report leave it out.
    """
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n < MIN_CI_SEEDS:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, t_quantile_975(n - 1) * math.sqrt(var / n)
