"""Statistics over a configuration's seeds: means with 95 % CIs, A/B tests, Holm, bands, routing."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from poh_tune.record import seed_value
from poh_tune.report.load import POH_ONLY_KEYS, Trial, truthy

# The document's success bands: (tau(baseline) >, tau(HRM) >, relative gain >=).
BANDS: dict[str, tuple[float, float, float]] = {
    "minimum": (0.15, 0.20, 0.20),
    "target": (0.18, 0.25, 0.35),
    "stretch": (0.20, 0.30, 0.50),
}
# Per-configuration statistics: (name in the report, per-seed key prefix in the metrics).
STAT_KEYS = {
    "test_tau": "test τ (mask-aware, at best dev epoch)",
    "dev_tau": "best dev τ (mask-aware)",
    "test_tau_all": "test all-pairs τ",
    "test_perfect_sort": "test perfect-sort rate",
}
ALPHA = 0.05  # significance level of the report's statements, after Holm's correction


@dataclass
class Stat:
    mean: float
    ci95: float  # Student-t half-width; nan when the per-seed values are unknown
    values: list[float] = field(default_factory=list)  # per seed


def finite(vals: list[Any]) -> list[float]:
    """The finite numbers among `vals`, as floats (None, text and nan left out)."""
    return [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]


def seed_values(trial: Trial, stat: str) -> list[float]:
    """Per-seed values of one statistic (STAT_KEYS) at the trial's last reported epoch.

    Args:
        trial: a loaded trial.
        stat: "test_tau", "dev_tau", "test_tau_all" or "test_perfect_sort".
    Returns:
        One value per seed that has it (test_* are at that seed's best dev epoch so far; dev_tau is
        the seed's best dev τ over the epochs reported).
    """
    if not trial.rows:
        return []
    if stat == "dev_tau":
        out = []
        for s in trial.seeds:
            vals = finite([seed_value(r, "tau", s) for r in trial.rows])
            if vals:
                out.append(max(vals))
        return out
    return finite([seed_value(trial.last, stat, s) for s in trial.seeds])


def trial_stat(trial: Trial, stat: str) -> Stat:
    """Mean and 95 % CI over seeds; falls back to the logged mean (CI nan) without per-seed values.

    Args:
        trial: a loaded trial.
        stat: a STAT_KEYS name.
    Returns:
        The Stat (mean nan when the trial logged nothing).
    """
    # poh_tune.metrics imports torch; importing it here keeps `import poh_tune.report` light.
    from poh_tune.metrics import mean_ci95

    vals = seed_values(trial, stat)
    if vals:
        m, h = mean_ci95(vals)
        return Stat(m, h, vals)
    key = "best_tau" if stat == "dev_tau" else stat
    v = trial.last.get(key)
    return Stat(float(v) if isinstance(v, (int, float)) else math.nan, math.nan, [])


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances).

    Args:
        a: per-seed values of one configuration.
        b: per-seed values of the other.
    Returns:
        The p-value; nan with fewer than 2 values a side or no variance at all.
    """
    if len(a) < 2 or len(b) < 2 or (np.var(a) == 0 and np.var(b) == 0):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired_p(poh: Trial, base: Trial, stat: str) -> float:
    """Two-sided p-value of the paired t-test over the seeds both trials ran.

    The same seed gives both configurations the same data splits, so per-seed differences
    remove the split-to-split variance that Welch's test has to carry.

    Args:
        poh: the PoH trial.
        base: the baseline trial.
        stat: "test_tau", "test_tau_all" or "test_perfect_sort".
    Returns:
        The p-value; nan with fewer than 2 shared seeds or identical differences.
    """
    pairs = [(seed_value(poh.last, stat, s), seed_value(base.last, stat, s))
             for s in poh.seeds if s in base.seeds]
    pairs = [(a, b) for a, b in pairs if len(finite([a, b])) == 2]
    diffs = [a - b for a, b in pairs]
    if len(pairs) < 2 or np.var(diffs) == 0:
        return math.nan
    return float(stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue)


def holm(pvals: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (nan entries stay nan, not counted).

    Args:
        pvals: the p-values of the family's comparisons.
    Returns:
        The adjusted p-values, in the same order (each at most 1).
    """
    idx = sorted((i for i, p in enumerate(pvals) if not math.isnan(p)), key=lambda i: pvals[i])
    out = [math.nan] * len(pvals)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * pvals[i]))
        out[i] = running
    return out


def poh_pairs(trials: list[Trial], stat: str = "test_tau"
              ) -> list[tuple[Trial, Trial, float, float]]:
    """Every pair of PoH configurations of the same task with their paired p and Holm's p.

    Args:
        trials: the experiment's trials.
        stat: the per-seed statistic compared.
    Returns:
        (a, b, paired p, Holm-adjusted p) per pair; one family per experiment.
    """
    pohs = [t for t in trials if t.is_poh and t.rows]
    pairs = [(a, b) for i, a in enumerate(pohs) for b in pohs[i + 1:] if a.task() == b.task()]
    ps = [paired_p(a, b, stat) for a, b in pairs]
    return [(a, b, p, q) for (a, b), p, q in zip(pairs, ps, holm(ps), strict=True)]


def match_baseline(trial: Trial, baselines: list[Trial]) -> Trial | None:
    """The baseline of the same task (TASK_KEYS) sharing the most other settings.

    Args:
        trial: a PoH trial.
        baselines: the baseline trials of the experiment.
    Returns:
        The baseline with metrics (ties: lowest trial_id), or None.
    """
    cands = [b for b in baselines if b.task() == trial.task() and b.rows]
    if not cands:
        return None

    def shared(b: Trial) -> int:
        return sum(1 for k, v in trial.config.items()
                   if k != "model" and k not in POH_ONLY_KEYS and b.config.get(k) == v)

    return sorted(cands, key=lambda b: (-shared(b), b.trial_id))[0]


@dataclass
class ABResult:
    poh: Trial
    base: Trial
    stat: str
    poh_stat: Stat
    base_stat: Stat
    delta: float
    rel: float  # delta / baseline mean; nan when the baseline mean is 0
    p: float  # Welch
    p_paired: float  # paired over shared seeds


def ab_compare(poh: Trial, base: Trial, stat: str = "test_tau") -> ABResult:
    """Absolute and relative Δ of a statistic (PoH minus baseline); Welch's and paired p.

    Args:
        poh: the PoH trial.
        base: the baseline trial of the same task.
        stat: a STAT_KEYS name.
    Returns:
        The ABResult.
    """
    ps, bs = trial_stat(poh, stat), trial_stat(base, stat)
    delta = ps.mean - bs.mean
    rel = delta / bs.mean if bs.mean != 0 else math.nan
    return ABResult(poh, base, stat, ps, bs, delta, rel, welch_p(ps.values, bs.values),
                    paired_p(poh, base, stat))


def band_status(base_tau: float, poh_tau: float, rel: float) -> dict[str, bool]:
    """Which of the document's success bands are met (all three criteria of a band must hold).

    Args:
        base_tau: mean τ of the baseline.
        poh_tau: mean τ of the PoH configuration.
        rel: relative gain (poh - base) / base.
    Returns:
        {"minimum": bool, "target": bool, "stretch": bool}.
    """
    out = {}
    for name, (b, h, r) in BANDS.items():
        out[name] = bool(base_tau > b and poh_tau > h and not math.isnan(rel) and rel >= r)
    return out


def routing_row(trial: Trial) -> dict[str, Any] | None:
    """Routing health of a PoH trial at its last epoch, and how many epochs left the band.

    Args:
        trial: a loaded trial.
    Returns:
        {"herfindahl", "max_alpha", "healthy", "unhealthy_epochs", "epochs"}, or None for a
        baseline or a trial without routing diagnostics.
    """
    # The trainer records each epoch's verdict (metrics.routing_healthy: every seed in the band);
    # it is read here, not recomputed from the seed means, which can sit inside the band while
    # one seed is outside it.
    rows = [r for r in trial.rows if isinstance(r.get("herfindahl"), (int, float))
            and "routing_healthy" in r]
    if not trial.is_poh or not rows:
        return None
    last = rows[-1]
    bad = sum(1 for r in rows if not truthy(r["routing_healthy"]))
    return {"herfindahl": float(last["herfindahl"]), "max_alpha": float(last["max_alpha"]),
            "healthy": truthy(last["routing_healthy"]), "unhealthy_epochs": bad,
            "epochs": len(rows)}
