"""report.load: trials found below the experiment directory, statuses, defaults of missing keys."""

from __future__ import annotations

import pytest
import yaml
from synthetic_experiment import build_experiment

from poh_tune.config import TrialConfig
from poh_tune.report.load import ReportError, Trial, load_experiment, trial_status
from poh_tune.report.oracle import oracle_all_pairs_tau
from poh_tune.report.summary import summary_frame


def test_statuses_from_results_csv(tmp_path):
    build_experiment(tmp_path)
    exp = load_experiment(tmp_path)
    assert {t.trial_id: t.status for t in exp.trials} == {
        "b1": "finished", "p1": "finished", "p2": "stopped early", "b2": "finished",
        "p3": "errored", "p4": "errored"}
    assert [o["trial_id"] for o in exp.orphans] == ["lost"]
    assert [t.trial_id for t in exp.trials] == ["b1", "b2", "p1", "p2", "p3", "p4"]  # PoH last


def test_statuses_inferred_without_results_csv(tmp_path):
    build_experiment(tmp_path, with_csv=False)
    exp = load_experiment(tmp_path)
    inferred = {t.trial_id: t.status for t in exp.trials}
    assert inferred == {"b1": "finished", "p1": "finished", "p2": "incomplete", "b2": "finished",
                        "p3": "incomplete", "p4": "incomplete"}


def test_trial_status_rules():
    assert trial_status(3, 3, None) == "finished"
    assert trial_status(2, 3, None) == "incomplete"
    assert trial_status(3, 3, {"status": "TERMINATED", "stopped_early": "True"}) == "stopped early"
    assert trial_status(2, 3, {"status": "TERMINATED"}) == "stopped early"
    assert trial_status(3, 3, {"status": "TERMINATED", "stopped_early": float("nan")}) == "finished"
    assert trial_status(0, 3, {"status": " error "}) == "errored"
    assert trial_status(1, 3, {"status": "RUNNING"}) == "incomplete"


def test_a_setting_missing_from_the_file_is_trialconfigs_default(tmp_path):
    """A config without array_len, mask_rate, epochs, seeds or n_heads ran with the defaults."""
    tdir = tmp_path / "t"
    tdir.mkdir()
    (tdir / "poh_trial.yaml").write_text(yaml.safe_dump({"config": {"model": "pot"},
                                                         "trial_id": "t"}))
    exp = load_experiment(tmp_path)
    (t,) = exp.trials
    d = TrialConfig()
    assert t.seeds == list(d.seeds)
    assert (t.setting("array_len"), t.setting("mask_rate"), t.setting("n_heads")) == (
        d.array_len, d.mask_rate, d.n_heads)
    assert t.status == "incomplete"  # no epoch of the default d.epochs was reported
    summary = summary_frame(exp)
    assert summary.loc[0, "oracle_tau_all"] == oracle_all_pairs_tau(d.array_len, d.mask_rate)
    assert Trial("u", tdir, {"array_len": 8}, [], []).setting("array_len") == 8


def test_no_trials_and_not_a_directory_are_report_errors(tmp_path):
    with pytest.raises(ReportError, match="no trials found"):
        load_experiment(tmp_path)
    with pytest.raises(ReportError, match="not a directory"):
        load_experiment(tmp_path / "missing")
    (tmp_path / "poh_trial.yaml").write_text("- a list\n")
    with pytest.raises(ReportError, match="expected a mapping"):
        load_experiment(tmp_path)
