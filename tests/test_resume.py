"""A driver killed or interrupted (Ctrl-C) mid-run, then resumed: every trial ends, nothing is lost
or logged twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.cli_runs import (
    kill_session,
    launch_popen,
    logged_epochs,
    lr_grid,
    metrics_lines,
    results_rows,
    wait_for,
)

# What Ray says when Tune's experiment snapshot names a checkpoint that num_to_keep deleted since
# (the trial then failed three times on resume and ended ERROR).
CHECKPOINT_RACE = "Could not recover from checkpoint as it does not exist on storage anymore"


@pytest.mark.slow
def test_driver_killed_at_several_points_then_resumed_loses_nothing(tmp_path):
    """SIGKILL the driver right after the run starts, then again mid-run (a trial finished,
    another half done); --resume each time. No finished trial is rerun, no epoch is logged
    twice, and no result file is left truncated."""
    from test_launch import check_trial_dirs

    epochs, lrs = 12, [0.001, 0.002, 0.003, 0.004]
    space = tmp_path / "kill.yaml"
    # 8 optimizer steps an epoch (about 0.1 s): the trials are slow enough to be caught
    # mid-run. The many-kill test below uses 1-step epochs.
    space.write_text(lr_grid(lrs, epochs=epochs, train_samples=128))
    exp = tmp_path / "k"
    common = ["--storage", str(tmp_path), "--name", "k", "--no-report", "--num-cpus", "2"]

    # 1. Right after start: the experiment is registered (tuner.pkl), no epoch logged yet.
    proc = launch_popen(["grid", str(space), *common])
    assert wait_for(lambda: (exp / "tuner.pkl").exists(), proc), "the run never started"
    kill_session(proc)
    info = (exp / "poh_experiment.yaml").read_text()
    assert yaml.safe_load(info)["mode"] == "grid"

    # 2. Mid-run, on the resumed run: one trial finished, another one half done.
    def mid_run() -> bool:  # the half-done trial must not finish while the driver is torn down
        counts = [d.count(b"\n") for d in metrics_lines(exp).values()]
        return epochs in counts and any(0 < c <= epochs // 2 for c in counts)

    proc = launch_popen(["grid", "--resume", *common])
    if not wait_for(mid_run, proc):
        pytest.fail("the run ended before it could be killed mid-run:\n" + kill_session(proc)[-3000:])
    kill_session(proc)
    finished = {f: d for f, d in metrics_lines(exp).items() if d.count(b"\n") == epochs}
    partial = {f: d for f, d in metrics_lines(exp).items() if 0 < d.count(b"\n") < epochs}
    assert finished and partial
    assert not (exp / "results.csv").exists()

    # 3. Resume to the end.
    p = subprocess.run([sys.executable, "-m", "poh_tune.launch", "grid", "--resume", *common],
                       capture_output=True, text=True, timeout=300)
    assert CHECKPOINT_RACE not in p.stdout + p.stderr
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = results_rows(exp)
    assert sorted(float(r["config.lr_encoder"]) for r in rows) == lrs
    assert all(r["status"] == "TERMINATED" and r["stopped_early"] == "False" for r in rows)
    check_trial_dirs(rows, epochs)  # every epoch once in metrics.jsonl and in TensorBoard
    for f, data in finished.items():  # finished trials were not rerun
        assert f.read_bytes() == data
    for f, data in partial.items():  # a half-done trial kept its epochs and went on
        assert f.read_bytes().startswith(data)
    assert (exp / "poh_experiment.yaml").read_text() == info
    assert yaml.safe_load((exp / "best_config.yaml").read_text())["epochs"] == epochs
    assert not list(exp.glob(".*.tmp"))  # no half-written result file left behind


# Each kill costs a driver start (about 12 s on 2 shared cores: Python, Ray, a worker importing
# torch), so the suite kills 8 times; POH_TUNE_KILLS=20 kills 20 times (about 4.5 min).
KILLS = int(os.environ.get("POH_TUNE_KILLS", "8"))


@pytest.mark.slow
def test_driver_killed_many_times_with_millisecond_epochs_every_trial_terminated(tmp_path):
    """The checkpoint race: one-step epochs report (and used to checkpoint) faster than Tune's
    experiment snapshot follows. SIGKILL the driver KILLS times, each time after the trials made
    progress and a random few hundred milliseconds more, resuming after each kill; then resume
    to the end. Every trial ends TERMINATED with every epoch logged exactly once."""
    import random

    rng = random.Random(12)
    epochs, lrs = 40, [0.001, 0.002, 0.003, 0.004]
    space = tmp_path / "kills.yaml"
    space.write_text(lr_grid(lrs, epochs=epochs))  # 16 samples, batch 16: one step
    exp = tmp_path / "k"
    common = ["--storage", str(tmp_path), "--name", "k", "--no-report", "--num-cpus", "2",
              "--cpus-per-trial", "1", "--reuse-actors"]

    def logged() -> int:
        return sum(d.count(b"\n") for d in metrics_lines(exp).values())

    kills = resumes = 0
    outputs = []
    args = ["grid", str(space), *common]
    t0 = time.time()
    while kills < KILLS:
        before = logged()
        proc = launch_popen(args)
        if args[1] != "--resume":
            assert wait_for(lambda: (exp / "tuner.pkl").exists(), proc), kill_session(proc)[-3000:]
            args = ["grid", "--resume", *common]
        else:
            resumes += 1
        if not wait_for(lambda b=before: logged() > b, proc, timeout=120):
            outputs.append(kill_session(proc))  # ended (or stalled) before it could be killed
            break
        time.sleep(rng.uniform(0, 0.3))
        outputs.append(kill_session(proc))
        kills += 1
    kill_s = time.time() - t0
    p = subprocess.run([sys.executable, "-m", "poh_tune.launch", *args], capture_output=True,
                       text=True, timeout=300)
    resumes += args[1] == "--resume"
    outputs.append(p.stdout + p.stderr)
    assert not [o for o in outputs if CHECKPOINT_RACE in o]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert kills == KILLS, (f"the run finished after {kills} kills: too little work to kill, "
                            f"or a driver ended early; its output:\n{outputs[-2][-3000:]}")
    rows = results_rows(exp)
    assert sorted(float(r["config.lr_encoder"]) for r in rows) == lrs
    assert all(r["status"] == "TERMINATED" and r["stopped_early"] == "False"
               and r["epochs_done"] == str(epochs) for r in rows), rows
    for r in rows:  # every epoch logged once
        assert logged_epochs(r["trial_dir"]) == list(range(1, epochs + 1)), r["trial_dir"]
    print(f"\nkills {kills}, resumes {resumes}, trials {len(rows)}, epochs checked "
          f"{len(rows) * epochs}, failures 0; {kill_s:.0f} s killing, "
          f"{time.time() - t0:.0f} s in all")




@pytest.mark.slow
def test_ctrl_c_exits_130_counts_trials_truthfully_and_resume_completes(tmp_path):
    """SIGINT to the driver's process group (what Ctrl-C in a terminal sends) once two trials
    finished and one is under way: exit 130, finished / interrupted / not started counted as the
    trials' own files say, no result files written, poh_tune's --resume line (not Ray's
    Tuner.restore hint); --resume then completes every trial."""
    epochs, lrs = 12, [0.001, 0.002, 0.003, 0.004, 0.005, 0.006]
    space = tmp_path / "c.yaml"
    space.write_text(lr_grid(lrs, epochs=epochs, train_samples=128))
    exp = tmp_path / "c"
    common = ["--storage", str(tmp_path), "--name", "c", "--no-report", "--num-cpus", "2"]
    proc = launch_popen(["grid", str(space), *common])

    def two_done_one_running() -> bool:
        counts = [d.count(b"\n") for d in metrics_lines(exp).values()]
        return counts.count(epochs) >= 2 and any(0 < c <= epochs // 2 for c in counts)

    if not wait_for(two_done_one_running, proc):
        pytest.fail("the run ended before it could be interrupted:\n" + kill_session(proc)[-3000:])
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        pytest.fail("SIGINT did not end the run within 120 s:\n" + kill_session(proc)[-3000:])
    counts = [d.count(b"\n") for d in metrics_lines(exp).values()]
    finished = counts.count(epochs)
    partial = sum(0 < c < epochs for c in counts)
    assert proc.returncode == 130, out[-3000:]
    assert finished >= 2 and partial >= 1 and finished + partial < len(lrs), counts
    assert (f"interrupted: {finished} of {len(lrs)} trials finished, {partial} interrupted, "
            f"{len(lrs) - finished - partial} not started") in out, out[-3000:]
    assert f"--resume --name c --storage {tmp_path}" in out
    assert "Tuner.restore" not in out
    for f in ("results.csv", "best_config.yaml", "report.md"):
        assert not (exp / f).exists(), f

    p = subprocess.run([sys.executable, "-m", "poh_tune.launch", "grid", "--resume", *common],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = results_rows(exp)
    assert sorted(float(r["config.lr_encoder"]) for r in rows) == lrs
    assert all(r["status"] == "TERMINATED" and r["stopped_early"] == "False" for r in rows)
    for r in rows:
        assert logged_epochs(r["trial_dir"]) == list(range(1, epochs + 1))
    assert (exp / "best_config.yaml").exists()



@pytest.mark.slow
def test_cross_product_grid_killed_then_resumed_finishes_every_combination(tmp_path):
    """A packed cross-product grid (model x lr_encoder: two packs of two) killed mid-run, then
    --resume: every combination ends once, its epochs logged once, its experiment intact."""
    from test_launch import check_trial_dirs

    from tests.cli_runs import TINY_BASE

    epochs = 12
    space = tmp_path / "x.yaml"
    space.write_text(yaml.safe_dump({"name": "x", "base": {**TINY_BASE, "epochs": epochs,
                                                           "train_samples": 128},
                                     "experiments": {"m_lr": {"sweep": {
                                         "model": ["baseline", "pot"],
                                         "lr_encoder": [0.001, 0.002]}}}}))
    exp = tmp_path / "x"
    common = ["--storage", str(tmp_path), "--name", "x", "--no-report", "--num-cpus", "2"]
    proc = launch_popen(["grid", str(space), "--pack", "2", "--max-concurrent", "1", *common])

    def counts() -> list[int]:
        return [f.read_bytes().count(b"\n") for f in exp.glob("*/c*/metrics.jsonl")]

    if not wait_for(lambda: any(0 < c <= epochs // 2 for c in counts()), proc):
        pytest.fail("the run ended before it could be killed:\n" + kill_session(proc)[-3000:])
    kill_session(proc)
    assert not (exp / "results.csv").exists()
    p = subprocess.run([sys.executable, "-m", "poh_tune.launch", "grid", "--resume", *common],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = results_rows(exp)
    assert sorted((r["config.model"], float(r["config.lr_encoder"])) for r in rows) == [
        ("baseline", 0.001), ("baseline", 0.002), ("pot", 0.001), ("pot", 0.002)]
    assert all(r["status"] == "TERMINATED" for r in rows)
    assert len({r["pack_id"] for r in rows}) == 2  # two packs, each of one model
    check_trial_dirs(rows, epochs)
    for r in rows:
        assert yaml.safe_load(open(f"{r['trial_dir']}/poh_trial.yaml"))["experiments"] == ["m_lr"]
        assert logged_epochs(r["trial_dir"]) == list(range(1, epochs + 1))
