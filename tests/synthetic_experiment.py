"""A synthetic experiment directory with known per-seed values, and independent statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from poh_tune.config import TrialConfig
from poh_tune.report import write_report

SEEDS = [1, 2, 3, 4, 5]
N_ITERS, N_HEADS = 3, 4


def trial_config(**kw) -> dict:
    base = TrialConfig(epochs=4, seeds=tuple(SEEDS), max_inner_iters=N_ITERS, n_heads=N_HEADS,
                       d_model=16).to_dict()
    base.update(kw)
    return base


def write_trial(root: Path, trial_id: str, config: dict, experiments: list[str],
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
        # Earlier epochs carry other test values; only the last row's count.
        row["per_seed"] = [{"seed": s, "tau": float(dev[e, i]), "tau_all": float(dev[e, i] / 2),
                            **{k: v[i] if e == n_epochs - 1 else -1.0 for k, v in final.items()}}
                           for i, s in enumerate(SEEDS)]
        for k, v in final.items():
            row[k] = float(np.mean(v)) if e == n_epochs - 1 else -1.0
        row["best_tau"] = float(dev[: e + 1].max(0).mean())
        if config["model"] == "pot":
            row["tau_iter"] = [0.3 + 0.1 * t for t in range(N_ITERS)]
            row["entropy_iter"] = [1.2 - 0.1 * t for t in range(N_ITERS)]
            row["alpha"] = [[0.25] * N_HEADS for _ in range(N_ITERS)]
            row["herfindahl"] = 0.3 if healthy else 0.8
            row["max_alpha"] = 0.45 if healthy else 0.9
            row["routing_healthy"] = healthy
        lines.append(json.dumps(row))
    (tdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return {"trial_id": trial_id, "dir": tdir, "dev": dev, "final": final, "config": config}


def build_experiment(root: Path, with_csv: bool = True) -> dict[str, dict]:
    """Two baselines and four PoH trials on two tasks, two grid experiments, an orphan csv row."""
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
    t["b1"] = write_trial(root, "b1", trial_config(model="baseline"), ["baseline_vs_hrm"],
                          fin(0.16), 4, rng)
    t["p1"] = write_trial(root, "p1", trial_config(max_inner_iters=N_ITERS),
                          ["baseline_vs_hrm", "iterations"], fin(0.26), 4, rng)
    # Sorted by the swept value: p2 (2 iterations) must come before p1 (3).
    t["p2"] = write_trial(root, "p2", trial_config(max_inner_iters=2), ["iterations"], fin(0.30),
                          2, rng, healthy=False)
    # Another task: its PoH must be compared with its own baseline.
    t["b2"] = write_trial(root, "b2", trial_config(model="baseline", array_len=10, mask_rate=0.3),
                          [], fin(0.5), 4, rng)
    t["p3"] = write_trial(root, "p3", trial_config(array_len=10, mask_rate=0.3), [], fin(0.7), 1,
                          rng)
    # Errored before its first epoch: listed, no statistics.
    t["p4"] = write_trial(root, "p4", trial_config(d_ctrl=8), [], fin(0.0), 0, rng)
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


def build_and_report(root: Path) -> tuple[Path, dict[str, dict], Path, pd.DataFrame]:
    """build_experiment, then write_report: (root, trials, report.md, summary.csv read back)."""
    trials = build_experiment(root)
    path = write_report(root)
    return root, trials, path, pd.read_csv(root / "summary.csv", dtype={"trial_id": str})


def ci_halfwidth(vals) -> float:
    """Independent: scipy's t interval around the mean with the standard error of the mean."""
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=stats.sem(vals))
    return (hi - lo) / 2


def welch_p_by_hand(a, b) -> float:
    """Independent: Welch's statistic and Welch-Satterthwaite degrees of freedom by hand."""
    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def paired_p_by_hand(a, b) -> float:
    """Independent: the t statistic of the per-seed differences by hand, n - 1 df."""
    d = np.asarray(a) - np.asarray(b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return 2 * stats.t.sf(abs(t), len(d) - 1)
