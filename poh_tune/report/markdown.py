"""report.md: one function per section, joined by render_markdown."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from poh_tune.fmt import MIN_CI_SEEDS, RATE_RANGE, TAU_RANGE, ci_shown, ci_text, sig
from poh_tune.report.labels import config_labels, named, sort_key, swept_keys
from poh_tune.report.load import Experiment, Trial, trial_status
from poh_tune.report.plots import PLOT_FILES
from poh_tune.report.stats import (
    ALPHA,
    BANDS,
    STAT_KEYS,
    ABResult,
    Stat,
    ab_compare,
    band_status,
    holm,
    poh_pairs,
    routing_row,
    trial_stat,
)

SMALL_N = 5  # fewer seeds than this (and at least MIN_CI_SEEDS): a CI is shown with its n
# The range of each statistic: no interval is written past it.
STAT_BOUNDS = {"test_tau": TAU_RANGE, "dev_tau": TAU_RANGE, "test_tau_all": TAU_RANGE,
               "test_perfect_sort": RATE_RANGE}
CAPTIONS = {
    "tau_vs_epoch.png": "Dev τ per epoch (mean over seeds, 95 % CI band)",
    "tau_vs_iteration.png": "Dev τ per inner iteration, last epoch (should rise, then plateau)",
    "entropy_vs_iteration.png": "Routing entropy per inner iteration, last epoch",
    "alpha_heatmap.png": "Mean α per inner iteration and head, best PoH configuration",
}


def format_stat(s: Stat, bounds: tuple[float, float] | None = TAU_RANGE) -> str:
    """A table cell: mean ± 95 % CI half-width by the small-n rule (fmt.ci_text), saying so
    where the per-seed values are missing; `bounds`: the statistic's range."""
    if math.isnan(s.mean):
        return "n/a"
    if not s.values:
        return f"{sig(s.mean)} (no per-seed values)"
    n = len(s.values)
    # t(0.975) is 4.3 at n=3 and 3.2 at n=4: say n where the interval is that wide.
    return ci_text(s.mean, s.ci95, n, bounds) + (f" (n={n})" if ci_shown(n) and n < SMALL_N
                                                 else "")


def _stat_cell(trial: Trial, stat: str) -> str:
    return format_stat(trial_stat(trial, stat), STAT_BOUNDS[stat])


def _num(v: float, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{sig(100 * v, sign=True)} %" if pct else sig(v, sign=True)


def _p(v: float) -> str:
    return sig(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |"
              for r in rows]
    return lines + [""]


def _header(exp: Experiment, summary: pd.DataFrame) -> list[str]:
    meta = exp.meta
    counts = summary["status"].value_counts().to_dict()
    return [f"# Experiment report: {exp.exp_dir.name}", "",
            f"- Directory: `{exp.exp_dir}`",
            f"- Mode: {meta.get('mode', 'unknown')}; search metric: {meta.get('metric', 'tau')} "
            f"({meta.get('metric_mode', 'max')})",
            f"- Trials: {len(exp.trials)} ("
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")",
            "- Statistics are means over a configuration's seeds with 95 % confidence half-widths "
            "(Student t, n-1 degrees of freedom). Test metrics are taken at each seed's best dev "
            "epoch (the fair protocol); dev τ is each seed's best dev τ.",
            f"- Small n: below {MIN_CI_SEEDS} seeds a CI reads n/a (t(0.975) is 12.7 at n=2); "
            "an interval that would run past the metric's range (τ: -1 to 1, rates: 0 to 1) is "
            "shown clipped, as [low, high]. Numbers have 4 significant digits.", ""]


def _trials_section(exp: Experiment, labels: dict[str, str]) -> list[str]:
    rows = [[t.trial_id, labels[t.trial_id], t.status, f"{t.epochs_done}/{t.config.get('epochs')}",
             ", ".join(t.experiments) or "-", t.error[:200] or "-"] for t in exp.trials]
    rows += [[str(o.get("trial_id")), "(no trial directory)",
              trial_status(0, 1, o), "-", "-",
              (o.get("error") if isinstance(o.get("error"), str) else "")[:200] or "-"]
             for o in exp.orphans]
    return ["## Trials", "",
            *_table(["trial", "configuration", "status", "epochs", "experiments", "error"], rows)]


def _per_configuration_section(exp: Experiment, summary: pd.DataFrame,
                               labels: dict[str, str]) -> list[str]:
    rows = []
    for t in exp.trials:
        r = summary.loc[summary.trial_id == t.trial_id].iloc[0]
        rows.append([t.trial_id, labels[t.trial_id], t.status,
                     len(trial_stat(t, "test_tau").values),
                     *(_stat_cell(t, s) for s in ("test_tau", "dev_tau", "test_tau_all")),
                     sig(r.oracle_tau_all), _stat_cell(t, "test_perfect_sort")])
    L = ["## Per configuration", ""]
    L += _table(["trial", "configuration", "status", "seeds", STAT_KEYS["test_tau"],
                 STAT_KEYS["dev_tau"], STAT_KEYS["test_tau_all"],
                 "all-pairs τ ceiling (Bayes-optimal)", STAT_KEYS["test_perfect_sort"]], rows)
    return L + ["The ceiling is the expected all-pairs τ of the Bayes-optimal ordering: visible "
                "values sorted exactly, the hidden ones placed together at the median of the "
                "values still possible. Mask-aware τ has the ceiling 1.", ""]


def _sweeps_section(exp: Experiment, ids: dict[str, str]) -> list[str]:
    """One table per experiment of poh_experiment.yaml, ordered by its swept setting."""
    lines: list[str] = []
    for name, info in (exp.meta.get("experiments") or {}).items():
        info = info or {}
        members = [t for t in exp.trials if name in t.experiments]
        if not members:
            continue
        keys = swept_keys(info)  # several for a cross-product sweep
        members.sort(key=lambda t: (*(sort_key(t.config.get(k)) for k in keys), t.trial_id))
        lines += [f"### {name}", ""]
        if info.get("description"):
            lines += [str(info["description"]), ""]
        rows = [[*(t.config.get(k) for k in keys), ids[t.trial_id], t.status,
                 *(_stat_cell(t, s) for s in STAT_KEYS)] for t in members]
        lines += _table([*keys, "configuration", "status", *STAT_KEYS.values()], rows)
    return ["## Sweeps", "", *lines] if lines else []


def _ab_results(exp: Experiment, summary: pd.DataFrame
                ) -> tuple[list[Trial], dict[str, list[ABResult]]]:
    """The PoH trials without a baseline, and the A/B of the others per metric (same order)."""
    by_id = {t.trial_id: t for t in exp.trials}
    missing: list[Trial] = []
    abs_of: dict[str, list[ABResult]] = {"test_tau": [], "test_tau_all": []}
    for t in exp.trials:
        if not t.is_poh:
            continue
        bid = summary.loc[summary.trial_id == t.trial_id, "baseline_trial_id"].iloc[0]
        if bid is None or (isinstance(bid, float) and math.isnan(bid)):
            missing.append(t)
            continue
        for stat in abs_of:
            abs_of[stat].append(ab_compare(t, by_id[bid], stat))
    return missing, abs_of


def _ab_section(exp: Experiment, summary: pd.DataFrame, ids: dict[str, str]) -> list[str]:
    missing, abs_of = _ab_results(exp, summary)
    # Holm over each metric's family of PoH-vs-baseline comparisons: many configurations
    # compared with one baseline would otherwise find "significant" gains by chance.
    holm_of = {stat: holm([ab.p_paired for ab in abl]) for stat, abl in abs_of.items()}
    rows = []
    for i, per_poh in enumerate(zip(*abs_of.values(), strict=True)):
        for ab in per_poh:
            rows.append([ids[ab.poh.trial_id], ids[ab.base.trial_id], STAT_KEYS[ab.stat],
                         format_stat(ab.poh_stat, STAT_BOUNDS[ab.stat]),
                         format_stat(ab.base_stat, STAT_BOUNDS[ab.stat]), _num(ab.delta),
                         _num(ab.rel, pct=True), _p(ab.p), _p(ab.p_paired),
                         _p(holm_of[ab.stat][i])])
    L = ["## A/B: PoH against the baseline of the same task", ""]
    if not any(t.is_poh for t in exp.trials):
        return L + ["No PoH configuration in this experiment.", ""]
    if not rows:  # an Optuna search, or a grid without model=baseline: nothing to compare
        return L + [f"No baseline in this experiment: none of its {len(missing)} PoH "
                    "configurations has a baseline of its task to compare with.",
                    ""] + _between_poh_lines(exp.trials, ids)
    L += _table(["PoH configuration", "baseline", "metric", "PoH", "baseline", "Δ",
                 "relative Δ", "Welch p", "paired p", "paired p, Holm"], rows)
    if missing:
        L += ["No baseline of their task: " + ", ".join(ids[t.trial_id] for t in missing) + ".",
              ""]
    L += ["Welch's t-test (unequal variances) over seeds, two-sided; n/a with fewer than two seeds "
          "a side. Paired: the t-test of per-seed differences over the seeds both ran (a seed "
          "fixes the data splits, so this removes split-to-split variance). Holm: the paired p "
          "adjusted for the number of PoH configurations compared with a baseline (per metric).",
          ""]
    for stat in abs_of:
        tested = [q for q in holm_of[stat] if not math.isnan(q)]
        if tested:
            n_sig = sum(q < ALPHA for q in tested)
            L += [f"- {STAT_KEYS[stat]}: {n_sig} of {len(tested)} PoH configurations differ from "
                  f"their baseline (Holm-adjusted paired p < {ALPHA})."]
    L += [""]
    return L + _between_poh_lines(exp.trials, ids) + _bands_lines(abs_of, ids)


def _between_poh_lines(trials: list[Trial], ids: dict[str, str]) -> list[str]:
    """Do the PoH configurations differ from each other? Said plainly, Holm-corrected."""
    pairs = [p for p in poh_pairs(trials) if not math.isnan(p[3])]
    if not pairs:
        return []
    diff = [(a, b, q) for a, b, _, q in pairs if q < ALPHA]
    means = {t.trial_id: trial_stat(t, "test_tau").mean for a, b, _, _ in pairs for t in (a, b)}
    lo, hi = min(means.values()), max(means.values())
    L = ["### Between PoH configurations", "",
         f"{len(means)} PoH configurations, {len(pairs)} pairs compared on "
         f"{STAT_KEYS['test_tau']} (paired t-test over shared seeds, Holm-adjusted over all "
         f"pairs); their means span {sig(lo)} to {sig(hi)}."]
    if not diff:
        L += [f"No two PoH configurations differ significantly (every Holm-adjusted p >= {ALPHA}).",
              ""]
        return L
    L += [f"{len(diff)} pairs differ (Holm-adjusted p < {ALPHA}):", ""]
    L += _table(["configuration", "configuration", "Δ test τ", "paired p, Holm"],
                [[ids[a.trial_id], ids[b.trial_id],
                  _num(means[a.trial_id] - means[b.trial_id]), _p(q)] for a, b, q in diff])
    return L


def _bands_lines(abs_of: dict[str, list[ABResult]], ids: dict[str, str]) -> list[str]:
    """Which of the document's success bands each PoH configuration meets, per metric."""
    rows = []
    for per_poh in zip(*abs_of.values(), strict=True):
        for ab in per_poh:
            met = band_status(ab.base_stat.mean, ab.poh_stat.mean, ab.rel)
            known = not math.isnan(ab.delta)
            rows.append([ids[ab.poh.trial_id], STAT_KEYS[ab.stat],
                         *(("met" if met[b] else "not met") if known else "n/a" for b in BANDS)])
    if not rows:
        return []
    L = ["### The document's success bands", ""]
    L += [", ".join(f"{n}: τ(baseline) > {b}, τ(HRM) > {h}, gain ≥ +{100 * r:.0f} %"
                    for n, (b, h, r) in BANDS.items()) + ". A band is met when all three hold.",
          "The document set these numbers before τ was computed on observed pairs only; "
          "both kinds of τ are checked.", ""]
    return L + _table(["PoH configuration", "metric", *BANDS], rows)


def _routing_section(exp: Experiment, ids: dict[str, str]) -> list[str]:
    # poh_tune.metrics imports torch; importing it here keeps `import poh_tune.report` light.
    from poh_tune.metrics import HERFINDAHL_MAX, MAX_ALPHA_BAND

    rows = []
    for t in exp.trials:
        rr = routing_row(t)
        if rr is None:
            continue
        flag = "healthy" if rr["healthy"] else "FLAGGED: outside the healthy band"
        rows.append([ids[t.trial_id], sig(rr["herfindahl"]), sig(rr["max_alpha"]),
                     flag, f"{rr['unhealthy_epochs']}/{rr['epochs']}"])
    L = ["## Routing health", ""]
    if not rows:
        return L + ["No routing diagnostics in this experiment.", ""]
    L += [f"Healthy band of the document: Herfindahl < {HERFINDAHL_MAX}, mean max α in "
          f"{MAX_ALPHA_BAND[0]}-{MAX_ALPHA_BAND[1]}. A configuration is flagged when any of "
          "its seeds leaves the band; the values shown are means over seeds, last epoch.", ""]
    return L + _table(["PoH configuration", "Herfindahl", "mean max α", "last epoch",
                       "epochs outside the band"], rows)


def _plots_section(plots: dict[str, Path | None]) -> list[str]:
    L = ["## Plots", ""]
    for name in PLOT_FILES:
        L += ([f"![{CAPTIONS[name]}]({name})", ""] if plots.get(name)
              else [f"- {CAPTIONS[name]}: no data.", ""])
    return L


def render_markdown(exp: Experiment, summary: pd.DataFrame, plots: dict[str, Path | None]) -> str:
    """The text of report.md.

    Args:
        exp: the loaded experiment.
        summary: its summary_frame.
        plots: PNG name -> written path, None where there was nothing to plot.
    Returns:
        Markdown.
    """
    labels = config_labels(exp.trials)
    ids = {tid: named(tid, lab) for tid, lab in labels.items()}  # tables without a trial column
    return "\n".join([*_header(exp, summary),
                      *_trials_section(exp, labels),
                      *_per_configuration_section(exp, summary, labels),
                      *_sweeps_section(exp, ids),
                      *_ab_section(exp, summary, ids),
                      *_routing_section(exp, ids),
                      *_plots_section(plots)])
