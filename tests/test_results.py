"""poh_tune.results: results.csv rows per configuration (packs included), the best configuration
from its own poh_trial.yaml, lost trial folders, and the count of an interrupted run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from poh_tune.config import TrialConfig, from_dict, load_config
from poh_tune.io import (
    BEST_CONFIG_FILE,
    DIVERGED_FILE,
    LOST_TRIAL_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    TRIAL_FILE,
)
from poh_tune.results import (
    best_lines,
    best_row,
    collect,
    finish,
    report_interrupted,
    retire_lost_trials,
)
from tests.cli_runs import GRID, dump, logged_epochs, results_rows, with_value


@dataclass
class FakeResult:
    """What poh_tune.results reads of a Tune Result."""

    path: str
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    error: Exception | None = None


def _configuration(folder: Path, cfg: TrialConfig, trial_id: str, taus: list[float],
                   **extra) -> None:
    """A configuration's files as the trainable writes them."""
    folder.mkdir(parents=True)
    (folder / TRIAL_FILE).write_text(yaml.safe_dump(
        {"config": cfg.to_dict(), "experiments": ["lr"], "trial_id": trial_id, **extra},
        sort_keys=False))
    (folder / METRICS_FILE).write_text("".join(
        json.dumps({"epoch": e, "tau": t, "trial_id": trial_id}) + "\n"
        for e, t in enumerate(taus, start=1)))


def _experiment(tmp_path: Path, tiny_cfg: TrialConfig) -> tuple[Path, list[FakeResult], dict]:
    """One trial alone and one pack of two (the pack's second configuration is the best)."""
    exp = tmp_path / "exp"
    cfgs = {lr: from_dict({**tiny_cfg.to_dict(), "lr_encoder": lr})
            for lr in (1e-3, 2e-3, 3e-3)}
    _configuration(exp / "alone", cfgs[1e-3], "t0", [0.1, 0.2, 0.3])
    for k, (lr, tau) in enumerate(((2e-3, 0.4), (3e-3, 0.5))):
        _configuration(exp / "pack" / f"c{k}", cfgs[lr], f"t1_c{k}", [0.1, 0.2, tau],
                       pack_id="t1", pack_index=k)
    results = [FakeResult(str(exp / "alone"), {"lr_encoder": 1e-3}, {"trial_id": "t0"}),
               FakeResult(str(exp / "pack"), {"pack": [{"lr_encoder": 2e-3},
                                                       {"lr_encoder": 3e-3}]},
                          {"trial_id": "t1"})]
    return exp, results, cfgs


def test_rows_per_configuration_and_best_config_from_its_own_trial_file(tmp_path, tiny_cfg,
                                                                        capsys):
    exp, results, cfgs = _experiment(tmp_path, tiny_cfg)
    space = SimpleNamespace(metric="tau", metric_mode="max", base=tiny_cfg)
    assert finish("grid", space, exp, results, no_report=True) == 0
    with open(exp / RESULTS_FILE) as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"t0", "t1_c0", "t1_c1"}
    assert rows["t0"]["pack_id"] == "" and rows["t1_c1"]["pack_id"] == "t1"
    assert rows["t1_c0"]["trial_order"] == rows["t1_c1"]["trial_order"] == "1"
    assert rows["t1_c1"]["trial_dir"] == str(exp / "pack" / "c1")
    assert all(r["status"] == "TERMINATED" and r["stopped_early"] == "False"
               for r in rows.values())
    assert rows["t1_c1"]["config.seeds"] == "1 2" and rows["t1_c1"]["final_tau"] == "0.5"
    # The pack's second configuration, as its poh_trial.yaml holds it (seeds a list).
    assert load_config(exp / BEST_CONFIG_FILE) == cfgs[3e-3]
    assert yaml.safe_load((exp / BEST_CONFIG_FILE).read_text()) == cfgs[3e-3].to_dict()
    out = capsys.readouterr().out
    assert "3 trials: 3 completed, 0 stopped early, 0 errored" in out
    # The best one by its label (what differs from the base), no YAML dump of its config.
    assert "best: t1_c1 (lr_encoder=0.003; experiment lr)" in out
    assert "  tau 0.5, test tau" in out and "CI n/a below 3 seeds" in out  # 2 seeds
    assert not any(line.startswith(f"{k}:") for line in out.splitlines()
                   for k in tiny_cfg.to_dict())
    assert len(out.strip().splitlines()) <= 12


def test_a_diverged_pack_member_errors_alone(tmp_path, tiny_cfg):
    exp, results, _ = _experiment(tmp_path, tiny_cfg)
    (exp / "pack" / "c0" / DIVERGED_FILE).write_text("seed 1, epoch 3: training loss is nan\n")
    rows = {r["trial_id"]: r for r in collect(results)}
    assert rows["t1_c0"]["status"] == "ERROR"
    assert rows["t1_c0"]["error"] == ("poh_tune.trainer.TrainingDiverged: seed 1, epoch 3: "
                                      "training loss is nan")
    assert rows["t1_c1"]["status"] == "TERMINATED" and rows["t1_c1"]["error"] == ""


@pytest.mark.parametrize("n_seeds", [1, 2, 3])
def test_results_csv_ci_empty_below_three_seeds(tmp_path, tiny_cfg, n_seeds):
    """The small-n rule in results.csv: no CI below 3 seeds (not 0, not a 12.7-sigma width),
    also for a record written before the rule (its one-seed CI was 0)."""
    cfg = from_dict({**tiny_cfg.to_dict(), "seeds": list(range(1, n_seeds + 1))})
    folder = tmp_path / "t"
    _configuration(folder, cfg, "t", [0.5])
    rec = {"epoch": 1, "tau": 0.5, "tau_ci95": 0.0 if n_seeds == 1 else 0.04,
           "test_tau": 0.45, "test_tau_ci95": 0.0 if n_seeds == 1 else 0.05}
    (folder / METRICS_FILE).write_text(json.dumps(rec) + "\n")
    (row,) = collect([FakeResult(str(folder), {}, {"trial_id": "t"})])
    want_tau, want_test = ("", "") if n_seeds < 3 else (0.04, 0.05)
    assert (row["final_tau_ci95"], row["test_tau_ci95"]) == (want_tau, want_test)
    assert row["final_tau"] == 0.5 and row["test_tau"] == 0.45  # the means stay


def test_best_lines_give_label_metric_and_ci_at_four_digits(tmp_path, tiny_cfg):
    cfg = from_dict({**tiny_cfg.to_dict(), "seeds": [1, 2, 3], "entropy_reg": 0.0123456})
    best = {"trial_id": "a_00004", "final_tau": 0.6354166865348816,
            "final_tau_ci95": 0.012345678, "test_tau": 0.99, "test_tau_ci95": 0.05}
    lines = best_lines(best, "tau", cfg, tiny_cfg, tmp_path / BEST_CONFIG_FILE)
    assert lines[0] == "best: a_00004 (seeds=1,2,3 entropy_reg=0.01235)"
    assert "tau 0.6354 ± 0.01235" in lines[1]
    assert "test tau at the best dev epoch 0.99 [0.94, 1]" in lines[1]  # clipped at τ's 1
    assert "95 % CI over 3 seeds" in lines[1]
    assert str(tmp_path / BEST_CONFIG_FILE) in lines[2]


def test_best_config_not_written_without_the_trial_file(tmp_path, tiny_cfg, capsys):
    exp, results, _ = _experiment(tmp_path, tiny_cfg)
    (exp / "pack" / "c1" / TRIAL_FILE).unlink()  # the row keeps its metrics, loses its config
    (exp / "pack" / "c0" / TRIAL_FILE).unlink()
    (exp / "alone" / TRIAL_FILE).unlink()
    space = SimpleNamespace(metric="tau", metric_mode="max", base=tiny_cfg)
    assert finish("grid", space, exp, results, no_report=True) == 0
    assert not (exp / BEST_CONFIG_FILE).exists()
    assert f"no readable {TRIAL_FILE}" in capsys.readouterr().err


def test_interrupted_run_counts_each_packed_configuration(tmp_path, tiny_cfg, capsys):
    exp, results, _ = _experiment(tmp_path, tiny_cfg)
    lines = (exp / "pack" / "c0" / METRICS_FILE).read_text().splitlines(keepends=True)
    (exp / "pack" / "c0" / METRICS_FILE).write_text("".join(lines[:2]))  # 2 of 3 epochs
    assert report_interrupted(results, 4, 3, "RESUME") == 130
    err = capsys.readouterr().err
    assert "interrupted: 2 of 4 trials finished, 1 interrupted, 1 not started" in err
    assert "continue with: RESUME" in err


def test_best_row_breaks_ties_by_creation_order_as_optuna_and_ray_do():
    def row(trial_id: str, tau: float, order: int, **kw) -> dict:
        return {"trial_id": trial_id, "trial_order": order, "status": "TERMINATED",
                "stopped_early": False, "final_tau": tau, **kw}

    # Tied at 0.354: the earliest created, whatever the rows' order or the (random) ids.
    rows = [row("0cc4", 0.354, 1), row("bf23", 0.354, 0), row("cde2", 0.354, 5),
            row("3e5a", 0.5, 2, stopped_early=True), row("95d3", 0.2, 4)]
    assert best_row(rows, "tau", "max")["trial_id"] == "bf23"
    assert best_row(rows, "tau", "min")["trial_id"] == "95d3"
    # With an Optuna study, its trial numbers decide (a trial adopted after a restore may be
    # created later by Tune than its number says).
    numbered = [{**r, "optuna_trial": n} for r, n in zip(rows, [0, 3, 1, 2, 4], strict=True)]
    assert best_row(numbered, "tau", "max")["trial_id"] == "0cc4"
    rows.append(row("f8cc", 0.36, 6))
    assert best_row(rows, "tau", "max")["trial_id"] == "f8cc"  # a better value still wins
    assert best_row([row("d85e", float("nan"), 0)], "tau", "max") is None


def test_lost_trial_folders_are_retired(tmp_path):
    for name in ("kept", "lost"):
        (tmp_path / name).mkdir()
        (tmp_path / name / TRIAL_FILE).write_text("config: {}\n")
    assert retire_lost_trials(tmp_path, [{"trial_dir": str(tmp_path / "kept")}]) == 1
    assert (tmp_path / "kept" / TRIAL_FILE).exists()
    assert (tmp_path / "lost" / LOST_TRIAL_FILE).exists()
    assert not (tmp_path / "lost" / TRIAL_FILE).exists()


LOAD_TRIALS = 200


@pytest.mark.slow
def test_grid_of_200_tiny_trials_every_trial_accounted_for(tmp_path):
    """Load: 200 one-epoch trials, four at a time per CPU, trial processes reused."""
    lrs = [round(1e-4 + i * 1e-6, 8) for i in range(LOAD_TRIALS)]
    space = tmp_path / "load.yaml"
    space.write_text(dump({**with_value(GRID, "experiments.lr.sweep.lr_encoder", lrs),
                            "max_concurrent": 0}))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "poh_tune.launch", "grid", str(space),
                        "--storage", str(tmp_path), "--name", "load", "--no-report",
                        "--num-cpus", "2", "--cpus-per-trial", "0.25", "--reuse-actors"],
                       capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = results_rows(tmp_path / "load")
    assert len(rows) == LOAD_TRIALS
    assert sorted(float(r["config.lr_encoder"]) for r in rows) == sorted(lrs)
    assert len({r["trial_id"] for r in rows}) == LOAD_TRIALS
    assert all(r["status"] == "TERMINATED" and r["epochs_done"] == "1" for r in rows)
    for r in rows:  # each trial's own files, even in a reused process
        info = yaml.safe_load(open(Path(r["trial_dir"]) / "poh_trial.yaml"))
        assert info["trial_id"] == r["trial_id"]
        assert info["config"]["lr_encoder"] == float(r["config.lr_encoder"])
        assert logged_epochs(r["trial_dir"]) == [1]
    print(f"\n{LOAD_TRIALS} trials: {wall:.0f} s wall ({wall / LOAD_TRIALS:.2f} s per trial)")


