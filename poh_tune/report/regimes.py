"""Regime views: PoH against the baseline of its own task along each task factor, Δτ with CIs,
and all-pairs τ as a share of the task's ceiling (so that tasks compare)."""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from poh_tune.fmt import ci_text, sig
from poh_tune.io import atomic_write_bytes
from poh_tune.record import seed_value
from poh_tune.report.labels import named, short_value, sort_key, swept_keys
from poh_tune.report.load import TASK_KEYS, Experiment, Trial
from poh_tune.report.stats import ALPHA, STAT_KEYS, Stat, finite, holm, paired_p, trial_stat

REGIME_PLOT = "regimes_delta_tau.png"
DELTA_STATS = {"test_tau": "Δ mask-aware test τ", "test_tau_all": "Δ all-pairs test τ"}
PANEL_IN = (3.6, 3.0)  # one factor, one metric
VALUE_SPAN = 200  # value_levels=0: distinct values of [-100, 100), as many as 200 levels


@dataclass
class RegimePoint:
    factor: str  # the task key varied (data.TASK_KEYS)
    value: Any  # its value for this task
    poh: Trial
    base: Trial  # the baseline of the same task (the A/B section's pairing)
    delta: dict[str, Stat]  # per DELTA_STATS: paired PoH - baseline over shared seeds
    p: dict[str, float]  # paired t-test p
    p_holm: dict[str, float]  # Holm over the distinct PoH configurations, per metric
    ceiling: float  # the task's all-pairs τ ceiling (oracle)
    share_poh: float  # PoH's all-pairs test τ / ceiling
    share_base: float

    def beyond_ci(self, stat: str) -> bool:
        """The 95 % CI of the paired Δ excludes 0 (needs at least two seeds)."""
        d = self.delta[stat]
        return len(d.values) >= 2 and not math.isnan(d.ci95) and abs(d.mean) > d.ci95


def factor_order(factor: str, value: Any) -> tuple:
    """The order of a factor's values along its axis: duplicates from none to heavy (distinct,
    0, first; then fewer and fewer levels), every other factor ascending."""
    if factor == "value_levels" and isinstance(value, int):
        return sort_key(-(value or VALUE_SPAN))
    return sort_key(value)


def paired_delta(poh: Trial, base: Trial, stat: str) -> Stat:
    """Mean and 95 % CI (Student t) of the per-seed differences PoH - baseline over the seeds
    both ran: a seed fixes the data splits, so the pairs share their split's difficulty."""
    from poh_tune.metrics import mean_ci95

    diffs = []
    for s in poh.seeds:
        if s in base.seeds:
            pair = finite([seed_value(poh.last, stat, s), seed_value(base.last, stat, s)])
            if len(pair) == 2:
                diffs.append(pair[0] - pair[1])
    if not diffs:
        return Stat(math.nan, math.nan, [])
    m, h = mean_ci95(diffs)
    return Stat(m, h, diffs)


def regime_factors(exp: Experiment) -> dict[str, list[Trial]]:
    """Task factor -> the PoH trials along it.

    An experiment of poh_experiment.yaml that sweeps exactly one task key (with the model, or
    alone) is a regime factor. Without such experiments: each task key that varies between the
    PoH trials, over the trials whose other task keys take their most common values.
    """
    pohs = [t for t in exp.trials if t.is_poh and t.rows]
    out: dict[str, list[Trial]] = {}
    for name, info in (exp.meta.get("experiments") or {}).items():
        task = [k for k in swept_keys(info) if k in TASK_KEYS]
        if len(task) == 1:
            members = [t for t in pohs if name in t.experiments]
            out.setdefault(task[0], [])
            have = {t.trial_id for t in out[task[0]]}
            out[task[0]] += [t for t in members if t.trial_id not in have]
    if out:
        return {k: v for k, v in out.items() if v}
    for i, key in enumerate(TASK_KEYS):
        if len({t.setting(key) for t in pohs}) < 2:
            continue
        rest = [j for j in range(len(TASK_KEYS)) if j != i]
        common = Counter(tuple(t.task()[j] for j in rest) for t in pohs).most_common(1)[0][0]
        out[key] = [t for t in pohs if tuple(t.task()[j] for j in rest) == common]
    return out


def regime_points(exp: Experiment, summary: pd.DataFrame) -> list[RegimePoint]:
    """One point per (factor, PoH configuration with a baseline), ordered by factor value."""
    by_id = {t.trial_id: t for t in exp.trials}
    row = {r["trial_id"]: r for r in summary.to_dict("records")}

    def baseline(t: Trial) -> Trial | None:
        bid = row[t.trial_id].get("baseline_trial_id")
        return by_id.get(bid) if isinstance(bid, str) else None

    factors = regime_factors(exp)
    distinct = list({t.trial_id: t for ts in factors.values() for t in ts
                     if baseline(t)}.values())
    # Holm over the distinct PoH configurations (the SPEC point is on every factor, once).
    ps = {stat: [paired_p(t, baseline(t), stat) for t in distinct] for stat in DELTA_STATS}
    ids = [t.trial_id for t in distinct]
    holm_of = {stat: dict(zip(ids, holm(ps[stat]), strict=True)) for stat in DELTA_STATS}
    p_of = {stat: dict(zip(ids, ps[stat], strict=True)) for stat in DELTA_STATS}
    points = []
    for factor, trials in factors.items():
        for t in sorted(trials, key=lambda t: (factor_order(factor, t.setting(factor)),
                                               t.trial_id)):
            b = baseline(t)
            if b is None:
                continue
            ceiling = float(row[t.trial_id]["oracle_tau_all"])
            share = [trial_stat(x, "test_tau_all").mean / ceiling if ceiling > 0 else math.nan
                     for x in (t, b)]
            points.append(RegimePoint(
                factor, t.setting(factor), t, b,
                {s: paired_delta(t, b, s) for s in DELTA_STATS},
                {s: p_of[s][t.trial_id] for s in DELTA_STATS},
                {s: holm_of[s][t.trial_id] for s in DELTA_STATS},
                ceiling, share[0], share[1]))
    return points


DELTA_RANGE = (-2.0, 2.0)  # a difference of two τ


def _ci(s: Stat) -> str:
    """A paired Δ with its CI by the report's small-n rule (fmt.ci_text)."""
    if math.isnan(s.mean):
        return "n/a"
    return ci_text(s.mean, s.ci95, len(s.values), DELTA_RANGE, sign=True)


def write_regime_plot(points: list[RegimePoint], path: Path) -> Path | None:
    """Δτ (PoH - baseline, 95 % CI of the paired differences) along each factor: one column per
    factor, one row per metric; None when no factor has two values."""
    factors = list(dict.fromkeys(p.factor for p in points))
    factors = [f for f in factors if len({p.value for p in points if p.factor == f}) >= 2]
    if not factors:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(DELTA_STATS), len(factors), squeeze=False,
                             figsize=(PANEL_IN[0] * len(factors), PANEL_IN[1] * len(DELTA_STATS)))
    for j, f in enumerate(factors):
        pts = [p for p in points if p.factor == f]
        values = sorted({p.value for p in pts}, key=lambda v: factor_order(f, v))
        # Several PoH configurations of one task: small side offsets keep their bars apart.
        configs = sorted({_config_of(p.poh) for p in pts})
        for i, stat in enumerate(DELTA_STATS):
            ax = axes[i][j]
            ax.axhline(0.0, color="grey", lw=0.8)
            for c_i, conf in enumerate(configs):
                mine = [p for p in pts if _config_of(p.poh) == conf]
                off = (c_i - (len(configs) - 1) / 2) * 0.12
                xs = [values.index(p.value) + off for p in mine]
                ys = [p.delta[stat].mean for p in mine]
                es = [0.0 if math.isnan(p.delta[stat].ci95) else p.delta[stat].ci95 for p in mine]
                ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=4,
                            label=conf if len(configs) > 1 else None)
            ax.set_xticks(range(len(values)), [short_value(v) for v in values])
            ax.set_xlabel(f + (" (0: distinct)" if f == "value_levels" else ""))
            ax.set_ylabel(DELTA_STATS[stat])
            if len(configs) > 1 and i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("PoH minus the baseline of its own task (paired over seeds, 95 % CI)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _config_of(t: Trial) -> str:
    """A PoH configuration's settings apart from the task: the series of the plot."""
    keys = ("controller", "max_inner_iters", "hrm_period", "grad_mode")
    return " ".join(f"{k}={short_value(t.setting(k))}" for k in keys)


def regime_lines(points: list[RegimePoint], plot: Path | None,
                 ids: dict[str, str]) -> list[str]:
    """The report's "Regimes" section: a table per factor, what lies beyond the CI, the plot."""
    if not points:
        return []
    L = ["## Regimes: PoH against the baseline of its own task", "",
         "Δ is PoH minus the baseline of the same task (array_len, mask_rate, train_samples, "
         "value_levels), per seed over the seeds both ran, with the 95 % CI of those paired "
         "differences (Student t). Holm adjusts the paired p over the distinct PoH "
         "configurations, per metric. The ceiling is the task's all-pairs τ of the "
         "Bayes-optimal ordering; the share puts all-pairs τ on one scale across tasks.", ""]
    for factor in dict.fromkeys(p.factor for p in points):
        pts = [p for p in points if p.factor == factor]
        rows = [[short_value(p.value), ids[p.poh.trial_id], ids[p.base.trial_id],
                 _ci(p.delta["test_tau"]), sig(p.p_holm["test_tau"]),
                 _ci(p.delta["test_tau_all"]), sig(p.p_holm["test_tau_all"]),
                 sig(p.ceiling), sig(p.share_poh), sig(p.share_base)] for p in pts]
        L += [f"### {factor}", ""]
        header = [factor, "PoH configuration", "baseline", "Δ mask-aware τ", "paired p, Holm",
                  "Δ all-pairs τ", "paired p, Holm", "all-pairs ceiling",
                  "all-pairs τ / ceiling, PoH", "all-pairs τ / ceiling, baseline"]
        L += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        L += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
        L += [""]
    for stat in DELTA_STATS:
        seen = {}
        for p in points:
            seen.setdefault(p.poh.trial_id, p)
        up = [p for p in seen.values() if p.beyond_ci(stat) and p.delta[stat].mean > 0]
        down = [p for p in seen.values() if p.beyond_ci(stat) and p.delta[stat].mean < 0]
        holm_sig = [p for p in seen.values() if p.p_holm[stat] < ALPHA]
        L += [f"- {STAT_KEYS[stat]}: PoH above its baseline beyond the 95 % CI in "
              f"{len(up)} of {len(seen)} tasks: {_where(up)}; below it: {_where(down)}; "
              f"Holm-adjusted paired p < {ALPHA}: {_where(holm_sig)}."]
    L += [""]
    if plot is not None:
        L += [f"![Δτ along each regime factor, mask-aware and all-pairs, 95 % CI]({plot.name})",
              ""]
    return L


def _where(points: list[RegimePoint]) -> str:
    return ", ".join(f"{p.poh.trial_id} ({_task(p.poh)})" for p in points) or "none"


def _task(t: Trial) -> str:
    return ", ".join(f"{k}={short_value(t.setting(k))}" for k in TASK_KEYS)


def regime_section(exp: Experiment, summary: pd.DataFrame, labels: dict[str, str],
                   out: Path) -> list[str]:
    """Write the regime plot into `out` and return the report's regime section (no lines
    when the experiment has no PoH configuration with a baseline)."""
    points = regime_points(exp, summary)
    plot = write_regime_plot(points, out / REGIME_PLOT) if points else None
    ids = {tid: named(tid, lab) for tid, lab in labels.items()}
    return regime_lines(points, plot, ids)
