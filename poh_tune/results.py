"""A run's results: one results.csv row per configuration, the best configuration, the report."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from poh_tune.cli import UsageError
from poh_tune.config import TrialConfig, from_dict, save_config
from poh_tune.fmt import MIN_CI_SEEDS, ci_shown, ci_text, config_label, sig
from poh_tune.io import (
    BEST_CONFIG_FILE,
    DIVERGED_FILE,
    LOST_TRIAL_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    STUDY_FILE,
    STUDY_JOURNAL,
    SUMMARY_FILE,
    TB_DIR,
    TRIAL_FILE,
    atomic_write_text,
    config_folder,
    read_metrics,
)
from poh_tune.spaces import Space
from poh_tune.tblog import write_session_end

MAX_ERRORS_SHOWN = 5  # errored trials named on the console; results.csv has every error
# Columns of results.csv taken from a trial's last logged epoch ("final_") and its best epoch.
FINAL_KEYS = ("tau", "tau_all", "tau_ci95", "accuracy", "perfect_sort", "train_loss",
              "herfindahl", "max_alpha", "routing_healthy")
BEST_KEYS = ("best_tau", "best_epoch", "test_tau", "test_tau_ci95", "test_tau_all",
             "test_accuracy", "test_perfect_sort")


def read_trial_spec(folder: Path) -> dict[str, Any]:
    """A configuration's poh_trial.yaml (config, experiments, trial_id, ...); {} when missing."""
    f = folder / TRIAL_FILE
    info = yaml.safe_load(f.read_text()) if f.exists() else {}
    return info if isinstance(info, dict) else {}


def config_folders(trial_dir: Path, config: dict[str, Any] | None) -> list[Path]:
    """The folders of a Tune trial's configurations: its own, or a pack's c<k>/ sub-folders."""
    pack = (config or {}).get("pack")
    if isinstance(pack, list) and len(pack) > 1:
        return [trial_dir / config_folder(k) for k in range(len(pack))]
    return [trial_dir]


def collect(results) -> list[dict[str, Any]]:
    """One row per configuration from Tune's ResultGrid and each configuration's own files.

    A trial is one configuration (its folder is the trial's) or a pack of them (its k-th
    configuration's folder is <trial folder>/c<k>/, trial_id <pack id>_c<k>).
    """
    rows = []
    for order, r in enumerate(results):  # Tune's trials in the order it created them
        trial_dir = Path(r.path)
        error = None if r.error is None else str(r.error).strip().splitlines()[-1][:500]
        tune_id = (r.metrics or {}).get("trial_id") or trial_dir.name
        folders = config_folders(trial_dir, r.config)
        if len(folders) == 1:
            rows.append(_row(folders[0], tune_id, error, order))
        else:
            rows += [_row(f, f"{tune_id}_c{k}", error, order, tune_id)
                     for k, f in enumerate(folders)]
    return sorted(rows, key=lambda x: x["trial_id"])


def _row(folder: Path, fallback_id: str, error: str | None, order: int,
         pack_id: str = "") -> dict[str, Any]:
    """One configuration's results.csv row; `error`: its trial's (a pack's: every member's,
    unless the member diverged: then its own message); `order`: its Tune trial's place in
    Tune's creation order (a pack's members share it)."""
    info = read_trial_spec(folder)
    cfg = info.get("config") or {}
    trial_id = info.get("trial_id") or fallback_id
    diverged = folder / DIVERGED_FILE
    if pack_id and diverged.is_file():  # its own divergence, also when the whole pack ended
        # Worded as Ray words a single diverged trial's error (the exception's last line).
        error = ("poh_tune.trainer.TrainingDiverged: "
                 + diverged.read_text().strip().splitlines()[-1])[:500]
    hist = read_metrics(folder / METRICS_FILE)
    last = hist[-1] if hist else {}
    done = int(last.get("epoch", 0))
    epochs = int(cfg.get("epochs", 0) or 0)
    row: dict[str, Any] = {
        "trial_id": trial_id, "pack_id": info.get("pack_id", pack_id), "trial_order": order,
        "status": "ERROR" if error else "TERMINATED",
        "experiments": ";".join(info.get("experiments") or []),
        "epochs_done": done, "stopped_early": error is None and done < epochs,
        "error": error or "", "trial_dir": str(folder)}
    row.update({f"config.{k}": (v if not isinstance(v, list) else " ".join(map(str, v)))
                for k, v in cfg.items()})
    n_seeds = len(cfg.get("seeds") or [])
    row.update({f"final_{k}": _cell(k, last, n_seeds) for k in FINAL_KEYS})
    row.update({k: _cell(k, last, n_seeds) for k in BEST_KEYS})
    return row


def _cell(key: str, last: dict[str, Any], n_seeds: int) -> Any:
    """A metric of the last epoch for results.csv; a CI is left empty by the small-n rule
    (fewer than fmt.MIN_CI_SEEDS seeds, also in records written before the rule gave nan)."""
    v = last.get(key, "")
    if key.endswith("_ci95") and (not ci_shown(n_seeds) or not isinstance(v, (int, float))
                                  or not math.isfinite(v)):
        return ""
    return v


def _csv_text(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """Best trial by the metric at its last epoch, among trials that ran every epoch.

    A tie goes to the earliest trial reaching the best value, as Optuna's best_trial and Ray's
    get_best_result break it: the lowest Optuna trial number (`optuna_trial`) where there is one,
    else the first in Tune's creation order (`trial_order`). Trial ids are random: no order.
    """
    def score(r):
        v = r.get(f"final_{metric}", r.get(metric, ""))
        return float(v) if v != "" and math.isfinite(float(v)) else None

    ok = [r for r in rows if r["status"] == "TERMINATED" and not r["stopped_early"]
          and score(r) is not None]
    if not ok:
        return None
    sign = -1.0 if mode == "max" else 1.0

    def earliest(r):
        n = r.get("optuna_trial", "")
        return int(n) if n != "" else int(r.get("trial_order", sys.maxsize))

    return min(ok, key=lambda r: (sign * score(r), earliest(r), str(r["trial_id"])))


def row_config(row: dict[str, Any]) -> TrialConfig | None:
    """A row's configuration, as its trial resolved and wrote it to the row's poh_trial.yaml."""
    cfg = read_trial_spec(Path(row["trial_dir"])).get("config")
    return from_dict(cfg) if isinstance(cfg, dict) else None


def retire_lost_trials(exp_dir: Path, rows: list[dict[str, Any]]) -> int:
    """Rename poh_trial.yaml in trial folders that no row of results.csv names.

    A Tune trial started after the driver's last snapshot is unknown to the restored experiment:
    its configuration runs again as a new trial, and the old folder's partial epochs must not be
    counted as one more trial.
    """
    known = {Path(r["trial_dir"]).resolve() for r in rows}
    n = 0
    specs = [*exp_dir.glob(f"*/{TRIAL_FILE}"), *exp_dir.glob(f"*/c*/{TRIAL_FILE}")]  # packs
    for f in specs:
        if f.parent.resolve() not in known:
            os.replace(f, f.parent / LOST_TRIAL_FILE)
            n += 1
    return n


def finish(command: str, space: Space, exp_dir: Path, results, no_report: bool,
           shown: str | None = None) -> int:
    """Write results.csv and best_config.yaml, print the summary, write the report.

    Args:
        shown: where exp_dir's files are stored when exp_dir is a local mirror of remote
            storage (a URI): results.csv's trial_dir and the printed paths name it.
    Returns:
        the exit status: 1 when a trial errored, else 0.
    """
    rows = collect(results)
    where = shown or str(exp_dir)

    def stored(r: dict[str, Any]) -> dict[str, Any]:
        if shown is None:
            return r
        rel = Path(r["trial_dir"]).relative_to(exp_dir).as_posix()
        return {**r, "trial_dir": f"{shown}/{rel}"}

    if command == "optuna":  # each row's Optuna trial number (the searcher records the link)
        from poh_tune.search import open_study

        study = open_study(exp_dir)
        numbers = {t.user_attrs.get("ray_trial_id"): t.number for t in study.trials}
        for r in rows:
            r["optuna_trial"] = numbers.get(r["trial_id"], "")
    atomic_write_text(exp_dir / RESULTS_FILE, _csv_text([stored(r) for r in rows]))
    for r in rows:  # how each trial ended, for TensorBoard's HParams (an ASHA stop included)
        if Path(r["trial_dir"]).is_dir():
            write_session_end(Path(r["trial_dir"]) / TB_DIR, r["status"], int(r["epochs_done"]),
                              bool(r["stopped_early"]))
    lost = retire_lost_trials(exp_dir, rows)
    if lost:
        print(f"{lost} trial folder(s) from before the restore belong to no trial of this "
              f"experiment (started after its last snapshot, rerun since): their "
              f"{TRIAL_FILE} was renamed {LOST_TRIAL_FILE}")
    n_err = sum(r["status"] == "ERROR" for r in rows)
    n_stop = sum(bool(r["stopped_early"]) for r in rows)
    print(f"\n{len(rows)} trials: {len(rows) - n_err - n_stop} completed, {n_stop} stopped "
          f"early, {n_err} errored")
    errored = [r for r in rows if r["error"]]
    for r in errored[:MAX_ERRORS_SHOWN]:
        print(f"  {r['trial_id']} errored: {r['error'][:200]}")
    if len(errored) > MAX_ERRORS_SHOWN:
        print(f"  ... and {len(errored) - MAX_ERRORS_SHOWN} more (the error column of "
              f"{RESULTS_FILE})")
    if command == "optuna":
        from poh_tune.search import close_stale_trials

        stale = close_stale_trials(study)
        if stale:
            print(f"  {stale} Optuna trial(s) left RUNNING were marked FAIL")
        if (exp_dir / STUDY_FILE).exists():
            print(f"Optuna study: {exp_dir / STUDY_FILE} (optuna-dashboard sqlite:///"
                  f"{exp_dir / STUDY_FILE})")
        else:
            print(f"Optuna study: {exp_dir / STUDY_JOURNAL} (optuna-dashboard "
                  f"{exp_dir / STUDY_JOURNAL})")
    best = best_row(rows, space.metric, space.metric_mode)
    if best is not None:
        cfg = write_best_config(best, exp_dir / BEST_CONFIG_FILE)
        if cfg is not None:
            print("\n".join(best_lines(best, space.metric, cfg, space.base,
                                       exp_dir / BEST_CONFIG_FILE,
                                       None if shown is None else f"{where}/{BEST_CONFIG_FILE}")))
    print(f"results: {where}/{RESULTS_FILE}")
    if not no_report:
        run_report(exp_dir, None, quiet_missing=True, shown=shown)
    print(f"tensorboard --logdir {where}")
    return 1 if n_err else 0


def write_best_config(best: dict[str, Any], path: Path) -> TrialConfig | None:
    """The best row's configuration to `path` (from its poh_trial.yaml); None when unreadable."""
    cfg = row_config(best)
    if cfg is None:
        print(f"warning: best trial {best['trial_id']}: no readable {TRIAL_FILE} in "
              f"{best['trial_dir']}; {path.name} was not written", file=sys.stderr)
        return None
    save_config(cfg, path)
    return cfg


def best_lines(best: dict[str, Any], metric: str, cfg: TrialConfig, base: TrialConfig,
               path: Path, shown: str | None = None) -> list[str]:
    """The best trial in three lines: its label (the keys that differ from the space's base
    config), its metric and test τ to 4 significant digits with their CIs (the small-n rule),
    and where its configuration went (`shown`: where `path` is stored, when that is not here);
    the whole configuration is in best_config.yaml."""
    n = len(cfg.seeds)

    def stat(value_key: str, ci_key: str) -> str:
        v = _number(best.get(value_key))
        if ci_key not in best or not ci_shown(n):  # a metric without a CI column, or few seeds
            return sig(v)
        return ci_text(v, _number(best.get(ci_key)), n)

    label = config_label(cfg.to_dict(), base.to_dict())
    if best.get("experiments"):  # a grid's: the experiments it belongs to
        label += "; experiment " + best["experiments"].replace(";", ", ")
    over = (f"95 % CI over {n} seeds" if ci_shown(n)
            else f"mean over {n} seed{'s' * (n != 1)}, CI n/a below {MIN_CI_SEEDS} seeds")
    return [f"best: {best['trial_id']} ({label})",
            f"  {metric} {stat(f'final_{metric}', f'final_{metric}_ci95')}, test tau at the "
            f"best dev epoch {stat('test_tau', 'test_tau_ci95')} ({over})",
            f"  {path.name}: {shown or path} (python -m poh_tune.train --config "
            f"{path if shown is None else 'a local copy of it'})"]


def _number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):  # "" in results.csv: not logged, or a CI left out
        return math.nan


def report_command(exp_dir: Path, out: str | None) -> int:
    """`launch report EXP_DIR`: the report of an experiment directory (not of a trial folder)."""
    if exp_dir.exists() and not exp_dir.is_dir():
        raise UsageError(f"{exp_dir}: is a file; `report` takes an experiment directory "
                         f"(the folder holding results.csv and the trial folders)")
    if not exp_dir.is_dir():
        raise UsageError(f"{exp_dir}: no such experiment directory")
    if (exp_dir / TRIAL_FILE).exists():
        raise UsageError(f"{exp_dir}: is a trial folder (it holds {TRIAL_FILE}); `report` "
                         f"takes its experiment directory, {exp_dir.resolve().parent}")
    return run_report(exp_dir, out)


def run_report(exp_dir: Path, out: str | None, quiet_missing: bool = False,
               shown: str | None = None) -> int:
    """Call poh_tune.report.write_report; a failure is printed, never fatal to a finished run.

    `shown`: where exp_dir is stored when it is a local mirror (the printed paths name it).
    """
    try:
        from poh_tune.report import PLOT_FILES, write_report
    except ImportError as e:
        if not quiet_missing:
            print(f"error: the report module is not available ({e})", file=sys.stderr)
        return 2
    try:
        path = write_report(exp_dir, out_dir=out)
    except Exception as e:
        print(f"report failed ({type(e).__name__}: {e}); the run's results are intact",
              file=sys.stderr)
        return 1
    text = path.read_text()
    folder = shown if shown is not None and path.parent == exp_dir else str(path.parent)
    plots = [n for n in PLOT_FILES if f"]({n})" in text]  # those it shows
    print(f"report: {folder}/{path.name} (beside it: {', '.join([SUMMARY_FILE, *plots])}"
          + ("" if plots else "; no plots, nothing to plot") + ")")
    return 0


def report_interrupted(results, expected: int, epochs: int, resume_line: str) -> int:
    """The truth about an interrupted run, from each trial's own files; nothing is written.

    Tune marks every trial TERMINATED when it is interrupted, so a trial counts as finished when it
    errored or logged all its epochs, interrupted when it logged some, not started otherwise
    (trials Tune never created included). An ASHA stop counts as interrupted here; --resume keeps
    it stopped.

    Returns:
        130, the exit status of an interrupted run.
    """
    finished = partial = 0
    for r in results:
        for folder in config_folders(Path(r.path), r.config):
            want = int((read_trial_spec(folder).get("config") or {}).get("epochs", epochs))
            done = len(read_metrics(folder / METRICS_FILE))
            if r.error is not None or done >= want:
                finished += 1
            elif done > 0:
                partial += 1
    not_started = max(0, expected - finished - partial)
    print(f"\ninterrupted: {finished} of {expected} trials finished, {partial} interrupted, "
          f"{not_started} not started; results.csv, best_config.yaml and the report were not "
          f"written\ncontinue with: {resume_line}", file=sys.stderr)
    return 130
