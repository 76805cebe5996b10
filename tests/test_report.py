"""poh_tune.report: write_report and its command line, end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from synthetic_experiment import build_experiment

from poh_tune.report import PLOT_FILES, main


def test_cli(tmp_path, capsys):
    root = tmp_path / "exp"
    root.mkdir()
    build_experiment(root)
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "summary.csv").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no trials" in capsys.readouterr().err


def test_python_m_report_and_no_torch_at_import(tmp_path):
    """`python -m poh_tune.report` runs main (exit 2 on an empty directory); importing the
    package loads neither torch nor the trainer."""
    proc = subprocess.run([sys.executable, "-m", "poh_tune.report", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: {tmp_path}: no trials found "
                                   "(no **/poh_trial.yaml below it)")
    proc = subprocess.run([sys.executable, "-c", "import sys, poh_tune.report; "
                           "print(sorted(m for m in ('torch', 'poh_tune.trainer') "
                           "if m in sys.modules))"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


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
    for name in PLOT_FILES:
        with Image.open(exp_dir / name) as im:
            assert im.format == "PNG"
