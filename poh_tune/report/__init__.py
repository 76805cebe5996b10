"""Experiment report: seeds aggregated with 95 % CIs, A/B against the baseline, success bands, ceiling, plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from poh_tune.config import ConfigError
from poh_tune.io import REPORT_FILE, SUMMARY_FILE, atomic_write_text
from poh_tune.report.load import ReportError, load_experiment
from poh_tune.report.markdown import render_markdown
from poh_tune.report.plots import PLOT_FILES, write_plots
from poh_tune.report.regimes import regime_section
from poh_tune.report.summary import summary_frame


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
    plots = write_plots(exp, labels, out)
    atomic_write_text(out / SUMMARY_FILE, summary.to_csv(index=False))
    path = out / REPORT_FILE
    regimes = regime_section(exp, summary, labels, out)  # [] without PoH-baseline pairs
    atomic_write_text(path, "\n".join([render_markdown(exp, summary, plots), *regimes]))
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


__all__ = ["PLOT_FILES", "ReportError", "main", "write_report"]
