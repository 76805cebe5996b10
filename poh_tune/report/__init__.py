"""Experiment report: seeds aggregated with 95 % CIs, A/B against the baseline, success bands, ceiling, plots."""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from scipy import stats

from poh_tune.config import ConfigError, read_yaml
from poh_tune.data import VALUE_HIGH, VALUE_LOW, n_visible
from poh_tune.io import atomic_write_bytes, atomic_write_text, read_metrics
from poh_tune.metrics import HERFINDAHL_MAX, MAX_ALPHA_BAND, mean_ci95

TASK_KEYS = ("array_len", "mask_rate", "train_samples")  # a PoH config is compared within its task
# Settings a baseline (one pass, no PoH block, no controller) does not use: left out of its label
# and of the choice of the baseline a PoH configuration is compared with.
POT_ONLY_KEYS = frozenset({
    "max_inner_iters", "hrm_period", "controller", "d_ctrl", "grad_mode", "deep_supervision",
    "temperature_init", "temperature_min", "temperature_decay", "entropy_reg",
    "entropy_decay_rate", "entropy_decay_every", "lr_controller", "clip_controller",
    "controller_warmup_epochs"})
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
LABEL_DIGITS = 4  # significant digits of a float in a configuration's label
SMALL_N = 5  # fewer seeds than this: a CI is shown with its n
FIG_DPI = 100
FIG_SIZE_IN = (8.0, 5.0)  # the heatmap: 800 x 500 pixels
PANEL_SIZE_IN = (5.0, 3.6)  # one panel of a line plot: 500 x 360 pixels
PANEL_COLUMNS = 3
LEGEND_FONT = 7  # points; legends sit under their panel, in a strip sized for them
SUPTITLE_IN = 0.3
Y_AXIS_IN = 0.75  # y label and tick labels left of a panel's plot
MAX_LINES = 10  # a panel with more trials shows the best ones by test τ
PLOT_FILES = ("tau_vs_epoch.png", "tau_vs_iteration.png", "entropy_vs_iteration.png",
              "alpha_heatmap.png")


class ReportError(ValueError):
    """The experiment directory cannot be reported on (no trials, unreadable files)."""


@dataclass
class Stat:
    mean: float
    ci95: float  # Student-t half-width; nan when the per-seed values are unknown
    values: list[float] = field(default_factory=list)  # per seed


@dataclass
class Trial:
    trial_id: str
    trial_dir: Path
    config: dict[str, Any]
    experiments: list[str]
    rows: list[dict[str, Any]]  # metrics.jsonl, one per epoch, ascending
    status: str = "incomplete"  # finished / stopped early / errored / incomplete
    error: str = ""  # the last line of its error, from results.csv

    @property
    def is_pot(self) -> bool:
        return self.config.get("model") == "pot"

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    @property
    def epochs_done(self) -> int:
        return int(self.last.get("epoch", 0))

    @property
    def seeds(self) -> list[int]:
        return list(self.config.get("seeds", []))

    def task(self) -> tuple:
        return tuple(self.config.get(k) for k in TASK_KEYS)


@dataclass
class Experiment:
    exp_dir: Path
    meta: dict[str, Any]  # poh_experiment.yaml, {} when missing
    trials: list[Trial]
    orphans: list[dict[str, Any]]  # results.csv rows with no trial directory


# --- loading --------------------------------------------------------------------------------------
def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    try:
        return bool(v) and not (isinstance(v, float) and math.isnan(v))
    except (TypeError, ValueError):
        return False


def trial_status(epochs_done: int, epochs: int, csv_row: dict[str, Any] | None) -> str:
    """Status of a trial from its results.csv row, or from its metrics when the run was cut short.

    Args:
        epochs_done: last epoch in its metrics.jsonl (0 when none).
        epochs: the epochs its config asked for.
        csv_row: its results.csv row (needs `status`, optionally `stopped_early`), or None.
    Returns:
        "finished", "stopped early", "errored" or "incomplete".
    """
    if csv_row is None:
        return "finished" if epochs_done >= epochs else "incomplete"
    status = str(csv_row.get("status", "")).strip().upper()
    if status == "ERROR":
        return "errored"
    if status == "TERMINATED":
        if _truthy(csv_row.get("stopped_early")) or epochs_done < epochs:
            return "stopped early"
        return "finished"
    return "incomplete"


def load_experiment(exp_dir: str | Path) -> Experiment:
    """Read every trial under `exp_dir` (globbing `**/poh_trial.yaml`) and its results.csv status.

    Args:
        exp_dir: the experiment directory written by `poh_tune.launch`.
    Returns:
        The Experiment; raises ReportError when no trial is found.
    """
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise ReportError(f"{exp_dir}: not a directory")
    meta_path = exp_dir / "poh_experiment.yaml"
    meta = read_yaml(meta_path) if meta_path.is_file() else {}
    meta = meta if isinstance(meta, dict) else {}
    csv_rows: list[dict[str, Any]] = []
    csv_path = exp_dir / "results.csv"
    if csv_path.is_file():
        csv_rows = pd.read_csv(csv_path, dtype={"trial_id": str}).to_dict("records")
    trials: list[Trial] = []
    for spec_path in sorted(exp_dir.glob("**/poh_trial.yaml")):
        spec = read_yaml(spec_path)
        if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
            raise ReportError(f"{spec_path}: expected a mapping with a 'config' mapping")
        tdir = spec_path.parent
        trials.append(Trial(trial_id=str(spec.get("trial_id", tdir.name)), trial_dir=tdir,
                            config=spec["config"], experiments=list(spec.get("experiments") or []),
                            rows=read_metrics(tdir / "metrics.jsonl")))
    if not trials:
        raise ReportError(f"{exp_dir}: no trials found (no **/poh_trial.yaml below it)")
    matched: set[int] = set()
    for t in trials:
        row = None
        for i, r in enumerate(csv_rows):
            same_dir = (isinstance(r.get("trial_dir"), str)
                        and Path(r["trial_dir"]).resolve() == t.trial_dir.resolve())
            if str(r.get("trial_id")) == t.trial_id or same_dir:
                row = r
                matched.add(i)
                break
        t.status = trial_status(t.epochs_done, int(t.config.get("epochs", 0)), row)
        err = row.get("error") if row is not None else None
        t.error = err.strip() if isinstance(err, str) else ""
    orphans = [r for i, r in enumerate(csv_rows) if i not in matched]
    trials.sort(key=lambda t: (t.is_pot, t.trial_id))
    return Experiment(exp_dir, meta, trials, orphans)


# --- statistics -----------------------------------------------------------------------------------
def _finite(vals: list[Any]) -> list[float]:
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
            vals = _finite([r.get(f"tau_seed_{s}") for r in trial.rows])
            if vals:
                out.append(max(vals))
        return out
    return _finite([trial.last.get(f"{stat}_seed_{s}") for s in trial.seeds])


def trial_stat(trial: Trial, stat: str) -> Stat:
    """Mean and 95 % CI over seeds; falls back to the logged mean (CI nan) without per-seed values.

    Args:
        trial: a loaded trial.
        stat: a STAT_KEYS name.
    Returns:
        The Stat (mean nan when the trial logged nothing).
    """
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


def paired_p(pot: Trial, base: Trial, stat: str) -> float:
    """Two-sided p-value of the paired t-test over the seeds both trials ran.

    The same seed gives both configurations the same data splits, so per-seed differences
    remove the split-to-split variance that Welch's test has to carry.

    Args:
        pot: the PoH trial.
        base: the baseline trial.
        stat: "test_tau", "test_tau_all" or "test_perfect_sort".
    Returns:
        The p-value; nan with fewer than 2 shared seeds or identical differences.
    """
    pairs = [(pot.last.get(f"{stat}_seed_{s}"), base.last.get(f"{stat}_seed_{s}"))
             for s in pot.seeds if s in base.seeds]
    pairs = [(a, b) for a, b in pairs if len(_finite([a, b])) == 2]
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


def pot_pairs(trials: list[Trial], stat: str = "test_tau") -> list[tuple[Trial, Trial, float, float]]:
    """Every pair of PoH configurations of the same task with their paired p and Holm's p.

    Args:
        trials: the experiment's trials.
        stat: the per-seed statistic compared.
    Returns:
        (a, b, paired p, Holm-adjusted p) per pair; one family per experiment.
    """
    pots = [t for t in trials if t.is_pot and t.rows]
    pairs = [(a, b) for i, a in enumerate(pots) for b in pots[i + 1:] if a.task() == b.task()]
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
                   if k != "model" and k not in POT_ONLY_KEYS and b.config.get(k) == v)

    return sorted(cands, key=lambda b: (-shared(b), b.trial_id))[0]


@dataclass
class ABResult:
    pot: Trial
    base: Trial
    stat: str
    pot_stat: Stat
    base_stat: Stat
    delta: float
    rel: float  # delta / baseline mean; nan when the baseline mean is 0
    p: float  # Welch
    p_paired: float  # paired over shared seeds


def ab_compare(pot: Trial, base: Trial, stat: str = "test_tau") -> ABResult:
    """Absolute and relative Δ of a statistic (PoH minus baseline); Welch's and paired p.

    Args:
        pot: the PoH trial.
        base: the baseline trial of the same task.
        stat: a STAT_KEYS name.
    Returns:
        The ABResult.
    """
    ps, bs = trial_stat(pot, stat), trial_stat(base, stat)
    delta = ps.mean - bs.mean
    rel = delta / bs.mean if bs.mean != 0 else math.nan
    return ABResult(pot, base, stat, ps, bs, delta, rel, welch_p(ps.values, bs.values),
                    paired_p(pot, base, stat))


def band_status(base_tau: float, pot_tau: float, rel: float) -> dict[str, bool]:
    """Which of the document's success bands are met (all three criteria of a band must hold).

    Args:
        base_tau: mean τ of the baseline.
        pot_tau: mean τ of the PoH configuration.
        rel: relative gain (pot - base) / base.
    Returns:
        {"minimum": bool, "target": bool, "stretch": bool}.
    """
    out = {}
    for name, (b, h, r) in BANDS.items():
        out[name] = bool(base_tau > b and pot_tau > h and not math.isnan(rel) and rel >= r)
    return out


@functools.lru_cache(maxsize=64)
def _oracle_exact(array_len: int, mask_rate: float, value_low: int, value_high: int) -> float:
    N = value_high - value_low
    k = n_visible(array_len, mask_rate)
    L = array_len
    if L > N:
        raise ValueError(f"array_len={L}: at most {N} distinct values exist")
    if k >= L:
        return 1.0
    # One visible value at grid index j (j values of the range below it); the other k-1 visible
    # values are a uniform subset of the other N-1, x of them below j (hypergeometric).
    j = np.arange(N)[:, None]
    x = np.arange(k)[None, :]
    pmf = stats.hypergeom.pmf(x, N - 1, j, k - 1)  # (N, k)
    below = j - x  # candidates (values not visible) below it
    above = (N - 1 - j) - (k - 1 - x)
    # A hidden value is uniform over the N-k candidates; placed at their median, its pair with this
    # visible value scores |P(above) - P(below)| in expectation.
    gain = (pmf * np.abs(above - below)).sum(1).mean() / (N - k)
    pairs = L * (L - 1) / 2
    return float((k * (k - 1) / 2 + (L - k) * k * gain) / pairs)


def visible_in_range(values, obs_mask, value_low: int, value_high: int):
    """(n, N) bool: which values of [value_low, value_high) are visible in each sample.

    Hidden positions write to a spare last column that is dropped, so they never touch the
    slot of a real value.

    Args:
        values: (n, L) long values; obs_mask: (n, L) bool.
    """
    import torch

    N = value_high - value_low
    present = torch.zeros(values.shape[0], N + 1, dtype=torch.bool)
    present.scatter_(1, (values - value_low).masked_fill(~obs_mask, N), True)
    return present[:, :N]


def _oracle_mc(array_len: int, mask_rate: float, n_samples: int, seed: int,
               value_low: int, value_high: int) -> float:
    import torch

    from poh_tune.data import make_split
    from poh_tune.metrics import kendall_tau

    if (value_low, value_high) != (VALUE_LOW, VALUE_HIGH):
        raise ValueError("the Monte Carlo oracle uses the task's own value range")
    d = make_split(n_samples, array_len, mask_rate, seed)
    grid = torch.arange(value_low, value_high).expand(n_samples, -1)  # (n, N)
    present = visible_in_range(d.values, d.obs_mask, value_low, value_high)
    # Candidates sorted ascending, visible values pushed past the end.
    cand = torch.where(present, torch.tensor(10**6), grid).sort(dim=1).values.float()
    c = value_high - value_low - n_visible(array_len, mask_rate)
    median = (cand[:, (c - 1) // 2] + cand[:, c // 2]) / 2  # (n,)
    scores = torch.where(d.obs_mask, d.values.float(), median[:, None])
    return float(kendall_tau(scores, d.values.float()).mean())


def oracle_all_pairs_tau(array_len: int, mask_rate: float, n_samples: int | None = None,
                         seed: int = 0, value_low: int = VALUE_LOW, value_high: int = VALUE_HIGH
                         ) -> float:
    """Expected all-pairs τ of the Bayes-optimal ordering (issue 5, item 4).

    Visible values are sorted exactly; the hidden ones, exchangeable, are placed together at the
    median of the values still possible; hidden-hidden pairs are ties (0 in expectation anyway).

    Args:
        array_len: L.
        mask_rate: share of hidden positions (n_visible as in poh_tune.data).
        n_samples: None for the exact expectation; an int for a Monte Carlo estimate on the task's
            own generator (`make_split`).
        seed: seed of the Monte Carlo samples.
        value_low: lowest value of the range (inclusive).
        value_high: end of the range (exclusive).
    Returns:
        The expected all-pairs τ (about 0.50 at L=20, mask 0.5).
    """
    if n_samples is None:
        return _oracle_exact(int(array_len), float(mask_rate), int(value_low), int(value_high))
    return _oracle_mc(array_len, mask_rate, n_samples, seed, value_low, value_high)


# --- labels and tables ----------------------------------------------------------------------------
def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def varying_keys(trials: list[Trial]) -> list[str]:
    """Config keys whose value differs between trials, in config order."""
    keys: list[str] = []
    for t in trials:
        for k in t.config:
            if k not in keys:
                keys.append(k)
    return [k for k in keys
            if len({_hashable(t.config.get(k)) for t in trials}) > 1 and k != "seeds"]


def _short(v: Any, digits: int = LABEL_DIGITS) -> str:
    """A config value for a label: floats to `digits` significant digits."""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def label_digits(trials: list[Trial], keys: list[str]) -> dict[str, dict[float, int]]:
    """Significant digits of each float value per key: LABEL_DIGITS, more only for a value that
    would otherwise look equal to another one of the same key."""
    out: dict[str, dict[float, int]] = {}
    for k in keys:
        vals = {v for t in trials if isinstance(v := t.config.get(k), float)}
        out[k] = {}
        for v in vals:
            d = LABEL_DIGITS
            while d < 17 and any(_short(w, d) == _short(v, d) for w in vals if w != v):
                d += 1
            out[k][v] = d
    return out


def trial_label(trial: Trial, keys: list[str],
                digits: dict[str, dict[float, int]] | None = None) -> str:
    """What sets this configuration apart: the varying keys, rounded (the model where it varies)."""
    digits = digits or {}

    def value(k: str) -> str:
        v = trial.config.get(k)
        return _short(v, digits.get(k, {}).get(v, LABEL_DIGITS) if isinstance(v, float)
                      else LABEL_DIGITS)

    parts = [str(trial.config.get("model"))] if "model" in keys else []
    parts += [f"{k}={value(k)}" for k in keys
              if k != "model" and (trial.is_pot or k not in POT_ONLY_KEYS)]
    return " ".join(parts) or str(trial.config.get("model"))


def config_labels(trials: list[Trial]) -> dict[str, str]:
    """trial_id -> trial_label, for the tables (beside the trial id) and the plots' legends."""
    keys = varying_keys(trials)
    digits = label_digits(trials, keys)
    return {t.trial_id: trial_label(t, keys, digits) for t in trials}


def named(trial_id: str, label: str) -> str:
    """A legend entry or table cell that carries the trial id the tables share."""
    return f"{trial_id}: {label}"


def _fmt(s: Stat) -> str:
    if math.isnan(s.mean):
        return "n/a"
    if math.isnan(s.ci95):
        return f"{s.mean:.3f} (no per-seed values)"
    n = len(s.values)
    if n == 1:
        return f"{s.mean:.3f} (1 seed: CI n/a)"
    # t(0.975) is 12.7 at n=2 and 4.3 at n=3: say n where the interval is that wide.
    return f"{s.mean:.3f} ± {s.ci95:.3f}" + (f" (n={n})" if n < SMALL_N else "")


def _num(v: float, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:+.1f} %" if pct else f"{v:+.3f}"


def _p(v: float) -> str:
    return "n/a" if math.isnan(v) else (f"{v:.2e}" if v < 1e-3 else f"{v:.3f}")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |"
              for r in rows]
    return lines + [""]


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
    if not trial.is_pot or not rows:
        return None
    last = rows[-1]
    bad = sum(1 for r in rows if not _truthy(r["routing_healthy"]))
    return {"herfindahl": float(last["herfindahl"]), "max_alpha": float(last["max_alpha"]),
            "healthy": _truthy(last["routing_healthy"]), "unhealthy_epochs": bad,
            "epochs": len(rows)}


# --- plots ----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _iter_series(row: dict[str, Any], prefix: str) -> list[float]:
    out, t = [], 0
    while f"{prefix}_{t}" in row:
        out.append(float(row[f"{prefix}_{t}"]))
        t += 1
    return out


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI)  # no bbox "tight": the size stays fixed
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


@dataclass
class Panel:
    title: str
    trials: list[Trial]
    labels: dict[str, str]  # trial_id -> legend entry


def plot_panels(exp: Experiment, labels: dict[str, str]) -> list[Panel]:
    """One panel per grid experiment (lines named by the swept value), one for the other trials.

    Args:
        exp: the loaded experiment.
        labels: trial_id -> full configuration label (used outside experiments).
    Returns:
        The panels, in the order of poh_experiment.yaml.
    """
    panels: list[Panel] = []
    for name, info in (exp.meta.get("experiments") or {}).items():
        members = [t for t in exp.trials if name in t.experiments]
        if not members:
            continue
        key = (info or {}).get("swept") or "model"
        members.sort(key=lambda t: (_sort_key(t.config.get(key)), t.trial_id))
        panels.append(Panel(name, members, {
            t.trial_id: named(t.trial_id, f"{key}={_short(t.config.get(key))}") for t in members}))
    covered = {t.trial_id for p in panels for t in p.trials}
    rest = [t for t in exp.trials if t.trial_id not in covered]
    if rest:
        panels.append(Panel("other configurations" if panels else "all configurations", rest,
                            {t.trial_id: named(t.trial_id, labels[t.trial_id]) for t in rest}))
    return panels


def panel_grid(n_panels: int) -> tuple[int, int]:
    """(rows, columns) of a figure of `n_panels` panels, at most PANEL_COLUMNS wide."""
    cols = min(PANEL_COLUMNS, max(1, n_panels))
    return math.ceil(max(1, n_panels) / cols), cols


def text_width_in(text: str, size: float = LEGEND_FONT) -> float:
    """Width in inches of `text` in matplotlib's default font at `size` points."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    width_pt, _, _ = TextToPath().get_text_width_height_descent(
        text, FontProperties(size=size), ismath=False)
    return width_pt / 72


def legend_size_in(entries: list[str]) -> tuple[float, float]:
    """(width, height) in inches of a one-column legend of `entries` at LEGEND_FONT points."""
    if not entries:
        return 0.0, 0.0
    em = LEGEND_FONT / 72
    # Legend defaults in font sizes: handle 2 + its gap 0.8, 0.5 between rows, 0.4 padding.
    width = max(text_width_in(e) for e in entries) * 1.05 + 3.6 * em
    height = len(entries) * 1.5 * em + 1.2 * em
    return width, height


def panel_layout(panels: list[Panel]) -> tuple[int, int, float, list[float]]:
    """(rows, columns, column width, legend height of each row) in inches, legends under panels.

    A column is as wide as the widest legend (at least PANEL_SIZE_IN wide), and a row of panels
    is followed by a strip as tall as its tallest legend, so no legend overlaps a plot.
    """
    rows, cols = panel_grid(len(panels))
    sizes = [legend_size_in([p.labels[t.trial_id] for t in _best_first(p.trials)])
             for p in panels]
    # The legend starts under the plot's left edge, right of the y label and tick labels.
    width = max([PANEL_SIZE_IN[0], *(w + Y_AXIS_IN + 0.2 for w, _ in sizes)])
    legend_h = [max(h for _, h in sizes[r * cols:(r + 1) * cols]) for r in range(rows)]
    return rows, cols, width, legend_h


def _best_first(trials: list[Trial]) -> list[Trial]:
    """At most MAX_LINES trials, the best by mean test τ, in their original order."""
    if len(trials) <= MAX_LINES:
        return trials
    keep = sorted(trials, key=lambda t: -np.nan_to_num(trial_stat(t, "test_tau").mean,
                                                      nan=-np.inf))[:MAX_LINES]
    return [t for t in trials if t in keep]


def _draw_panels(panels: list[Panel], draw, ylabel: str, xlabel: str, suptitle: str,
                 path: Path) -> Path | None:
    """Lay out one axis per panel (at most PANEL_COLUMNS a row); `draw(ax, panel)` plots one."""
    panels = [p for p in panels if p.trials]
    if not panels:
        return None
    plt = _pyplot()
    rows, cols, width, legend_h = panel_layout(panels)
    fig = plt.figure(layout="constrained", figsize=(
        cols * width, rows * PANEL_SIZE_IN[1] + sum(legend_h) + SUPTITLE_IN))
    heights = [h for r in range(rows) for h in (PANEL_SIZE_IN[1], max(legend_h[r], 0.01))]
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=heights)
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        ax = fig.add_subplot(grid[2 * r, c])
        shown = _best_first(panel.trials)
        title = panel.title
        if len(shown) < len(panel.trials):
            title += f" ({len(shown)} best of {len(panel.trials)} by test τ)"
        draw(ax, Panel(title, shown, panel.labels))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        handles, entries = ax.get_legend_handles_labels()
        if handles:
            leg_ax = fig.add_subplot(grid[2 * r + 1, c])
            leg_ax.axis("off")
            leg_ax.legend(handles, entries, loc="upper left", fontsize=LEGEND_FONT,
                          frameon=False, borderaxespad=0.0)
    fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def plot_tau_vs_epoch(panels: list[Panel], path: Path) -> Path | None:
    """Dev τ against epoch per configuration: mean over seeds with its 95 % CI band.

    Args:
        panels: from plot_panels.
        path: the PNG to write.
    Returns:
        The path, or None when no trial has metrics.
    """
    def draw(ax, panel: Panel) -> None:
        for t in panel.trials:
            if not t.rows:
                continue
            ep, mean, lo, hi = [], [], [], []
            for r in t.rows:
                vals = _finite([r.get(f"tau_seed_{s}") for s in t.seeds]) or _finite([r.get("tau")])
                m, h = mean_ci95(vals)
                ep.append(r["epoch"])
                mean.append(m)
                # τ lives in [-1, 1]; with two seeds the t interval alone is wider than that.
                lo.append(max(-1.0, m - h))
                hi.append(min(1.0, m + h))
            (line,) = ax.plot(ep, mean, marker="." if len(ep) < 30 else None,
                              label=panel.labels[t.trial_id])
            ax.fill_between(ep, lo, hi, color=line.get_color(), alpha=0.15)

    panels = [Panel(p.title, [t for t in p.trials if t.rows], p.labels) for p in panels]
    return _draw_panels(panels, draw, "dev τ (mask-aware)", "epoch",
                        "Dev τ per epoch: mean over seeds, 95 % CI band (clipped to [-1, 1])",
                        path)


def plot_per_iteration(panels: list[Panel], prefix: str, ylabel: str, suptitle: str,
                       path: Path) -> Path | None:
    """A per-inner-iteration metric (`<prefix>_<t>`) at the last epoch of every PoH trial.

    Args:
        panels: from plot_panels; trials without the metric (baselines) are left out.
        prefix: "tau_iter" or "entropy_iter".
        ylabel: the y axis label.
        suptitle: the figure title.
        path: the PNG to write.
    Returns:
        The path, or None when no PoH trial has the metric.
    """
    def draw(ax, panel: Panel) -> None:
        for t in panel.trials:
            s = _iter_series(t.last, prefix)
            ax.plot(range(1, len(s) + 1), s, marker=".", label=panel.labels[t.trial_id])
        if prefix == "entropy_iter":
            for h in sorted({int(t.config.get("n_heads", 0)) for t in panel.trials}):
                if h > 1:  # the entropy of uniform routing over h heads
                    ax.axhline(math.log(h), ls="--", color="grey", lw=0.8)

    panels = [Panel(p.title, [t for t in p.trials if t.is_pot and _iter_series(t.last, prefix)],
                    p.labels) for p in panels]
    return _draw_panels(panels, draw, ylabel, "inner iteration", suptitle, path)


def alpha_matrix(row: dict[str, Any]) -> np.ndarray | None:
    """Mean α as an (iterations, heads) array from `alpha_iter_<t>_head_<h>` keys, or None."""
    cells = {}
    for k, v in row.items():
        if k.startswith("alpha_iter_") and "_head_" in k:
            t, h = k[len("alpha_iter_"):].split("_head_")
            cells[int(t), int(h)] = float(v)
    if not cells:
        return None
    T = max(t for t, _ in cells) + 1
    H = max(h for _, h in cells) + 1
    a = np.full((T, H), np.nan)
    for (t, h), v in cells.items():
        a[t, h] = v
    return a


def plot_alpha_heatmap(trial: Trial, label: str, path: Path) -> Path | None:
    """Heatmap of mean α (inner iteration x head) at the trial's last epoch."""
    a = alpha_matrix(trial.last)
    if a is None:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIG_SIZE_IN, layout="constrained")
    vmax = max(1e-9, float(np.nanmax(a)))
    im = ax.imshow(a, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
    if a.size <= 200:
        for (t, h), v in np.ndenumerate(a):
            ax.text(h, t, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="k" if v > 0.6 * vmax else "w")
    ax.set_xticks(range(a.shape[1]))
    ax.set_xticklabels(range(1, a.shape[1] + 1))  # heads and iterations count from 1
    ax.set_yticks(range(a.shape[0]))
    ax.set_yticklabels(range(1, a.shape[0] + 1))
    ax.set_xlabel("head")
    ax.set_ylabel("inner iteration")
    # Wrapped to the figure's width: a long label no longer pushes the title off its left edge.
    chars = int(FIG_SIZE_IN[0] * 72 / (0.6 * 9))
    ax.set_title(textwrap.fill(f"Mean α, best PoH configuration ({label}), last epoch", chars),
                 fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


# --- the report -----------------------------------------------------------------------------------
def summary_frame(exp: Experiment) -> pd.DataFrame:
    """One row per configuration: status, its varying settings, statistics, ceiling, routing, A/B.

    Args:
        exp: the loaded experiment.
    Returns:
        The summary table written to summary.csv.
    """
    keys = varying_keys(exp.trials)
    labels = config_labels(exp.trials)
    baselines = [t for t in exp.trials if not t.is_pot]
    rows = []
    for t in exp.trials:
        r: dict[str, Any] = {"trial_id": t.trial_id, "label": labels[t.trial_id],
                             "status": t.status, "epochs_done": t.epochs_done,
                             "epochs": t.config.get("epochs"), "n_seeds": len(t.seeds),
                             "experiments": ";".join(t.experiments)}
        for k in dict.fromkeys(["model", *TASK_KEYS, *keys]):
            v = t.config.get(k)
            r[k] = json.dumps(v) if isinstance(v, list) else v
        for stat in STAT_KEYS:
            s = trial_stat(t, stat)
            r[f"{stat}_mean"], r[f"{stat}_ci95"], r[f"{stat}_n"] = s.mean, s.ci95, len(s.values)
        r["oracle_tau_all"] = oracle_all_pairs_tau(t.config.get("array_len", 20),
                                                   t.config.get("mask_rate", 0.5))
        rr = routing_row(t)
        r["herfindahl"] = rr["herfindahl"] if rr else math.nan
        r["max_alpha"] = rr["max_alpha"] if rr else math.nan
        r["routing_healthy"] = rr["healthy"] if rr else None
        base = match_baseline(t, baselines) if t.is_pot else None
        r["baseline_trial_id"] = base.trial_id if base else None
        for stat in ("test_tau", "test_tau_all"):
            ab = ab_compare(t, base, stat) if base else None
            r[f"delta_{stat}"] = ab.delta if ab else math.nan
            r[f"rel_delta_{stat}"] = ab.rel if ab else math.nan
            r[f"p_{stat}"] = ab.p if ab else math.nan
            r[f"p_paired_{stat}"] = ab.p_paired if ab else math.nan
        rows.append(r)
    return pd.DataFrame(rows)


def _sort_key(v: Any) -> tuple:
    """Numbers in numeric order, then everything else by its text (None last)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1 if v is not None else 2, 0.0, str(v))


def _sweep_sections(exp: Experiment, labels: dict[str, str]) -> list[str]:
    lines: list[str] = []
    experiments = exp.meta.get("experiments") or {}
    for name, info in experiments.items():
        info = info or {}
        swept = info.get("swept")
        members = [t for t in exp.trials if name in t.experiments]
        if not members:
            continue
        key = swept or "model"
        members.sort(key=lambda t: (_sort_key(t.config.get(key)), t.trial_id))
        lines += [f"### {name}", ""]
        if info.get("description"):
            lines += [str(info["description"]), ""]
        rows = [[t.config.get(key), labels[t.trial_id], t.status,
                 *(_fmt(trial_stat(t, s)) for s in STAT_KEYS)] for t in members]
        lines += _table([key, "configuration", "status", *STAT_KEYS.values()], rows)
    return lines


def _pot_vs_pot_lines(trials: list[Trial], labels: dict[str, str]) -> list[str]:
    """Do the PoH configurations differ from each other? Said plainly, Holm-corrected."""
    pairs = [p for p in pot_pairs(trials) if not math.isnan(p[3])]
    if not pairs:
        return []
    sig = [(a, b, q) for a, b, _, q in pairs if q < ALPHA]
    means = {t.trial_id: trial_stat(t, "test_tau").mean for a, b, _, _ in pairs for t in (a, b)}
    lo, hi = min(means.values()), max(means.values())
    L = ["### Between PoH configurations", "",
         f"{len(means)} PoH configurations, {len(pairs)} pairs compared on "
         f"{STAT_KEYS['test_tau']} (paired t-test over shared seeds, Holm-adjusted over all "
         f"pairs); their means span {lo:.3f}-{hi:.3f}."]
    if not sig:
        L += [f"No two PoH configurations differ significantly (every Holm-adjusted p >= {ALPHA}).",
              ""]
        return L
    L += [f"{len(sig)} pairs differ (Holm-adjusted p < {ALPHA}):", ""]
    L += _table(["configuration", "configuration", "Δ test τ", "paired p, Holm"],
                [[labels[a.trial_id], labels[b.trial_id],
                  _num(means[a.trial_id] - means[b.trial_id]), _p(q)] for a, b, q in sig])
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
    by_id = {t.trial_id: t for t in exp.trials}
    meta = exp.meta
    counts = summary["status"].value_counts().to_dict()
    L: list[str] = [f"# Experiment report: {exp.exp_dir.name}", ""]
    L += [f"- Directory: `{exp.exp_dir}`",
          f"- Mode: {meta.get('mode', 'unknown')}; search metric: {meta.get('metric', 'tau')} "
          f"({meta.get('metric_mode', 'max')})",
          f"- Trials: {len(exp.trials)} ("
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")",
          "- Statistics are means over a configuration's seeds with 95 % confidence half-widths "
          "(Student t, n-1 degrees of freedom). Test metrics are taken at each seed's best dev "
          "epoch (the fair protocol); dev τ is each seed's best dev τ.", ""]

    L += ["## Trials", ""]
    rows = [[t.trial_id, labels[t.trial_id], t.status, f"{t.epochs_done}/{t.config.get('epochs')}",
             ", ".join(t.experiments) or "-", t.error[:200] or "-"] for t in exp.trials]
    rows += [[str(o.get("trial_id")), "(no trial directory)",
              trial_status(0, 1, o), "-", "-",
              (o.get("error") if isinstance(o.get("error"), str) else "")[:200] or "-"]
             for o in exp.orphans]
    L += _table(["trial", "configuration", "status", "epochs", "experiments", "error"], rows)

    L += ["## Per configuration", ""]
    rows = []
    for t in exp.trials:
        r = summary.loc[summary.trial_id == t.trial_id].iloc[0]
        rows.append([t.trial_id, labels[t.trial_id], t.status,
                     len(trial_stat(t, "test_tau").values),
                     *(_fmt(trial_stat(t, s)) for s in ("test_tau", "dev_tau", "test_tau_all")),
                     f"{r.oracle_tau_all:.3f}", _fmt(trial_stat(t, "test_perfect_sort"))])
    L += _table(["trial", "configuration", "status", "seeds", STAT_KEYS["test_tau"],
                 STAT_KEYS["dev_tau"], STAT_KEYS["test_tau_all"],
                 "all-pairs τ ceiling (Bayes-optimal)", STAT_KEYS["test_perfect_sort"]], rows)
    L += ["The ceiling is the expected all-pairs τ of the Bayes-optimal ordering: visible values "
          "sorted exactly, the hidden ones placed together at the median of the values still "
          "possible. Mask-aware τ has the ceiling 1.", ""]

    sweeps = _sweep_sections(exp, ids)
    if sweeps:
        L += ["## Sweeps", ""] + sweeps

    L += ["## A/B: PoH against the baseline of the same task", ""]
    pots = [t for t in exp.trials if t.is_pot]
    ab_rows, band_rows = [], []
    abs_of: dict[str, list[ABResult]] = {"test_tau": [], "test_tau_all": []}
    for t in pots:
        bid = summary.loc[summary.trial_id == t.trial_id, "baseline_trial_id"].iloc[0]
        if bid is None or (isinstance(bid, float) and math.isnan(bid)):
            ab_rows.append([ids[t.trial_id], "no baseline of this task", *["n/a"] * 8])
            continue
        for stat in abs_of:
            abs_of[stat].append(ab_compare(t, by_id[bid], stat))
    # Holm over each metric's family of PoH-vs-baseline comparisons: many configurations
    # compared with one baseline would otherwise find "significant" gains by chance.
    holm_of = {stat: holm([ab.p_paired for ab in abl]) for stat, abl in abs_of.items()}
    for i, ab_tau in enumerate(abs_of["test_tau"]):
        for stat in abs_of:
            ab, q = abs_of[stat][i], holm_of[stat][i]
            pid, bid = ab_tau.pot.trial_id, ab_tau.base.trial_id
            ab_rows.append([ids[pid], ids[bid], STAT_KEYS[stat], _fmt(ab.pot_stat),
                            _fmt(ab.base_stat), _num(ab.delta), _num(ab.rel, pct=True), _p(ab.p),
                            _p(ab.p_paired), _p(q)])
            met = band_status(ab.base_stat.mean, ab.pot_stat.mean, ab.rel)
            known = not math.isnan(ab.delta)
            band_rows.append([ids[pid], STAT_KEYS[stat],
                              *(("met" if met[b] else "not met") if known else "n/a"
                                for b in BANDS)])
    if pots:
        L += _table(["PoH configuration", "baseline", "metric", "PoH", "baseline", "Δ", "relative Δ",
                     "Welch p", "paired p", "paired p, Holm"], ab_rows)
    else:
        L += ["No PoH configuration in this experiment.", ""]
    L += ["Welch's t-test (unequal variances) over seeds, two-sided; n/a with fewer than two seeds "
          "a side. Paired: the t-test of per-seed differences over the seeds both ran (a seed "
          "fixes the data splits, so this removes split-to-split variance). Holm: the paired p "
          "adjusted for the number of PoH configurations compared with a baseline (per metric).",
          ""]
    for stat in abs_of:
        tested = [q for q in holm_of[stat] if not math.isnan(q)]
        if tested:
            sig = sum(q < ALPHA for q in tested)
            L += [f"- {STAT_KEYS[stat]}: {sig} of {len(tested)} PoH configurations differ from "
                  f"their baseline (Holm-adjusted paired p < {ALPHA})."]
    L += [""]
    L += _pot_vs_pot_lines(exp.trials, ids)
    if band_rows:
        L += ["### The document's success bands", ""]
        L += [", ".join(f"{n}: τ(baseline) > {b}, τ(HRM) > {h}, gain ≥ +{100 * r:.0f} %"
                        for n, (b, h, r) in BANDS.items()) + ". A band is met when all three hold.",
              "The document set these numbers before τ was computed on observed pairs only; "
              "both kinds of τ are checked.", ""]
        L += _table(["PoH configuration", "metric", *BANDS], band_rows)

    L += ["## Routing health", ""]
    rrows = []
    for t in pots:
        rr = routing_row(t)
        if rr is None:
            continue
        flag = "healthy" if rr["healthy"] else "FLAGGED: outside the healthy band"
        rrows.append([ids[t.trial_id], f"{rr['herfindahl']:.3f}", f"{rr['max_alpha']:.3f}",
                      flag, f"{rr['unhealthy_epochs']}/{rr['epochs']}"])
    if rrows:
        L += [f"Healthy band of the document: Herfindahl < {HERFINDAHL_MAX}, mean max α in "
              f"{MAX_ALPHA_BAND[0]}-{MAX_ALPHA_BAND[1]}. A configuration is flagged when any of "
              "its seeds leaves the band; the values shown are means over seeds, last epoch.",
              ""]
        L += _table(["PoH configuration", "Herfindahl", "mean max α", "last epoch",
                     "epochs outside the band"], rrows)
    else:
        L += ["No routing diagnostics in this experiment.", ""]

    L += ["## Plots", ""]
    captions = {
        "tau_vs_epoch.png": "Dev τ per epoch (mean over seeds, 95 % CI band)",
        "tau_vs_iteration.png": "Dev τ per inner iteration, last epoch (should rise, then plateau)",
        "entropy_vs_iteration.png": "Routing entropy per inner iteration, last epoch",
        "alpha_heatmap.png": "Mean α per inner iteration and head, best PoH configuration",
    }
    for name in PLOT_FILES:
        p = plots.get(name)
        L += [f"![{captions[name]}]({name})", ""] if p else [f"- {captions[name]}: no data.", ""]
    return "\n".join(L)


def write_report(exp_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.md, summary.csv and the PNG plots of an experiment.

    Args:
        exp_dir: the experiment directory (trials found by globbing `**/poh_trial.yaml`).
        out_dir: where to write; the experiment directory when None.
    Returns:
        The path of report.md.
    """
    exp = load_experiment(exp_dir)
    out = Path(out_dir) if out_dir is not None else exp.exp_dir
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_frame(exp)
    labels = {t.trial_id: r for t, r in zip(exp.trials, summary["label"], strict=True)}
    pots = [t for t in exp.trials if t.is_pot and alpha_matrix(t.last) is not None]
    best = max(pots, key=lambda t: np.nan_to_num(trial_stat(t, "test_tau").mean, nan=-np.inf),
               default=None)
    panels = plot_panels(exp, labels)
    plots = {
        "tau_vs_epoch.png": plot_tau_vs_epoch(panels, out / "tau_vs_epoch.png"),
        "tau_vs_iteration.png": plot_per_iteration(
            panels, "tau_iter", "dev τ (mask-aware)",
            "τ per inner iteration, last epoch (should rise, then plateau)",
            out / "tau_vs_iteration.png"),
        "entropy_vs_iteration.png": plot_per_iteration(
            panels, "entropy_iter", "routing entropy (nats)",
            "Routing entropy per inner iteration, last epoch (dashed: uniform over the heads)",
            out / "entropy_vs_iteration.png"),
        "alpha_heatmap.png": (plot_alpha_heatmap(best, named(best.trial_id, labels[best.trial_id]),
                                                 out / "alpha_heatmap.png") if best else None),
    }
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    path = out / "report.md"
    atomic_write_text(path, render_markdown(exp, summary, plots))
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m poh_tune.report <exp_dir> [--out DIR]`; exit 2 when there is nothing to report."""
    ap = argparse.ArgumentParser(prog="python -m poh_tune.report", description=__doc__)
    ap.add_argument("exp_dir", help="experiment directory written by poh_tune.launch")
    ap.add_argument("--out", default=None, help="output directory (default: the experiment dir)")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.exp_dir, args.out)
    except (ReportError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0

