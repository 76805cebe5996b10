"""report.plots and report.panels: every PNG opens at its size; labels and legends fit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import yaml
from PIL import Image
from synthetic_experiment import build_and_report, trial_config, write_trial

from poh_tune.report import plots, write_report
from poh_tune.report.labels import config_labels
from poh_tune.report.load import load_experiment
from poh_tune.report.panels import panel_grid
from poh_tune.report.plots import PLOT_FILES


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_and_report(tmp_path_factory.mktemp("exp"))


def test_every_png_opens_at_the_expected_size(built):
    root, _, path, _ = built
    # Panels: baseline_vs_hrm, iterations, and the trials of no experiment (b2, p3): one row of
    # three columns, each at least 500 x 360 pixels plus the legend strip under it.
    assert panel_grid(3) == (1, 3) and panel_grid(5) == (2, 3)
    for name in ("tau_vs_epoch.png", "tau_vs_iteration.png", "entropy_vs_iteration.png"):
        with Image.open(root / name) as im:
            im.verify()
        with Image.open(root / name) as im:
            assert im.format == "PNG", name
            assert im.size[0] >= 1500 and 360 < im.size[1] < 700, (name, im.size)
    with Image.open(root / "alpha_heatmap.png") as im:
        assert im.size == (800, 500)
    for name in PLOT_FILES:
        assert f"]({name})" in path.read_text()


def test_long_float_configs_get_short_labels_and_legends_that_fit(tmp_path, monkeypatch):
    """Optuna-like configurations: labels rounded, legends inside the figure, no layout warning."""
    rng = np.random.default_rng(1)
    (tmp_path / "poh_experiment.yaml").write_text(yaml.safe_dump({"mode": "optuna"}))
    for i in range(8):
        cfg = trial_config(temperature_init=float(rng.uniform(1.5, 3.0)),
                           temperature_min=float(rng.uniform(0.5, 1.2)),
                           temperature_decay=float(rng.uniform(0.9, 0.99)),
                           entropy_reg=float(rng.uniform(2e-4, 5e-3)), seeds=[1, 2])
        write_trial(tmp_path, f"t{i}", cfg, [], {"test_tau": [0.3, 0.4] + [0.0] * 3,
                                                  "test_tau_all": [0.1] * 5,
                                                  "test_perfect_sort": [0.0] * 5}, 3, rng)
    # Two configurations that differ only in the 6th digit keep distinct labels.
    write_trial(tmp_path, "near", trial_config(temperature_init=2.000001, temperature_min=0.8,
                                               temperature_decay=0.95, entropy_reg=1e-3),
                [], {"test_tau": [0.3] * 5}, 3, rng)
    write_trial(tmp_path, "near2", trial_config(temperature_init=2.000002, temperature_min=0.8,
                                                temperature_decay=0.95, entropy_reg=1e-3),
                [], {"test_tau": [0.3] * 5}, 3, rng)
    figures = []
    save = plots._save

    def keep_geometry(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = [leg.get_window_extent(renderer) for ax in fig.axes
                   if (leg := ax.get_legend()) is not None]
        figures.append((path.name, fig.bbox.bounds, legends,
                        [ax.get_window_extent(renderer) for ax in fig.axes if ax.axison],
                        [ax.title.get_window_extent(renderer) for ax in fig.axes]))
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep_geometry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied" included
        path = write_report(tmp_path)
    labels = config_labels(load_experiment(tmp_path).trials)
    assert labels["near"] != labels["near2"] and "temperature_init=2.000001" in labels["near"]
    long = [lab for tid, lab in labels.items() if tid.startswith("t")]
    for lab in long:
        for part in lab.split():
            key, value = part.split("=")
            assert len(value.replace("0.", "").replace(".", "").lstrip("0")) <= 4, lab
        assert "model" not in lab and "pot" not in lab  # the model does not vary
    text = path.read_text()
    assert f"| t0 | {labels['t0']} |" in text
    assert "(n=2: CI n/a)" in text  # the 2-seed trials: no CI (the small-n rule)
    assert sorted(f[0] for f in figures) == sorted(PLOT_FILES)
    for name, (_, _, w, h), legends, axes, titles in figures:
        assert legends or name == "alpha_heatmap.png", name
        for box in legends + titles:  # inside the figure; legends below every plot's axes
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= w and box.y1 <= h, name
        assert all(not leg.overlaps(ax) for leg in legends for ax in axes), name
        assert all(ax.height > 150 for ax in axes), name  # no axes collapsed into a strip
