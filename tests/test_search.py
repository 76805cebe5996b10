"""PohOptunaSearch without a cluster: ASHA stops become PRUNED, a restore leaves a clean study."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import poh_tune.search as search_mod
from poh_tune.search import (
    PohOptunaSearch,
    close_stale_trials,
    distributions,
    make_sampler,
    study_storage,
)

SEARCH = {"entropy_reg": {"type": "loguniform", "low": 2e-4, "high": 5e-3},
          "temperature_min": {"type": "uniform", "low": 0.5, "high": 1.2}}
EPOCHS = 4


def searcher(tmp_path) -> PohOptunaSearch:
    return PohOptunaSearch(space=distributions(SEARCH), metric="tau", mode="max",
                           sampler=optuna.samplers.TPESampler(seed=0), study_name="s",
                           storage=study_storage(tmp_path), epochs=EPOCHS)


def study(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=study_storage(tmp_path))


def run(s: PohOptunaSearch, trial_id: str, epochs: int) -> None:
    for e in range(1, epochs + 1):
        s.on_trial_result(trial_id, {"tau": 0.1 * e, "epoch": e})
    s.on_trial_complete(trial_id, {"tau": 0.1 * epochs, "epoch": epochs})


def test_early_stop_is_pruned_at_its_epoch_full_run_is_complete(tmp_path):
    s = searcher(tmp_path)
    s.suggest("a"), s.suggest("b"), s.suggest("c")
    run(s, "a", EPOCHS)
    run(s, "b", 2)  # ASHA stopped it after epoch 2
    s.on_trial_complete("c", None, error=True)
    a, b, c = study(tmp_path).trials
    assert a.state == TrialState.COMPLETE and a.value == pytest.approx(0.4)
    assert a.intermediate_values == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4})
    assert b.state == TrialState.PRUNED and b.user_attrs["stopped_at_epoch"] == 2
    assert max(b.intermediate_values) == 2
    assert c.state == TrialState.FAIL


def test_restore_adopts_the_trial_asked_after_the_snapshot(tmp_path):
    s = searcher(tmp_path)
    first = s.suggest("a")
    s.save(str(tmp_path / "searcher.pkl"))
    lost = s.suggest("b")  # asked after the snapshot; then the driver dies
    del s
    restored = searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    again = restored.suggest("c")  # the lost trial's Optuna trial, not a new ask
    assert again == lost
    new = restored.suggest("d")
    assert new not in (first, lost)  # the reseeded sampler does not repeat itself
    for tid in ("a", "c", "d"):
        run(restored, tid, EPOCHS)
    trials = study(tmp_path).trials
    assert len(trials) == 3
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3


def test_told_before_the_kill_is_not_told_again(tmp_path):
    s = searcher(tmp_path)
    s.suggest("a")
    s.save(str(tmp_path / "searcher.pkl"))
    run(s, "a", EPOCHS)  # finished and told; the snapshot predates it
    restored = searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("a", {"tau": 0.3, "epoch": 3})  # stale Tune result
    (t,) = study(tmp_path).trials
    assert t.state == TrialState.COMPLETE and t.value == pytest.approx(0.4)


def test_close_stale_trials(tmp_path):
    s = searcher(tmp_path)
    s.suggest("a")
    assert close_stale_trials(study(tmp_path)) == 1
    assert study(tmp_path).trials[0].state == TrialState.FAIL


def test_save_to_dir_keeps_its_temporary_file_out_of_the_synced_folder(tmp_path):
    """Ray copies the staging folder in the background: a temporary file inside it could vanish
    under the copy (an intermittent FileNotFoundError in the suite, before this test)."""
    staging = tmp_path / "driver_artifacts"
    staging.mkdir()
    written = []

    class Recorded(PohOptunaSearch):
        def save(self, checkpoint_path: str) -> None:
            written.append(Path(checkpoint_path))
            super().save(checkpoint_path)

    s = Recorded(space=distributions(SEARCH), metric="tau", mode="max",
                 sampler=optuna.samplers.TPESampler(seed=0), study_name="s",
                 storage=study_storage(tmp_path), epochs=EPOCHS)
    first = s.suggest("a")
    s.save_to_dir(str(staging), "sess")
    s.save_to_dir(str(staging), "sess")  # the next snapshot replaces the file
    assert len(written) == 2 and all(p.parent != staging for p in written)
    assert sorted(os.listdir(staging)) == ["searcher-state-sess.pkl"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".poh-searcher-")]
    restored = searcher(tmp_path)
    restored.restore_from_dir(str(staging))
    assert restored._ot_trials["a"].params == first


def test_a_moved_run_directory_restores_against_its_own_study(tmp_path):
    """The searcher's snapshot and tuner.pkl name the study by its place in the run directory."""
    import pickle
    import shutil

    from poh_tune.search import use_run_dir

    old, new = tmp_path / "old" / "run", tmp_path / "new" / "run"
    old.mkdir(parents=True)
    s = PohOptunaSearch(space=distributions(SEARCH), metric="tau", mode="max",
                        sampler=optuna.samplers.TPESampler(seed=0), study_name="s",
                        run_dir=old, epochs=EPOCHS)
    s.suggest("a")
    run(s, "a", EPOCHS)
    s.suggest("b")
    s.save(str(tmp_path / "searcher.pkl"))
    pickled = pickle.dumps(s)
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    use_run_dir(new)
    try:
        restored = PohOptunaSearch(space=distributions(SEARCH), metric="tau", mode="max",
                                   sampler=optuna.samplers.TPESampler(seed=0), study_name="s",
                                   run_dir=new, epochs=EPOCHS)
        restored.restore(str(tmp_path / "searcher.pkl"))
        unpickled = pickle.loads(pickled)
    finally:
        search_mod._RUN_DIR = None  # the module's default: where the study was saved
    for r in (restored, unpickled):
        assert r._storage.url == f"sqlite:///{new / 'optuna_study.db'}"
        assert r._ot_trials["b"].params == s._ot_trials["b"].params
        r.on_trial_complete("b", {"tau": 0.5, "epoch": EPOCHS})
    assert not old.exists()  # nothing recreated the study at the old place
    done = optuna.load_study(study_name="s", storage=study_storage(new)).trials
    assert [t.state for t in done] == [TrialState.COMPLETE, TrialState.COMPLETE]


def test_journal_backend_and_warm_start(tmp_path):
    from poh_tune.io import choose_backend, filesystem_type
    from poh_tune.search import WarmPoint

    s = PohOptunaSearch(space=distributions(SEARCH), metric="tau", mode="max",
                        sampler=make_sampler(0), study_name="s", run_dir=tmp_path,
                        backend="journal", epochs=EPOCHS)
    assert s.warm_start([WarmPoint({"entropy_reg": 1e-3, "temperature_min": 0.8}, 0.7, "g1",
                                   "grid")]) == 1
    s.suggest("a")
    assert (tmp_path / "optuna_study.journal").is_file()
    assert not (tmp_path / "optuna_study.db").exists()
    st = optuna.load_study(study_name="s", storage=study_storage(tmp_path, "journal"))
    assert st.trials[0].state == TrialState.COMPLETE and st.trials[0].value == 0.7
    assert st.trials[0].user_attrs["warm_start_from"] == "g1"
    assert st.trials[1].state == TrialState.RUNNING
    assert s._ot_study.sampler._constant_liar is True
    assert filesystem_type("/proc") == "proc"
    assert choose_backend("journal", tmp_path) == "journal"
    assert choose_backend("auto", "/proc") == "sqlite"  # proc is no shared file system


def test_in_space_needs_the_domain_and_the_fixed_keys():
    from poh_tune.search import in_space

    base = {"entropy_reg": 1e-3, "temperature_min": 0.8, "epochs": 3, "threads": 0}
    assert in_space({**base, "entropy_reg": 2e-3}, base, SEARCH) == {
        "entropy_reg": 2e-3, "temperature_min": 0.8}
    assert in_space({**base, "entropy_reg": 1e-2}, base, SEARCH) is None  # above its high
    assert in_space({**base, "epochs": 4}, base, SEARCH) is None  # another fixed key
    assert in_space({**base, "threads": 2}, base, SEARCH) is not None  # how it ran, not what
