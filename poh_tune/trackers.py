"""Writers of a configuration's per-epoch record: TensorBoard always, MLflow and W&B when asked.

Each is a RecordWriter: one tracker run per configuration (a pack's members included), opened with
the configuration's hyperparameters, given every epoch's record at step = epoch, closed with how
the configuration ended. MLflow and W&B are optional extras; a tracker that fails mid-run warns
once and is dropped for that configuration, and training goes on.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from poh_tune.io import RESULTS_FILE, TRACKER_WARNINGS_FILE, TRACKERS_FILE, atomic_write_text
from poh_tune.record import flat
from poh_tune.tblog import hparam_values

# How a configuration ended, in MLflow's RunStatus words. KILLED: Tune stopped it before its
# last epoch (an ASHA stop, or the run interrupted; a resume reopens the run as RUNNING).
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
# MLflow's client retries a failed request 7 times with doubling waits (minutes in all): an
# unreachable server would stall every epoch of the trial. The user's own settings win.
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
MLFLOW_BATCH = {"params": 100, "metrics": 1000}  # the most per log_batch request
MLFLOW_PARAM_CHARS = 6000


class TrackerError(Exception):
    """--mlflow / --wandb cannot work (the extra is missing, the server does not answer)."""


@dataclass(frozen=True)
class RunInfo:
    """What names one configuration's tracker run.

    name: "<trial id> <label>"; trial_id: the configuration's (a pack's member: <pack id>_c<k>);
    folder: the configuration's own folder (tracker run ids, W&B's offline files);
    epochs_logged: epochs its metrics.jsonl already holds (a retry, a restore); tags: more ids
    (pack, experiments, folder) for the tracker's run tags or config.
    """
    name: str
    trial_id: str
    folder: Path
    epochs_logged: int = 0
    tags: dict[str, str] = field(default_factory=dict)


class RecordWriter(Protocol):
    """One destination of a configuration's per-epoch record."""

    name: str

    def open(self, config: dict[str, Any], run: RunInfo) -> bool:
        """Start (or reopen, after a restore) the configuration's run; True when it is new, so
        that epochs logged before it existed are given to it."""

    def epoch(self, record: dict[str, Any], step: int) -> None:
        """One epoch's record (poh_tune.record), at step = epoch."""

    def close(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""


@dataclass(frozen=True)
class Trackers:
    """The run's tracker settings, resolved by the driver (`prepare`) and handed to every trial."""
    mlflow_uri: str | None = None
    mlflow_experiment_id: str | None = None
    wandb_project: str | None = None
    wandb_group: str | None = None  # the run name: one W&B group per experiment
    wandb_mode: str | None = None  # the driver's WANDB_MODE (offline, ...): trials on other nodes


def run_label(params: dict[str, Any]) -> str:
    """What sets the configuration apart: its searched or swept values, floats to 4 digits."""
    def short(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={short(v)}" for k, v in params.items()) or "base"


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers under flat keys (poh_tune.record.flat); bools as 0/1. The
    epoch is the step, not a metric."""
    out = {}
    for k, v in flat(record).items():
        if k != "epoch" and isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _read_ids(folder: Path) -> dict[str, str]:
    try:
        ids = json.loads((folder / TRACKERS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def _write_id(folder: Path, tracker: str, run_id: str) -> None:
    """Remember the tracker's run id: a retry or a restored run continues the same run."""
    atomic_write_text(folder / TRACKERS_FILE,
                      json.dumps({**_read_ids(folder), tracker: run_id}, indent=1) + "\n")


def _bounded_mlflow_http() -> None:
    for k, v in MLFLOW_HTTP_ENV.items():
        os.environ.setdefault(k, v)


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


class MLflowWriter:
    """A configuration's MLflow run: params, a metric history per record key, the final status."""

    name = "MLflow"

    def __init__(self, uri: str, experiment_id: str):
        self.uri, self.experiment_id = uri, experiment_id
        self.client: Any = None
        self.run_id = ""

    def open(self, config: dict[str, Any], run: RunInfo) -> bool:
        _bounded_mlflow_http()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        known = _read_ids(run.folder).get("mlflow")
        if known:
            self.run_id = known
            self.client.update_run(known, status="RUNNING")
            return False
        tags = {"poh_tune.trial_id": run.trial_id, **{f"poh_tune.{k}": v
                                                       for k, v in run.tags.items()}}
        self.run_id = self.client.create_run(self.experiment_id, run_name=run.name,
                                             tags=tags).info.run_id
        _write_id(run.folder, "mlflow", self.run_id)
        params = [Param(k, str(v)[:MLFLOW_PARAM_CHARS]) for k, v in hparam_values(config).items()]
        for chunk in _chunks(params, MLFLOW_BATCH["params"]):
            self.client.log_batch(self.run_id, params=chunk)
        return True

    def epoch(self, record: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numeric(record).items()]
        for chunk in _chunks(metrics, MLFLOW_BATCH["metrics"]):
            self.client.log_batch(self.run_id, metrics=chunk)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class WandbWriter:
    """A configuration's W&B run: config, history at step = epoch, summary poh_status, exit code.

    W&B knows no "killed" run: a KILLED configuration ends with exit code 0 and its status in
    the summary (poh_status), a FAILED one with exit code 1. Several runs live in one process
    (a pack), so each is its own Run object (reinit="create_new").
    """

    name = "W&B"

    def __init__(self, project: str, group: str | None, mode: str | None):
        self.project, self.group, self.mode = project, group, mode
        self.run: Any = None

    def open(self, config: dict[str, Any], run: RunInfo) -> bool:
        import wandb

        known = _read_ids(run.folder).get("wandb")
        run_id = known or uuid.uuid4().hex[:12]
        if not known:
            _write_id(run.folder, "wandb", run_id)
        # Offline files beside the configuration's others, unless WANDB_DIR says where.
        where = None if os.environ.get("WANDB_DIR") else str(run.folder)
        self.run = wandb.init(project=self.project, group=self.group, name=run.name, id=run_id,
                              config={**config, "trial_id": run.trial_id, **run.tags},
                              dir=where, mode=self.mode, resume="allow" if known else None,
                              reinit="create_new", settings=wandb.Settings(silent=True))
        return not known

    def epoch(self, record: dict[str, Any], step: int) -> None:
        self.run.log(numeric(record), step=step)

    def close(self, status: str) -> None:
        self.run.summary["poh_status"] = status
        self.run.finish(exit_code=1 if status == FAILED else 0)


class Guarded:
    """A remote tracker that may fail: its first error is one warning (on stderr, and in the
    configuration's tracker_warnings.txt for the driver's summary), then it is dropped."""

    def __init__(self, writer: RecordWriter, where: str):
        self.writer, self.where, self.name = writer, where, writer.name
        self.live, self.folder = True, None

    def _call(self, what: str, fn, *args) -> Any:
        if not self.live:
            return False
        try:
            return fn(*args)
        except Exception as e:  # the server is gone, refuses, times out: training goes on
            self.live = False
            why = (str(e).strip().splitlines() or [""])[0][:300]
            msg = (f"warning: {self.name} ({self.where}): {what} failed ({type(e).__name__}: "
                   f"{why}); this configuration's {self.name} run is no longer updated, "
                   f"training goes on")
            print(msg, file=sys.stderr, flush=True)
            if self.folder is not None:
                with open(self.folder / TRACKER_WARNINGS_FILE, "a") as f:
                    f.write(msg + "\n")
            return False

    def open(self, config: dict[str, Any], run: RunInfo) -> bool:
        self.folder = run.folder
        return self._call("starting its run", self.writer.open, config, run)

    def epoch(self, record: dict[str, Any], step: int) -> None:
        self._call(f"logging epoch {step}", self.writer.epoch, record, step)

    def close(self, status: str) -> None:
        self._call(f"closing its run ({status})", self.writer.close, status)


def remote_writers(trackers: Trackers | None) -> list[RecordWriter]:
    """The MLflow and W&B writers of a configuration, each guarded (none when not asked)."""
    out: list[RecordWriter] = []
    if trackers is None:
        return out
    if trackers.mlflow_uri:
        out.append(Guarded(MLflowWriter(trackers.mlflow_uri, str(trackers.mlflow_experiment_id)),
                           trackers.mlflow_uri))
    if trackers.wandb_project:
        out.append(Guarded(WandbWriter(trackers.wandb_project, trackers.wandb_group,
                                       trackers.wandb_mode),
                           f"project {trackers.wandb_project}"))
    return out


def _import(module: str, flag: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrackerError(f"{flag} needs the {module} package, which cannot be imported "
                           f"({e}): pip install 'poh_tune[{extra}]'") from None


def prepare(mlflow_uri: str | None, wandb_project: str | None, run_name: str
            ) -> Trackers | None:
    """Check the trackers before Ray starts; MLflow's experiment (named after the run) is found
    or created here, once, rather than raced for by every trial.

    Raises:
        TrackerError: an extra is missing, or the MLflow server does not answer.
    """
    if not mlflow_uri and not wandb_project:
        return None
    experiment_id = None
    if mlflow_uri:
        _bounded_mlflow_http()
        _import("mlflow", "--mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(tracking_uri=mlflow_uri)
            exp = client.get_experiment_by_name(run_name)
            experiment_id = exp.experiment_id if exp else client.create_experiment(run_name)
        except Exception as e:
            why = (str(e).strip().splitlines() or [""])[0][:300]
            raise TrackerError(f"--mlflow {mlflow_uri}: cannot use the tracking server "
                               f"({type(e).__name__}: {why})") from None
    if wandb_project:
        _import("wandb", "--wandb", "wandb")
    return Trackers(mlflow_uri=mlflow_uri, mlflow_experiment_id=experiment_id,
                    wandb_project=wandb_project, wandb_group=run_name if wandb_project else None,
                    wandb_mode=os.environ.get("WANDB_MODE") or None)


def warnings_summary(exp_dir: Path) -> list[str]:
    """One line per tracker that failed for some configuration of the run (the driver prints
    them at the end; each trial's own warning went to its Ray worker log)."""
    by_tracker: dict[str, list[str]] = {}
    for f in sorted([*exp_dir.glob(f"*/{TRACKER_WARNINGS_FILE}"),
                     *exp_dir.glob(f"*/c*/{TRACKER_WARNINGS_FILE}")]):
        for line in f.read_text().splitlines():
            name = line.removeprefix("warning: ").split(" (", 1)[0]
            by_tracker.setdefault(name, []).append(line)
    return [f"warning: {name} failed for {len(lines)} configuration(s) and was dropped for "
            f"them; their metrics.jsonl and TensorBoard runs are complete. First: "
            f"{lines[0].removeprefix('warning: ')}" for name, lines in by_tracker.items()]


def row_status(row: dict[str, Any]) -> str:
    """A results.csv row's tracker status: FAILED (ERROR), KILLED (stopped early) or FINISHED."""
    if row.get("status") == "ERROR":
        return FAILED
    return KILLED if str(row.get("stopped_early")) == "True" else FINISHED


def settle_mlflow(trackers: Trackers | None, exp_dir: Path) -> list[str]:
    """Close the MLflow runs still RUNNING when the run has ended, with their results.csv status.

    A trial closes its own run, but Tune may end a stopped trial's process before it could (an
    ASHA stop comes in answer to a report). W&B runs cannot be closed from here: such a one
    shows as crashed once synced.

    Returns:
        warnings (at most one: the server did not answer).
    """
    if trackers is None or not trackers.mlflow_uri or not (exp_dir / RESULTS_FILE).is_file():
        return []
    with open(exp_dir / RESULTS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    _bounded_mlflow_http()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trackers.mlflow_uri)
    try:
        for row in rows:
            run_id = _read_ids(Path(row["trial_dir"])).get("mlflow")
            if run_id and client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status=row_status(row))
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0][:300]
        return [f"warning: MLflow ({trackers.mlflow_uri}): could not close the runs left open "
                f"({type(e).__name__}: {why})"]
    return []


def after_run(trackers: Trackers | None, exp_dir: Path) -> list[str]:
    """The driver's last word on the trackers: MLflow runs left open are closed (settle_mlflow),
    and one warning line per tracker that failed (warnings_summary, or settle_mlflow's own)."""
    settled = settle_mlflow(trackers, exp_dir)
    summary = warnings_summary(exp_dir)
    if any(line.startswith("warning: MLflow ") for line in summary):
        settled = []  # the same server, already reported as gone
    return summary + settled
