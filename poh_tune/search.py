"""Optuna on Ray Tune done right: ASHA stops become PRUNED trials, and a restore leaves a clean study."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from poh_tune.io import STUDY_FILE

logger = logging.getLogger(__name__)


def distributions(search: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """spaces.Space.search -> Optuna distributions."""
    out: dict[str, Any] = {}
    for key, s in search.items():
        if s["type"] == "choice":
            out[key] = optuna.distributions.CategoricalDistribution(s["values"])
        elif s["type"] == "int":
            out[key] = optuna.distributions.IntDistribution(s["low"], s["high"])
        else:
            out[key] = optuna.distributions.FloatDistribution(
                float(s["low"]), float(s["high"]), log=s["type"] == "loguniform")
    return out


def study_storage(exp_dir: str | Path) -> optuna.storages.RDBStorage:
    """The study's SQLite file inside the experiment directory (optuna-dashboard opens it)."""
    return optuna.storages.RDBStorage(f"sqlite:///{Path(exp_dir).resolve() / STUDY_FILE}")


class PohOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about early stops and survives a driver restore.

    - Every epoch's metric is an intermediate value at step = epoch (not Tune's iteration count).
    - Every study trial names its Tune trial in the user attribute `ray_trial_id`.
    - A trial that ended before `epochs` without an error (ASHA stopped it) is PRUNED at the epoch
      it reached, not COMPLETE with its low-fidelity value (Ray's default, which misleads TPE).
    - After a restore, a study trial left RUNNING by a Tune trial that the restored experiment does
      not know (asked after the last searcher snapshot) is adopted by the next suggestion instead
      of asking anew, and the sampler is reseeded: its restored random state would otherwise
      propose that same configuration once more.
    """

    def __init__(self, *args: Any, epochs: int, **kwargs: Any):
        self._epochs = epochs
        self._orphans: list[int] = []  # study-internal trial ids awaiting adoption
        super().__init__(*args, **kwargs)

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials and self._orphans and self._ot_study is not None:
            tid = self._orphans.pop(0)
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, tid)
            logger.info("trial %s adopts Optuna trial id %s left RUNNING before the restore",
                        trial_id, tid)
        params = super().suggest(trial_id)
        if trial_id in self._ot_trials:  # which Tune trial (and trial folder) it is
            self._ot_study._storage.set_trial_user_attr(
                self._ot_trials[trial_id]._trial_id, "ray_trial_id", trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value, step = result.get(self.metric), result.get("epoch")
        if value is None or step is None:
            return
        ot_trial = self._ot_trials[trial_id]
        # After a restore an epoch may be reported again; Optuna keeps the first value of a step.
        if int(step) not in self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.report(float(value), int(step))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        storage = self._ot_study._storage
        if storage.get_trial(ot_trial._trial_id).state.is_finished():
            # Told before a driver kill that the restored searcher snapshot predates.
            self._completed_trials.add(trial_id)
            return
        if result:  # the last result (or the one ASHA stopped on) reaches only this hook
            self.on_trial_result(trial_id, result)
        value = result.get(self.metric) if result else None
        steps = storage.get_trial(ot_trial._trial_id).intermediate_values
        reached = max([int(result.get("epoch", 0)) if result else 0, *steps])
        if steps and reached > int(result.get("epoch", 0) if result else 0):
            value = steps[reached]  # the restored Tune result is older than the study
        if error:
            state, values = TrialState.FAIL, None
        elif value is None or reached < self._epochs:
            state, values = TrialState.PRUNED, None  # Optuna keeps the last intermediate value
            storage.set_trial_user_attr(ot_trial._trial_id, "stopped_at_epoch", reached)
        else:
            state, values = TrialState.COMPLETE, float(value)
        try:
            self._ot_study.tell(ot_trial, values, state=state)
        except Exception as exc:  # e.g. a NaN value: record the trial as failed, never crash Tune
            logger.warning("Optuna tell failed for %s (%s); marking it FAIL", trial_id, exc)
            try:
                self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
            except Exception as exc2:
                logger.warning("Optuna tell FAIL failed for %s too (%s)", trial_id, exc2)
        self._completed_trials.add(trial_id)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Ray's save, with the temporary file outside `checkpoint_dir`.

        `checkpoint_dir` is the driver's staging folder, which Ray copies to the storage path in
        a background thread. Ray writes the searcher to a temporary file inside it and renames it;
        a copy still running from the previous snapshot lists that file and fails when the rename
        takes it away ("FileNotFoundError: ... .tmp-searcher-state-...pkl"), the more often the
        longer pickling the study takes. A sibling folder is on the same filesystem and is not
        copied, so the rename stays atomic and the copy never sees a half-written file.
        """
        final = os.path.join(checkpoint_dir, self.CKPT_FILE_TMPL.format(session_str))
        fd, tmp = tempfile.mkstemp(prefix=".poh-searcher-", suffix=".pkl",
                                   dir=os.path.dirname(os.path.abspath(checkpoint_dir)))
        os.close(fd)
        try:
            self.save(tmp)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        live = {t._trial_id for tid, t in self._ot_trials.items() if tid not in self._completed_trials}
        self._orphans = [t._trial_id for t in self._ot_study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING,)) if t._trial_id not in live]
        self._ot_study.sampler.reseed_rng()


def close_stale_trials(study: optuna.Study) -> int:
    """Mark every trial still RUNNING as FAIL (call when no Tune trial is alive); returns the count."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "failed_because", "left running at exit")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        n += 1
    return n
