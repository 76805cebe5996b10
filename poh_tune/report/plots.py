"""The report's PNGs: τ per epoch, τ and routing entropy per inner iteration, the α heatmap."""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from poh_tune.fmt import MIN_CI_SEEDS, TAU_RANGE, sig
from poh_tune.io import atomic_write_bytes
from poh_tune.record import ALPHA, seed_value
from poh_tune.report.labels import named
from poh_tune.report.load import Experiment, Trial
from poh_tune.report.panels import (
    LEGEND_FONT,
    PANEL_SIZE_IN,
    Panel,
    best_first,
    panel_layout,
    plot_panels,
)
from poh_tune.report.stats import finite, trial_stat

FIG_DPI = 100
FIG_SIZE_IN = (8.0, 5.0)  # the heatmap: 800 x 500 pixels
SUPTITLE_IN = 0.3
PLOT_FILES = ("tau_vs_epoch.png", "tau_vs_iteration.png", "entropy_vs_iteration.png",
              "alpha_heatmap.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _iter_series(row: dict[str, Any], key: str) -> list[float]:
    """A per-inner-iteration list of the record (record.PER_ITERATION), [] where it has none."""
    return [float(v) for v in row.get(key) or ()]


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI)  # no bbox "tight": the size stays fixed
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


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
        shown = best_first(panel.trials)
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
    # poh_tune.metrics imports torch; importing it here keeps `import poh_tune.report` light.
    from poh_tune.metrics import mean_ci95

    def draw(ax, panel: Panel) -> None:
        for t in panel.trials:
            if not t.rows:
                continue
            ep, mean, lo, hi = [], [], [], []
            for r in t.rows:
                vals = (finite([seed_value(r, "tau", s) for s in t.seeds])
                        or finite([r.get("tau")]))
                m, h = mean_ci95(vals)  # h is nan below fmt.MIN_CI_SEEDS seeds: no band
                ep.append(r["epoch"])
                mean.append(m)
                # τ lives in [-1, 1]: the band never runs past it.
                lo.append(m if math.isnan(h) else max(TAU_RANGE[0], m - h))
                hi.append(m if math.isnan(h) else min(TAU_RANGE[1], m + h))
            (line,) = ax.plot(ep, mean, marker="." if len(ep) < 30 else None,
                              label=panel.labels[t.trial_id])
            ax.fill_between(ep, lo, hi, color=line.get_color(), alpha=0.15)

    panels = [Panel(p.title, [t for t in p.trials if t.rows], p.labels) for p in panels]
    return _draw_panels(panels, draw, "dev τ (mask-aware)", "epoch",
                        "Dev τ per epoch: mean over seeds, 95 % CI band (clipped to [-1, 1]; "
                        f"none below {MIN_CI_SEEDS} seeds)",
                        path)


def plot_per_iteration(panels: list[Panel], key: str, ylabel: str, suptitle: str,
                       path: Path) -> Path | None:
    """A per-inner-iteration metric (a record's list) at the last epoch of every PoH trial.

    Args:
        panels: from plot_panels; trials without the metric (baselines) are left out.
        key: "tau_iter" or "entropy_iter".
        ylabel: the y axis label.
        suptitle: the figure title.
        path: the PNG to write.
    Returns:
        The path, or None when no PoH trial has the metric.
    """
    def draw(ax, panel: Panel) -> None:
        for t in panel.trials:
            s = _iter_series(t.last, key)
            ax.plot(range(1, len(s) + 1), s, marker=".", label=panel.labels[t.trial_id])
        if key == "entropy_iter":
            for h in sorted({int(t.setting("n_heads")) for t in panel.trials}):
                if h > 1:  # the entropy of uniform routing over h heads
                    ax.axhline(math.log(h), ls="--", color="grey", lw=0.8)

    panels = [Panel(p.title, [t for t in p.trials if t.is_poh and _iter_series(t.last, key)],
                    p.labels) for p in panels]
    return _draw_panels(panels, draw, ylabel, "inner iteration", suptitle, path)


def alpha_matrix(row: dict[str, Any]) -> np.ndarray | None:
    """Mean α of the record as an (iterations, heads) array, or None."""
    a = row.get(ALPHA)
    return np.array(a, dtype=float) if a else None


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
            ax.text(h, t, sig(v), ha="center", va="center", fontsize=7,
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


def write_plots(exp: Experiment, labels: dict[str, str], out: Path) -> dict[str, Path | None]:
    """Write every plot of PLOT_FILES into `out`.

    Args:
        exp: the loaded experiment.
        labels: trial_id -> configuration label (config_labels).
        out: the output directory.
    Returns:
        PNG name -> written path, None where there was nothing to plot.
    """
    pohs = [t for t in exp.trials if t.is_poh and alpha_matrix(t.last) is not None]
    best = max(pohs, key=lambda t: np.nan_to_num(trial_stat(t, "test_tau").mean, nan=-np.inf),
               default=None)
    panels = plot_panels(exp, labels)
    return {
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
