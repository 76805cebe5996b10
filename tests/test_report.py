"""Report: synthetic experiment with known per-seed values, checked against independent computations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from scipy import stats

from poh_tune import report
from poh_tune.config import TrialConfig

SEEDS = [1, 2, 3, 4, 5]
N_ITERS, N_HEADS = 3, 4


def _config(**kw) -> dict:
    base = TrialConfig(epochs=4, seeds=tuple(SEEDS), max_inner_iters=N_ITERS, n_heads=N_HEADS,
                       d_model=16).to_dict()
    base.update(kw)
    return base


def _write_trial(root: Path, trial_id: str, config: dict, experiments: list[str],
                 final: dict[str, list[float]], n_epochs: int, rng: np.random.Generator,
                 healthy: bool = True) -> dict:
    """One trial dir; `final` holds per-seed test_tau, test_tau_all, test_perfect_sort."""
    tdir = root / "grid" / f"trainable_{trial_id}"
    tdir.mkdir(parents=True)
    (tdir / "poh_trial.yaml").write_text(yaml.safe_dump(
        {"config": config, "experiments": experiments, "trial_id": trial_id}))
    dev = rng.uniform(0.1, 0.9, size=(n_epochs, len(SEEDS)))  # per epoch, per seed
    lines = []
    for e in range(n_epochs):
        row = {"epoch": e + 1, "trial_id": trial_id, "tau": float(dev[e].mean())}
        for i, s in enumerate(SEEDS):
            row[f"tau_seed_{s}"] = float(dev[e, i])
            row[f"tau_all_seed_{s}"] = float(dev[e, i] / 2)
            # Earlier epochs carry other test values; only the last row's count.
            for k, v in final.items():
                row[f"{k}_seed_{s}"] = v[i] if e == n_epochs - 1 else -1.0
        for k, v in final.items():
            row[k] = float(np.mean(v)) if e == n_epochs - 1 else -1.0
        row["best_tau"] = float(dev[: e + 1].max(0).mean())
        if config["model"] == "pot":
            for t in range(N_ITERS):
                row[f"tau_iter_{t}"] = 0.3 + 0.1 * t
                row[f"entropy_iter_{t}"] = 1.2 - 0.1 * t
                for h in range(N_HEADS):
                    row[f"alpha_iter_{t}_head_{h}"] = 0.25
            row["herfindahl"] = 0.3 if healthy else 0.8
            row["max_alpha"] = 0.45 if healthy else 0.9
            row["routing_healthy"] = healthy
        lines.append(json.dumps(row))
    (tdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return {"trial_id": trial_id, "dir": tdir, "dev": dev, "final": final, "config": config}


def _build(root: Path, with_csv: bool = True) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    experiments = {
        "baseline_vs_hrm": {"swept": None, "description": "baseline against PoH-HRM"},
        "iterations": {"swept": "max_inner_iters", "description": "inner iterations"},
    }
    (root / "poh_experiment.yaml").write_text(yaml.safe_dump(
        {"mode": "grid", "space_file": "x.yaml", "metric": "tau", "metric_mode": "max",
         "experiments": experiments}))

    def fin(mu):
        return {"test_tau": list(mu + rng.normal(0, 0.02, 5)),
                "test_tau_all": list(mu / 2 + rng.normal(0, 0.02, 5)),
                "test_perfect_sort": list(rng.uniform(0, 0.1, 5))}

    t = {}
    t["b1"] = _write_trial(root, "b1", _config(model="baseline"), ["baseline_vs_hrm"],
                           fin(0.16), 4, rng)
    t["p1"] = _write_trial(root, "p1", _config(max_inner_iters=N_ITERS),
                           ["baseline_vs_hrm", "iterations"], fin(0.26), 4, rng)
    # Sorted by the swept value: p2 (2 iterations) must come before p1 (3).
    t["p2"] = _write_trial(root, "p2", _config(max_inner_iters=2), ["iterations"], fin(0.30), 2,
                           rng, healthy=False)
    # Another task: its PoH must be compared with its own baseline.
    t["b2"] = _write_trial(root, "b2", _config(model="baseline", array_len=10, mask_rate=0.3),
                           [], fin(0.5), 4, rng)
    t["p3"] = _write_trial(root, "p3", _config(array_len=10, mask_rate=0.3), [], fin(0.7), 1, rng)
    # Errored before its first epoch: listed, no statistics.
    t["p4"] = _write_trial(root, "p4", _config(d_ctrl=8), [], fin(0.0), 0, rng)
    if with_csv:
        rows = [
            {"trial_id": "b1", "status": "TERMINATED", "stopped_early": False},
            {"trial_id": "p1", "status": "TERMINATED", "stopped_early": False},
            {"trial_id": "p2", "status": "TERMINATED", "stopped_early": True},
            {"trial_id": "b2", "status": "TERMINATED", "stopped_early": False},
            {"trial_id": "p3", "status": "ERROR", "stopped_early": False},
            {"trial_id": "p4", "status": "ERROR", "stopped_early": False,
             "error": "RuntimeError: boom | at epoch 1"},
        ]
        for r in rows:
            tr = t[r["trial_id"]]
            r["trial_dir"] = str(tr["dir"])
            r["test_tau"] = float(np.mean(tr["final"]["test_tau"]))
        orphan = {"trial_id": "lost", "status": "ERROR", "stopped_early": False,
                  "trial_dir": str(root / "gone"), "error": "worker died"}
        pd.DataFrame([*rows, orphan]).to_csv(root / "results.csv", index=False)
    return t


def _ci_halfwidth(vals) -> float:
    """Independent: scipy's t interval around the mean with the standard error of the mean."""
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=stats.sem(vals))
    return (hi - lo) / 2


def _welch_p(a, b) -> float:
    """Independent: Welch's statistic and Welch-Satterthwaite degrees of freedom by hand."""
    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def _paired_p(a, b) -> float:
    """Independent: the t statistic of the per-seed differences by hand, n - 1 df."""
    d = np.asarray(a) - np.asarray(b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return 2 * stats.t.sf(abs(t), len(d) - 1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    trials = _build(root)
    path = report.write_report(root)
    return root, trials, path, pd.read_csv(root / "summary.csv", dtype={"trial_id": str})


def test_means_and_ci_match_independent_computation(built):
    _, trials, _, summary = built
    for tid, tr in trials.items():
        r = summary.set_index("trial_id").loc[tid]
        if tid == "p4":
            assert r.isna()[["test_tau_mean", "dev_tau_mean", "test_tau_ci95"]].all()
            continue
        for stat in ("test_tau", "test_tau_all", "test_perfect_sort"):
            vals = tr["final"][stat]
            assert r[f"{stat}_mean"] == pytest.approx(np.mean(vals), abs=1e-12)
            assert r[f"{stat}_ci95"] == pytest.approx(_ci_halfwidth(vals), rel=1e-9)
        best_dev = tr["dev"].max(0)  # each seed's best dev τ
        assert r["dev_tau_mean"] == pytest.approx(best_dev.mean(), abs=1e-12)
        assert r["dev_tau_ci95"] == pytest.approx(_ci_halfwidth(best_dev), rel=1e-9)


def test_ab_deltas_and_welch_p(built):
    _, trials, _, summary = built
    s = summary.set_index("trial_id")
    pairs = {"p1": "b1", "p2": "b1", "p3": "b2"}
    assert pd.isna(s.loc["p4", "delta_test_tau"])  # no metrics, no Δ  # p3 is on another task: its own baseline
    for pot, base in pairs.items():
        assert s.loc[pot, "baseline_trial_id"] == base
        for stat in ("test_tau", "test_tau_all"):
            a, b = trials[pot]["final"][stat], trials[base]["final"][stat]
            d = np.mean(a) - np.mean(b)
            assert s.loc[pot, f"delta_{stat}"] == pytest.approx(d, abs=1e-12)
            assert s.loc[pot, f"rel_delta_{stat}"] == pytest.approx(d / np.mean(b), rel=1e-9)
            assert s.loc[pot, f"p_{stat}"] == pytest.approx(_welch_p(a, b), rel=1e-6)
            assert s.loc[pot, f"p_paired_{stat}"] == pytest.approx(_paired_p(a, b), rel=1e-6)
    assert pd.isna(s.loc["b1", "baseline_trial_id"])


def test_welch_p_matches_hand_formula_and_edge_cases():
    a, b = [0.3, 0.35, 0.28, 0.4], [0.2, 0.22, 0.19, 0.25, 0.3, 0.21]
    assert report.welch_p(a, b) == pytest.approx(_welch_p(a, b), rel=1e-9)
    assert math.isnan(report.welch_p([0.3], b))
    assert math.isnan(report.welch_p([0.3, 0.3], [0.2, 0.2]))


def test_bands():
    assert report.band_status(0.16, 0.26, 0.625) == {"minimum": True, "target": False,
                                                     "stretch": False}
    assert report.band_status(0.21, 0.32, 0.52) == {"minimum": True, "target": True,
                                                    "stretch": True}
    # The relative gain is its own criterion.
    assert report.band_status(0.21, 0.32, 0.19)["minimum"] is False
    assert report.band_status(0.15, 0.30, 1.0)["minimum"] is False  # strictly above 0.15


def test_statuses_from_results_csv_and_inferred(built, tmp_path):
    _, _, _, summary = built
    s = summary.set_index("trial_id")["status"].to_dict()
    assert s == {"b1": "finished", "p1": "finished", "p2": "stopped early", "b2": "finished",
                 "p3": "errored", "p4": "errored"}
    _build(tmp_path, with_csv=False)
    exp = report.load_experiment(tmp_path)
    inferred = {t.trial_id: t.status for t in exp.trials}
    assert inferred == {"b1": "finished", "p1": "finished", "p2": "incomplete", "b2": "finished",
                        "p3": "incomplete", "p4": "incomplete"}


def test_report_markdown_content(built):
    _, trials, path, summary = built
    text = path.read_text()
    for section in ("## Per configuration", "## Sweeps", "### iterations", "## A/B",
                    "success bands", "## Routing health"):
        assert section in text
    # Sweep table ordered by the swept parameter: 2 iterations before 3.
    sweep = text.split("### iterations")[1].split("##")[0]
    assert sweep.index("| 2 |") < sweep.index("| 3 |")
    mean, hw = np.mean(trials["p1"]["final"]["test_tau"]), _ci_halfwidth(
        trials["p1"]["final"]["test_tau"])
    assert f"{mean:.3f} ± {hw:.3f}" in text
    assert "FLAGGED" in text  # p2's routing leaves the band
    assert f"{report.oracle_all_pairs_tau(20, 0.5):.3f}" in text
    assert "stopped early" in text and "errored" in text
    assert "RuntimeError: boom \\| at epoch 1" in text  # the error, its pipe escaped
    assert "| lost | (no trial directory) | errored |" in text
    assert "\N{WHITE HEAVY CHECK MARK}" not in text
    flagged = summary.set_index("trial_id")["routing_healthy"]
    assert not flagged["p2"] and flagged["p1"]


def test_every_png_opens_at_the_expected_size(built):
    root, _, path, _ = built
    # Panels: baseline_vs_hrm, iterations, and the trials of no experiment (b2, p3): one row of
    # three columns, each at least 500 x 360 pixels plus the legend strip under it.
    assert report.panel_grid(3) == (1, 3) and report.panel_grid(5) == (2, 3)
    for name in ("tau_vs_epoch.png", "tau_vs_iteration.png", "entropy_vs_iteration.png"):
        with Image.open(root / name) as im:
            im.verify()
        with Image.open(root / name) as im:
            assert im.format == "PNG", name
            assert im.size[0] >= 1500 and 360 < im.size[1] < 700, (name, im.size)
    with Image.open(root / "alpha_heatmap.png") as im:
        assert im.size == (800, 500)
    for name in report.PLOT_FILES:
        assert f"]({name})" in path.read_text()


def test_routing_health_is_the_trainers_verdict_every_seed_in_band(tmp_path):
    """Seeds at (Herfindahl, max α) (0.45, 0.25) and (0.45, 0.45): the means (0.45, 0.35) are in
    the band but the first seed is not, so the trial is flagged by the trainer and the report."""
    from poh_tune.trainer import aggregate

    per_seed = [{"epoch": 1, "tau": 0.5, "epoch_s": 1.0, "herfindahl": h, "max_alpha": m,
                 "routing_healthy": h < 0.5 and 0.3 <= m <= 0.6}
                for h, m in ((0.45, 0.25), (0.45, 0.45))]
    row = aggregate(per_seed, [1, 2])
    assert row["routing_healthy"] is False
    assert (row["herfindahl"], row["max_alpha"]) == pytest.approx((0.45, 0.35))
    tdir = tmp_path / "t"
    tdir.mkdir()
    trial = report.Trial("t", tdir, _config(seeds=[1, 2]), [], [row])
    rr = report.routing_row(trial)
    assert rr["healthy"] is False and rr["unhealthy_epochs"] == 1


def test_monte_carlo_candidates_keep_a_visible_lowest_value():
    """The lowest value (-100) visible at position 0 and hidden positions after it: it is not a
    candidate for the hidden values (hidden positions once overwrote its slot)."""
    values = torch.tensor([[-100, 5, -7, 60]])
    obs = torch.tensor([[True, False, True, False]])
    present = report.visible_in_range(values, obs, -100, 100)
    assert present.shape == (1, 200)
    assert present[0].nonzero().flatten().tolist() == [0, 93]  # -100 and -7


def test_long_float_configs_get_short_labels_and_legends_that_fit(tmp_path, monkeypatch):
    """Optuna-like configurations: labels rounded, legends inside the figure, no layout warning."""
    import warnings

    rng = np.random.default_rng(1)
    (tmp_path / "poh_experiment.yaml").write_text(yaml.safe_dump({"mode": "optuna"}))
    for i in range(8):
        cfg = _config(temperature_init=float(rng.uniform(1.5, 3.0)),
                      temperature_min=float(rng.uniform(0.5, 1.2)),
                      temperature_decay=float(rng.uniform(0.9, 0.99)),
                      entropy_reg=float(rng.uniform(2e-4, 5e-3)), seeds=[1, 2])
        _write_trial(tmp_path, f"t{i}", cfg, [], {"test_tau": [0.3, 0.4] + [0.0] * 3,
                                                   "test_tau_all": [0.1] * 5,
                                                   "test_perfect_sort": [0.0] * 5}, 3, rng)
    # Two configurations that differ only in the 6th digit keep distinct labels.
    _write_trial(tmp_path, "near", _config(temperature_init=2.000001, temperature_min=0.8,
                                           temperature_decay=0.95, entropy_reg=1e-3),
                 [], {"test_tau": [0.3] * 5}, 3, rng)
    _write_trial(tmp_path, "near2", _config(temperature_init=2.000002, temperature_min=0.8,
                                            temperature_decay=0.95, entropy_reg=1e-3),
                 [], {"test_tau": [0.3] * 5}, 3, rng)
    figures = []
    save = report._save

    def keep_geometry(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = [leg.get_window_extent(renderer) for ax in fig.axes
                   if (leg := ax.get_legend()) is not None]
        figures.append((path.name, fig.bbox.bounds, legends,
                        [ax.get_window_extent(renderer) for ax in fig.axes if ax.axison],
                        [ax.title.get_window_extent(renderer) for ax in fig.axes]))
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep_geometry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied" included
        path = report.write_report(tmp_path)
    labels = report.config_labels(report.load_experiment(tmp_path).trials)
    assert labels["near"] != labels["near2"] and "temperature_init=2.000001" in labels["near"]
    long = [lab for tid, lab in labels.items() if tid.startswith("t")]
    for lab in long:
        for part in lab.split():
            key, value = part.split("=")
            assert len(value.replace("0.", "").replace(".", "").lstrip("0")) <= 4, lab
        assert "model" not in lab and "pot" not in lab  # the model does not vary
    text = path.read_text()
    assert f"| t0 | {labels['t0']} |" in text
    assert "(n=2)" in text
    assert sorted(f[0] for f in figures) == sorted(report.PLOT_FILES)
    for name, (_, _, w, h), legends, axes, titles in figures:
        assert legends or name == "alpha_heatmap.png", name
        for box in legends + titles:  # inside the figure; legends below every plot's axes
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= w and box.y1 <= h, name
        assert all(not leg.overlaps(ax) for leg in legends for ax in axes), name
        assert all(ax.height > 150 for ax in axes), name  # no axes collapsed into a strip


def test_one_seed_has_no_ci():
    assert report._fmt(report.Stat(0.5, 0.0, [0.5])) == "0.500 (1 seed: CI n/a)"
    assert report._fmt(report.Stat(0.5, 1.2, [0.4, 0.6])) == "0.500 ± 1.200 (n=2)"
    assert report._fmt(report.Stat(0.5, 0.1, [0.5] * 5)) == "0.500 ± 0.100"


def _simulate_oracle(L: int, mask_rate: float, n: int, seed: int) -> tuple[float, float]:
    """A separate plain simulation: mean and standard error of the oracle's all-pairs τ."""
    rng = np.random.default_rng(seed)
    k = max(2, int(L * (1 - mask_rate)))
    universe = np.arange(-100, 100)
    taus = []
    for _ in range(n):
        vals = rng.choice(universe, size=L, replace=False)
        visible = vals[:k]
        median = np.median(np.setdiff1d(universe, visible))
        pred = np.concatenate([visible.astype(float), np.full(L - k, median)])
        iu = np.triu_indices(L, 1)
        c = np.sign(pred[:, None] - pred[None, :])[iu] * np.sign(vals[:, None] - vals[None, :])[iu]
        taus.append(c.mean())
    return float(np.mean(taus)), float(np.std(taus, ddof=1) / math.sqrt(n))


@pytest.mark.parametrize("L,mask", [(20, 0.5), (10, 0.3), (8, 0.75)])
def test_oracle_ceiling_matches_monte_carlo(L, mask):
    exact = report.oracle_all_pairs_tau(L, mask)
    mc, se = _simulate_oracle(L, mask, 3000, seed=L)
    assert abs(exact - mc) < 4 * se + 1e-3
    own_mc = report.oracle_all_pairs_tau(L, mask, n_samples=20000, seed=1)
    assert own_mc == pytest.approx(exact, abs=0.002)


def test_oracle_values():
    assert report.oracle_all_pairs_tau(20, 0.5) == pytest.approx(0.50, abs=0.01)
    assert report.oracle_all_pairs_tau(20, 0.0) == 1.0


def test_cli(built, tmp_path, capsys):
    root = built[0]
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "summary.csv").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 2
    assert "no trials" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_grid_report_matches_results_csv(tmp_path):
    """A real `launch grid --smoke` run: the report's numbers equal its results.csv."""
    pytest.importorskip("ray")
    pytest.importorskip("poh_tune.launch")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray on loopback only
    proc = subprocess.run([sys.executable, "-m", "poh_tune.launch", "grid", "--smoke",
                           "--storage", str(tmp_path), "--name", "smoke", "--num-cpus", "2"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    exp_dir = tmp_path / "smoke"
    assert (exp_dir / "report.md").is_file()
    res = pd.read_csv(exp_dir / "results.csv", dtype={"trial_id": str}).set_index("trial_id")
    summ = pd.read_csv(exp_dir / "summary.csv", dtype={"trial_id": str}).set_index("trial_id")
    assert set(summ.index) == set(res.index)
    pairs = {"test_tau": "test_tau_mean", "best_tau": "dev_tau_mean",
             "test_tau_all": "test_tau_all_mean", "test_perfect_sort": "test_perfect_sort_mean",
             "test_tau_ci95": "test_tau_ci95", "final_herfindahl": "herfindahl",
             "final_max_alpha": "max_alpha", "epochs_done": "epochs_done"}
    for col, ours in pairs.items():
        theirs = res[col].astype(float)
        mine = summ.loc[res.index, ours].astype(float)
        assert np.allclose(mine, theirs, atol=1e-9, equal_nan=True), col
    status = {tid: ("errored" if r.status == "ERROR" else
                    "stopped early" if r.stopped_early else "finished")
              for tid, r in res.iterrows()}
    assert summ["status"].to_dict() == status
    for name in report.PLOT_FILES:
        with Image.open(exp_dir / name) as im:
            assert im.format == "PNG"


def test_holm_matches_the_textbook_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert report.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    got = report.holm([0.5, math.nan, 0.2])  # nan is not counted in the family
    assert got[0] == pytest.approx(0.5) and math.isnan(got[1]) and got[2] == pytest.approx(0.4)
    assert report.holm([0.6, 0.7]) == [1.0, 1.0]


def test_report_says_plainly_when_pot_configurations_do_not_differ(tmp_path):
    """Ten PoH configurations drawn from one distribution, one baseline far below."""
    rng = np.random.default_rng(3)
    (tmp_path / "poh_experiment.yaml").write_text(yaml.safe_dump({"mode": "grid"}))

    def fin(mu):
        return {"test_tau": list(mu + rng.normal(0, 0.002, 5)),
                "test_tau_all": list(mu / 2 + rng.normal(0, 0.002, 5)),
                "test_perfect_sort": list(rng.uniform(0, 0.1, 5))}

    _write_trial(tmp_path, "b", _config(model="baseline"), [], fin(0.979), 2, rng)
    for i in range(10):
        _write_trial(tmp_path, f"p{i}", _config(entropy_reg=0.001 * (i + 1)), [], fin(0.988), 2,
                     rng)
    text = report.write_report(tmp_path).read_text()
    assert "No two PoH configurations differ significantly" in text
    assert "45 pairs compared" in text
    assert "10 of 10 PoH configurations differ from their baseline" in text
    assert "paired p, Holm" in text
