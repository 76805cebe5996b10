"""Optuna on Ray Tune done right: ASHA stops become PRUNED trials, and a restore leaves a clean study."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from poh_tune.io import STUDY_FILE, STUDY_JOURNAL

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


# The run directory restore opens the study in (use_run_dir); None: where it was saved.
_RUN_DIR: Path | None = None


def study_storage(exp_dir: str | Path, backend: str = "sqlite") -> Any:
    """The study's storage inside the experiment directory: SQLite (optuna-dashboard opens the
    .db), or Optuna's journal file (for shared file systems; optuna-dashboard opens it too)."""
    if backend == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(Path(exp_dir).resolve() / STUDY_JOURNAL)))
    return optuna.storages.RDBStorage(f"sqlite:///{Path(exp_dir).resolve() / STUDY_FILE}")


def open_study(exp_dir: str | Path) -> optuna.Study:
    """The study of a poh_tune Optuna run, as its poh_experiment.yaml records it."""
    import yaml

    from poh_tune.io import EXPERIMENT_FILE

    launch = (yaml.safe_load((Path(exp_dir) / EXPERIMENT_FILE).read_text()) or {}).get(
        "launch") or {}
    return optuna.load_study(study_name=launch.get("study_name", Path(exp_dir).name),
                             storage=study_storage(exp_dir, launch.get("study_backend", "sqlite")))


def use_run_dir(exp_dir: str | Path) -> None:
    """Open a restored searcher's study in `exp_dir` (set before Tuner.restore unpickles it)."""
    global _RUN_DIR
    _RUN_DIR = Path(exp_dir).resolve()


def make_sampler(seed: int) -> optuna.samplers.TPESampler:
    """TPE, with constant_liar set: trials running at once count as bad guesses while they run,
    so that concurrent suggestions spread out (Optuna 5's default; off before 5, which
    pyproject allows)."""
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


# Settings of how a trial runs, not of what it learns: a grid point may differ in them.
EXECUTION_KEYS = ("diagnostics", "threads", "cuda_graphs")


@dataclass(frozen=True)
class WarmPoint:
    """A finished grid configuration told to the study: its searched params and metric value."""

    params: dict[str, Any]
    value: float
    trial_id: str
    grid_dir: str


def in_space(cfg: dict[str, Any], base: dict[str, Any], search: dict[str, dict[str, Any]]
             ) -> dict[str, Any] | None:
    """The searched params of a full config dict that lies in the Optuna space (every searched
    key inside its domain, every other key equal to the base's); None where it does not."""
    for k, v in base.items():
        if k not in search and k not in EXECUTION_KEYS and cfg.get(k) != v:
            return None
    params = {}
    for k, dom in search.items():
        v = cfg.get(k)
        if dom["type"] == "choice":
            if v not in dom["values"]:
                return None
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                dom["low"] <= v <= dom["high"]):
            return None
        params[k] = v
    return params


def warm_start_points(grid_dir: str | Path, space: Any) -> tuple[list[WarmPoint], int]:
    """The configurations of a finished grid run that lie in `space` (spaces.Space with a
    search section), each with its search metric at its last epoch (what a COMPLETE trial of
    the search is told); configurations that diverged or did not run every epoch are left out.

    Returns:
        the points (in trial-id order) and the number of configurations the grid holds.
    """
    import yaml

    from poh_tune.config import from_dict
    from poh_tune.io import DIVERGED_FILE, METRICS_FILE, TRIAL_FILE, read_metrics

    base = space.base.to_dict()
    points, n = [], 0
    for spec_file in sorted(Path(grid_dir).rglob(TRIAL_FILE)):
        folder = spec_file.parent
        info = yaml.safe_load(spec_file.read_text()) or {}
        n += 1
        cfg = from_dict(info.get("config") or {}).to_dict()
        rows = read_metrics(folder / METRICS_FILE)
        if (folder / DIVERGED_FILE).exists() or not rows or int(rows[-1]["epoch"]) < cfg["epochs"]:
            continue
        value = rows[-1].get(space.metric)
        params = in_space(cfg, base, space.search)
        if params is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        points.append(WarmPoint(params, float(value), str(info.get("trial_id", folder.name)),
                                str(Path(grid_dir).resolve())))
    return sorted(points, key=lambda p: p.trial_id), n


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

    def __init__(self, *args: Any, epochs: int, run_dir: str | Path | None = None,
                 backend: str = "sqlite", **kwargs: Any):
        self._epochs = epochs
        self._orphans: list[int] = []  # study-internal trial ids awaiting adoption
        # With a run_dir the study is pickled by its place in the run directory, not by an
        # absolute path: a moved run directory resumes against its own study.
        self._run_dir = None if run_dir is None else str(Path(run_dir).resolve())
        self._backend = backend
        if run_dir is not None:
            kwargs["storage"] = study_storage(run_dir, backend)
        super().__init__(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._run_dir is not None:  # tuner.pkl and the searcher snapshot: no storage object
            state["_storage"] = state["_ot_study"] = None
            state["_ot_trials"] = {tid: t._trial_id for tid, t in self._ot_trials.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reopen()

    def _reopen(self) -> None:
        """After unpickling: the study in the run directory (use_run_dir, else where it was)."""
        if self._run_dir is None or self._ot_study is not None:
            return
        run_dir = _RUN_DIR or Path(self._run_dir)
        self._run_dir = str(run_dir)
        self._storage = study_storage(run_dir, self._backend)
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                           sampler=self._sampler,
                                           pruner=optuna.pruners.NopPruner())
        self._ot_trials = {tid: optuna.trial.Trial(self._ot_study, n)
                           for tid, n in self._ot_trials.items()}

    def save(self, checkpoint_path: str) -> None:
        import pickle

        from poh_tune.io import atomic_write_bytes

        atomic_write_bytes(checkpoint_path, pickle.dumps(self.__getstate__()))

    def warm_start(self, points: list[WarmPoint]) -> int:
        """Tell the study each point as a COMPLETE trial (before TPE's first suggestion);
        returns how many were told. The user attribute warm_start_from names the grid trial."""
        dists = self._space
        for p in points:
            self._ot_study.add_trial(optuna.trial.create_trial(
                params=p.params, distributions={k: dists[k] for k in p.params}, value=p.value,
                user_attrs={"warm_start_from": p.trial_id, "warm_start_dir": p.grid_dir}))
        return len(points)

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
        if self._run_dir is not None:
            self._ot_study = None
            self._reopen()
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
