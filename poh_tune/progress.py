"""One progress line every few seconds instead of Tune's status table: counts, epochs and an ETA."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import ProgressReporter

from poh_tune.fmt import sig

ENDED = ("TERMINATED", "ERROR")
RUNNING = ("RUNNING",)


@dataclass(frozen=True)
class TrialProgress:
    """What the line needs of one Tune trial."""

    trial_id: str
    status: str  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    epochs: int  # epochs its config asks for
    epochs_done: int  # the last epoch it reported
    seconds: float  # Tune's time_total_s: wall time of the epochs it reported
    iterations: int  # Tune's training_iteration: reports since the trial (re)started
    last_s: float  # Tune's time_this_iter_s: wall time of its latest epoch
    metric: float | None  # its last value of the search metric


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def seconds_per_epoch(trials: list[TrialProgress]) -> float | None:
    """Measured wall time of one epoch: the mean of the trials' latest epochs.

    A trial's first epoch also holds its start-up (building the model and data), so it counts
    only until some trial has a second epoch.
    """
    later = [t.last_s for t in trials if t.iterations >= 2]
    if later:
        return sum(later) / len(later)
    first = [t for t in trials if t.iterations > 0]
    return sum(t.seconds for t in first) / sum(t.iterations for t in first) if first else None


def progress_line(trials: list[TrialProgress], total_trials: int, epochs: int, elapsed: float,
                  exp_dir: Path | str, metric: str = "tau", mode: str = "max",
                  asha: bool = False, slots: int = 1) -> str:
    """The progress line.

    Args:
        trials: the trials Tune has created so far.
        total_trials: how many the run will have (Optuna creates them one at a time).
        epochs: epochs of a trial not created yet.
        elapsed: seconds since the run started.
        exp_dir: the experiment directory (where the results go).
        metric, mode: the search metric, for the best trial so far.
        asha: trials may still be stopped early, so the ETA is an upper bound.
        slots: trials that run side by side (the most seen running at once so far).
    Returns:
        e.g. "[0:01:10] trials 3 done, 2 running, 3 waiting (of 8) | epochs 12/24 |
        0.9 s/epoch | ETA 0:00:06 | best tau 0.354 (20b397fb) | /runs/x".
    """
    done = [t for t in trials if t.status in ENDED]
    errored = sum(t.status == "ERROR" for t in trials)
    running = sum(t.status in RUNNING for t in trials)
    waiting = len(trials) - len(done) - running + max(0, total_trials - len(trials))
    # An ended trial needs no more epochs (an ASHA stop included); the others need all theirs.
    total = sum(t.epochs_done if t.status in ENDED else t.epochs for t in trials)
    total += max(0, total_trials - len(trials)) * epochs
    epochs_done = sum(t.epochs_done for t in trials)
    per_epoch = seconds_per_epoch(trials)
    parts = [f"[{_hms(elapsed)}] trials {len(done)} done"
             + (f" ({errored} errored)" if errored else "")
             + f", {running} running, {waiting} waiting (of {total_trials})",
             f"epochs {epochs_done}/{total}"]
    remaining = total - epochs_done
    if remaining <= 0:
        parts.append("ETA 0:00:00")
    elif per_epoch is None:
        parts.append("ETA after the first epoch")
    else:
        # Trials run `slots` at a time; the start-up of trials not begun yet is not counted.
        eta = remaining * per_epoch / max(1, slots, running)
        parts += [f"{sig(per_epoch)} s/epoch",
                  f"ETA {'<= ' if asha else ''}{_hms(eta)}"]
    scored = [t for t in trials if t.metric is not None]
    if scored:
        best = (max if mode == "max" else min)(scored, key=lambda t: t.metric)
        parts.append(f"best {metric} {sig(best.metric)} ({best.trial_id})")
    parts.append(str(exp_dir))
    return " | ".join(parts)


def _progress(trial: Any, epochs: int, metric: str) -> TrialProgress:
    r = trial.last_result or {}
    value = r.get(metric)
    cfg_epochs = (trial.config or {}).get("epochs", epochs)
    return TrialProgress(
        trial_id=str(trial.trial_id), status=str(trial.status), epochs=int(cfg_epochs),
        epochs_done=int(r.get("epoch", 0) or 0), seconds=float(r.get("time_total_s", 0) or 0),
        iterations=int(r.get("training_iteration", 0) or 0),
        last_s=float(r.get("time_this_iter_s", 0) or 0),
        metric=float(value) if isinstance(value, (int, float)) else None)


class ProgressLine(ProgressReporter):
    """Tune progress reporter that prints `progress_line` every `every_s` seconds and at the end.

    Tune's own table repeats every trial every 15 s and names the driver's staging folder
    ("Result logdir: /tmp/ray/session_.../driver_artifacts"), not where the results go.
    """

    def __init__(self, exp_dir: Path | str, total_trials: int, epochs: int, every_s: float = 30.0,
                 metric: str = "tau", mode: str = "max", asha: bool = False):
        # A str stays one: Path() would fold a storage URI's "s3://" into "s3:/".
        self.exp_dir, self.total_trials, self.epochs = exp_dir, total_trials, epochs
        self.every_s, self.metric, self.mode, self.asha = every_s, metric, mode, asha
        self._start = time.time()
        self._last = time.monotonic()
        self._slots = 1

    def setup(self, start_time: float | None = None, total_samples: int | None = None,
              metric: str | None = None, mode: str | None = None, **kwargs: Any) -> None:
        # Called on every fit, a resumed one included: the clock restarts there.
        self._start = start_time or time.time()
        self._last = time.monotonic()
        self._slots = 1

    def should_report(self, trials: list, done: bool = False) -> bool:
        self._slots = max(self._slots, sum(t.status in RUNNING for t in trials))
        return done or time.monotonic() - self._last >= self.every_s

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        self._last = time.monotonic()
        line = progress_line([_progress(t, self.epochs, self.metric) for t in trials],
                             self.total_trials, self.epochs, time.time() - self._start,
                             self.exp_dir, self.metric, self.mode, self.asha, self._slots)
        print(line, flush=True)
