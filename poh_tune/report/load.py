"""An experiment directory read back: its trials, their configs, metrics and results.csv status."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from poh_tune.config import TrialConfig, read_yaml
from poh_tune.io import EXPERIMENT_FILE, METRICS_FILE, RESULTS_FILE, TRIAL_FILE, read_metrics

# A setting missing from a trial's poh_trial.yaml is TrialConfig's default, as for the run itself.
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrialConfig)}
# A PoH config is compared within its task (the baseline of the same task).
TASK_KEYS = ("array_len", "mask_rate", "train_samples", "value_levels")
# Settings a baseline (one pass, no PoH block, no controller) does not use: left out of its label
# and of the choice of the baseline a PoH configuration is compared with.
POH_ONLY_KEYS = frozenset({
    "max_inner_iters", "hrm_period", "controller", "d_ctrl", "grad_mode", "deep_supervision",
    "temperature_init", "temperature_min", "temperature_decay", "entropy_reg",
    "entropy_decay_rate", "entropy_decay_every", "lr_controller", "clip_controller",
    "controller_warmup_epochs"})


class ReportError(ValueError):
    """The experiment directory cannot be reported on (no trials, unreadable files)."""


@dataclass
class Trial:
    trial_id: str
    trial_dir: Path
    config: dict[str, Any]  # poh_trial.yaml's config, as written (not validated)
    experiments: list[str]
    rows: list[dict[str, Any]]  # metrics.jsonl, one per epoch, ascending
    status: str = "incomplete"  # finished / stopped early / errored / incomplete
    error: str = ""  # the last line of its error, from results.csv

    @property
    def is_poh(self) -> bool:
        return self.config.get("model") == "pot"

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    @property
    def epochs_done(self) -> int:
        return int(self.last.get("epoch", 0))

    @property
    def seeds(self) -> list[int]:
        return list(self.setting("seeds"))

    def setting(self, key: str) -> Any:
        """The config value of `key`, TrialConfig's default where the file does not hold it."""
        return self.config.get(key, DEFAULTS[key])

    def task(self) -> tuple:
        return tuple(self.setting(k) for k in TASK_KEYS)  # a key an older file lacks: default


@dataclass
class Experiment:
    exp_dir: Path
    meta: dict[str, Any]  # poh_experiment.yaml, {} when missing
    trials: list[Trial]
    orphans: list[dict[str, Any]]  # results.csv rows with no trial directory


def truthy(v: Any) -> bool:
    """A flag from results.csv or metrics.jsonl: a bool, a number or its text ("True", "1")."""
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
        if truthy(csv_row.get("stopped_early")) or epochs_done < epochs:
            return "stopped early"
        return "finished"
    return "incomplete"


def _read_trials(exp_dir: Path) -> list[Trial]:
    """Every `**/poh_trial.yaml` below `exp_dir` with its metrics, in path order."""
    trials: list[Trial] = []
    for spec_path in sorted(exp_dir.glob(f"**/{TRIAL_FILE}")):
        spec = read_yaml(spec_path)
        if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
            raise ReportError(f"{spec_path}: expected a mapping with a 'config' mapping")
        tdir = spec_path.parent
        trials.append(Trial(trial_id=str(spec.get("trial_id", tdir.name)), trial_dir=tdir,
                            config=spec["config"], experiments=list(spec.get("experiments") or []),
                            rows=read_metrics(tdir / METRICS_FILE)))
    return trials


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
    meta_path = exp_dir / EXPERIMENT_FILE
    meta = read_yaml(meta_path) if meta_path.is_file() else {}
    meta = meta if isinstance(meta, dict) else {}
    csv_rows: list[dict[str, Any]] = []
    csv_path = exp_dir / RESULTS_FILE
    if csv_path.is_file():
        csv_rows = pd.read_csv(csv_path, dtype={"trial_id": str}).to_dict("records")
    trials = _read_trials(exp_dir)
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
        t.status = trial_status(t.epochs_done, int(t.setting("epochs")), row)
        err = row.get("error") if row is not None else None
        t.error = err.strip() if isinstance(err, str) else ""
    orphans = [r for i, r in enumerate(csv_rows) if i not in matched]
    trials.sort(key=lambda t: (t.is_poh, t.trial_id))
    return Experiment(exp_dir, meta, trials, orphans)
