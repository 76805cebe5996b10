"""The panels of a line plot: which trials share an axis, and how large each panel and legend is."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from poh_tune.report.labels import named, sort_key, swept_keys, swept_label
from poh_tune.report.load import Experiment, Trial
from poh_tune.report.stats import trial_stat

PANEL_SIZE_IN = (5.0, 3.6)  # one panel of a line plot: 500 x 360 pixels
PANEL_COLUMNS = 3
LEGEND_FONT = 7  # points; legends sit under their panel, in a strip sized for them
Y_AXIS_IN = 0.75  # y label and tick labels left of a panel's plot
MAX_LINES = 10  # a panel with more trials shows the best ones by test τ


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
        keys = swept_keys(info)
        members.sort(key=lambda t: (*(sort_key(t.config.get(k)) for k in keys), t.trial_id))
        panels.append(Panel(name, members, {
            t.trial_id: named(t.trial_id, swept_label(t, keys)) for t in members}))
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
    sizes = [legend_size_in([p.labels[t.trial_id] for t in best_first(p.trials)])
             for p in panels]
    # The legend starts under the plot's left edge, right of the y label and tick labels.
    width = max([PANEL_SIZE_IN[0], *(w + Y_AXIS_IN + 0.2 for w, _ in sizes)])
    legend_h = [max(h for _, h in sizes[r * cols:(r + 1) * cols]) for r in range(rows)]
    return rows, cols, width, legend_h


def best_first(trials: list[Trial]) -> list[Trial]:
    """At most MAX_LINES trials, the best by mean test τ, in their original order."""
    if len(trials) <= MAX_LINES:
        return trials
    keep = sorted(trials, key=lambda t: -np.nan_to_num(trial_stat(t, "test_tau").mean,
                                                      nan=-np.inf))[:MAX_LINES]
    return [t for t in trials if t in keep]
