"""`launch grid` with --scheduler asha, and process crashes and divergence under --reuse-actors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from test_launch import check_trial_dirs, epochs_of, launch, rows_of, tb

# A tiny task that a good learning rate learns within one epoch (dev tau about 0.5 after
# epoch 1 against about -0.2 at initialisation): 8 optimizer steps per epoch, well under a
# second per epoch.
ASHA_BASE = dict(array_len=4, train_samples=128, dev_samples=32, test_samples=8, epochs=4,
                 batch_size=16, max_inner_iters=1, hrm_period=1, d_model=8, n_heads=2, d_ff=8,
                 d_ctrl=4, seeds=[1], controller_warmup_epochs=0)
GOOD_LR = 1e-2
TINY_LRS = [1e-9, 2e-9]  # too small to move the weights: tau stays at its initial value
GRACE, RF = 1, 2


def _tune_results(row: dict) -> list[dict]:
    """Tune's own result.json of a trial: one line per report, with the reporting process's pid."""
    return [json.loads(x) for x in open(Path(row["trial_dir"]) / "result.json")]


def _trial_files_intact(row: dict, done: int) -> None:
    """Every file of a trial that ran `done` epochs: one complete metrics row per epoch, its own
    poh_trial.yaml, one TensorBoard point per epoch and one Tune result per epoch."""
    trial_dir = Path(row["trial_dir"])
    lines = (trial_dir / "metrics.jsonl").read_text().splitlines()
    got = [json.loads(x) for x in lines]  # a torn line would fail here
    assert [m["epoch"] for m in got] == list(range(1, done + 1))
    for m in got:
        assert m["trial_id"] == row["trial_id"]
        assert all(math.isfinite(m[k]) for k in ("tau", "tau_all", "train_loss", "best_tau"))
    info = yaml.safe_load((trial_dir / "poh_trial.yaml").read_text())
    assert info["trial_id"] == row["trial_id"]
    assert info["config"]["lr_encoder"] == float(row["config.lr_encoder"])
    assert [e.step for e in tb(trial_dir).Scalars("tau/dev")] == list(range(1, done + 1))
    assert [r["epoch"] for r in _tune_results(row)] == list(range(1, done + 1))


def _uninterrupted(trial_dir: Path, epochs: int | None = None) -> list[dict]:
    """The trial's own configuration trained from scratch here, in one process, no faults,
    for `epochs` epochs (default: all of them)."""
    import torch

    from poh_tune.config import from_dict
    from poh_tune.trainer import TrialRunner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trial: one CPU per trial
    try:
        cfg = from_dict(yaml.safe_load(open(trial_dir / "poh_trial.yaml"))["config"])
        runner = TrialRunner(cfg, "cpu")
        return [runner.run_epoch() for _ in range(epochs or cfg.epochs)]
    finally:
        torch.set_num_threads(threads)


def _matches_uninterrupted(row: dict) -> None:
    """The trial's logged epochs equal the same epochs of an uninterrupted run of its config."""
    trial_dir = Path(row["trial_dir"])
    got = [json.loads(x) for x in open(trial_dir / "metrics.jsonl")]
    want = _uninterrupted(trial_dir, len(got))
    for g, w in zip(got, want, strict=True):
        for k in ("tau", "tau_all", "train_loss", "best_tau", "test_tau"):
            assert g[k] == pytest.approx(w[k], abs=1e-6), (row["trial_id"], k, g["epoch"])


@pytest.mark.slow
@pytest.mark.parametrize("reuse", [False, True], ids=["fresh_processes", "reuse_actors"])
def test_grid_with_asha_stops_the_hopeless_trials_and_keeps_every_trial(tmp_path, reuse):
    """ASHA on a real grid: the trials whose learning rate is too small to learn are stopped
    at the first rung, the good one runs every epoch, and every trial is in the results.

    Deterministic: the grid runs one trial at a time in file order (max_concurrent 1), so the
    good trial reaches every rung first (no cutoff yet: ASHA continues it) and each tiny-lr
    trial meets a cutoff that includes the good trial's tau at the rung. With one ASHA bracket
    the NumPy draw of a bracket has a single outcome. With --reuse-actors the process of a
    stopped trial goes on to the next trial, and the stopped trial must log no further epoch.
    """
    epochs = ASHA_BASE["epochs"]
    lrs = [GOOD_LR, *TINY_LRS]
    space = tmp_path / "asha.yaml"
    space.write_text(yaml.safe_dump({
        "name": "asha", "metric": "tau", "metric_mode": "max", "scheduler": "fifo",
        "asha": {"grace_period": GRACE, "reduction_factor": RF}, "max_concurrent": 1,
        "base": ASHA_BASE,
        "experiments": {"lr": {"description": "one good, two hopeless learning rates",
                               "sweep": {"lr_encoder": lrs}}}}, sort_keys=False))
    p = launch("grid", str(space), "--scheduler", "asha", "--storage", str(tmp_path),
               "--name", "a", "--num-cpus", "2", *(["--reuse-actors"] if reuse else []),
               timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]  # stopping is no error
    exp = tmp_path / "a"
    rows = {float(r["config.lr_encoder"]): r for r in rows_of(exp)}
    assert sorted(rows) == sorted(lrs)  # every trial is listed, stopped or not
    assert all(r["status"] == "TERMINATED" and r["error"] == "" for r in rows.values())

    good = rows[GOOD_LR]
    assert good["stopped_early"] == "False" and int(good["epochs_done"]) == epochs
    check_trial_dirs([good], epochs)
    good_tau = {m["epoch"]: m["tau"] for m in map(json.loads, open(Path(good["trial_dir"])
                                                                  / "metrics.jsonl"))}
    for lr in TINY_LRS:
        r = rows[lr]
        done = int(r["epochs_done"])
        assert r["stopped_early"] == "True" and done < epochs, r
        # The premise of the expected decision, read from the files: at the first rung the
        # hopeless trial is below the good one, so ASHA stops it right there.
        tau_at_rung = json.loads(open(Path(r["trial_dir"]) / "metrics.jsonl").readline())["tau"]
        assert tau_at_rung < good_tau[GRACE]
        assert done == GRACE
        _trial_files_intact(r, done)
    for r in rows.values():  # nothing carried over from the trial before it in the process
        _matches_uninterrupted(r)
    if reuse:  # one trial at a time: the stopped trial's process ran the next trial
        pids = {lr: {x["pid"] for x in _tune_results(rows[lr])} for lr in lrs}
        assert pids[TINY_LRS[0]] == pids[TINY_LRS[1]], pids

    # The report lists every trial with the status results.csv implies.
    with open(exp / "summary.csv") as f:
        summary = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert set(summary) == {r["trial_id"] for r in rows.values()}
    for r in rows.values():
        want = "stopped early" if r["stopped_early"] == "True" else "finished"
        assert summary[r["trial_id"]]["status"] == want
        assert int(summary[r["trial_id"]]["epochs_done"]) == int(r["epochs_done"])
    report = (exp / "report.md").read_text()
    assert "stopped early" in report
    # The best configuration is chosen among trials that ran every epoch.
    assert yaml.safe_load((exp / "best_config.yaml").read_text())["lr_encoder"] == GOOD_LR
    assert f"{len(lrs)} trials: 1 completed, {len(TINY_LRS)} stopped early, 0 errored" in p.stdout


# One optimizer step per epoch (lr_encoder 1e6 gives a NaN loss at epoch 2, after a logged
# epoch and a checkpoint), and a dev set large enough that the trials' metrics all differ: state
# carried from one trial into the next in a reused process would show in the numbers.
REUSE_BASE = dict(array_len=4, train_samples=32, dev_samples=32, test_samples=32, epochs=2,
                  batch_size=32, max_inner_iters=1, hrm_period=1, d_model=8, n_heads=2, d_ff=8,
                  d_ctrl=4, seeds=[1], controller_warmup_epochs=0, lr_encoder=0.02)
# The diverging trial third: the first two trials hold both CPUs, so it can only start in the
# cached process of one of them (reused), and other trials follow it.
REUSE_LRS = [0.1, 0.003, 1e6, 0.01, 0.03]
DIVERGING_LR = 1e6
# Only the one long trial reaches the crash epoch: the others end (or diverge) before it.
LONG_EPOCHS, CRASH_EPOCH = 5, 3


@pytest.fixture(scope="module")
def reuse_run(tmp_path_factory):
    """One real grid with --reuse-actors on 2 CPUs (two trials at a time, six trials, in file
    order): one trial diverges at epoch 2, the long last trial's process dies hard after
    epoch 3."""
    tmp = tmp_path_factory.mktemp("reuse")
    space = tmp / "reuse.yaml"
    space.write_text(yaml.safe_dump({
        "name": "reuse", "base": REUSE_BASE,
        "experiments": {
            "lr": {"description": "short trials, one diverges",
                   "sweep": {"lr_encoder": REUSE_LRS}},
            "long": {"description": "the trial that crashes",
                     "sweep": {"epochs": [LONG_EPOCHS]}}}}, sort_keys=False))
    p = launch("grid", str(space), "--storage", str(tmp), "--name", "r", "--no-report",
               "--num-cpus", "2", "--cpus-per-trial", "1", "--max-failures", "2",
               "--reuse-actors", env={"POH_TUNE_CRASH_AFTER_EPOCH": str(CRASH_EPOCH)},
               timeout=240)
    exp = tmp / "r"
    rows = rows_of(exp) if (exp / "results.csv").exists() else []
    return {"exp": exp, "rc": p.returncode, "out": p.stdout + p.stderr, "rows": rows}


def _long(rows: list[dict]) -> dict:
    [row] = [r for r in rows if int(r["config.epochs"]) == LONG_EPOCHS]
    return row


@pytest.mark.slow
def test_reuse_actors_run_accounts_for_every_trial_and_reuses_processes(reuse_run):
    rows = reuse_run["rows"]
    assert reuse_run["rc"] == 1, reuse_run["out"][-3000:]  # 1: a trial errored
    want = sorted([(LONG_EPOCHS, REUSE_BASE["lr_encoder"])] + [(2, lr) for lr in REUSE_LRS])
    assert sorted((int(r["config.epochs"]), float(r["config.lr_encoder"])) for r in rows) == want
    assert len({r["trial_id"] for r in rows}) == len(rows)
    assert len({r["trial_dir"] for r in rows}) == len(rows)
    # The run did reuse processes: some process ran more than one trial (Tune's own pid field).
    trials_of_pid: dict[int, set[str]] = {}
    for r in rows:
        for res in _tune_results(r):
            trials_of_pid.setdefault(res["pid"], set()).add(r["trial_id"])
    assert max(len(t) for t in trials_of_pid.values()) >= 2, trials_of_pid


@pytest.mark.slow
def test_reuse_actors_crashed_trial_resumes_from_its_checkpoint(reuse_run):
    row = _long(reuse_run["rows"])
    assert row["status"] == "TERMINATED" and row["error"] == "", row
    trial_dir = Path(row["trial_dir"])
    assert (trial_dir / ".crashed").exists()  # its process did die after the crash epoch
    assert epochs_of(trial_dir) == list(range(1, LONG_EPOCHS + 1))  # each epoch logged once
    # Resumed, not retrained: Tune saw each epoch once, the epochs after the crash from
    # another process than the ones before it.
    results = _tune_results(row)
    assert [r["epoch"] for r in results] == list(range(1, LONG_EPOCHS + 1))
    before = {r["pid"] for r in results if r["epoch"] <= CRASH_EPOCH}
    after = {r["pid"] for r in results if r["epoch"] > CRASH_EPOCH}
    assert len(before) == 1 and len(after) == 1 and before != after
    check_trial_dirs([row], LONG_EPOCHS)
    _matches_uninterrupted(row)
    # The crash was injected into this trial only: no other trial reached the crash epoch.
    crashed = [r["trial_id"] for r in reuse_run["rows"]
               if (Path(r["trial_dir"]) / ".crashed").exists()]
    assert crashed == [row["trial_id"]]


@pytest.mark.slow
def test_reuse_actors_diverged_trial_errors_with_seed_and_epoch(reuse_run):
    [bad] = [r for r in reuse_run["rows"] if float(r["config.lr_encoder"]) == DIVERGING_LR]
    assert bad["status"] == "ERROR"
    assert "seed 1, epoch 2: training loss is nan" in bad["error"], bad["error"]
    assert epochs_of(bad["trial_dir"]) == [1]
    diverged = (Path(bad["trial_dir"]) / ".diverged").read_text()
    assert diverged.strip() == "seed 1, epoch 2: training loss is nan"
    assert f"{bad['trial_id']} errored: " in reuse_run["out"]
    # It diverged in a reused process, one that had run another trial before it (Tune ends an
    # errored trial's process; the trials after it are checked in the next test).
    pids = {x["pid"] for x in _tune_results(bad)}
    others = {x["pid"] for r in reuse_run["rows"] if r is not bad for x in _tune_results(r)}
    assert pids & others, (pids, others)


@pytest.mark.slow
def test_reuse_actors_other_trials_finish_with_their_own_correct_files(reuse_run):
    """Every trial but the diverged one ends TERMINATED with its own files, and its metrics
    equal those of training its configuration alone: nothing leaks from the trials run before
    it in the same process, nor from the diverged or crashed trial's files."""
    ok = [r for r in reuse_run["rows"] if float(r["config.lr_encoder"]) != DIVERGING_LR]
    assert len(ok) == len(REUSE_LRS)
    # The premise: the trials' results all differ, so one trial's state carried into another
    # would change the other's numbers.
    assert len({r["final_tau"] for r in ok}) == len(ok), [r["final_tau"] for r in ok]
    for r in ok:
        assert r["status"] == "TERMINATED" and r["error"] == "" and r["stopped_early"] == "False"
        epochs = int(r["config.epochs"])
        _trial_files_intact(r, epochs)
        check_trial_dirs([r], epochs)
        assert [x["trial_id"] for x in _tune_results(r)] == [r["trial_id"]] * epochs
        _matches_uninterrupted(r)
