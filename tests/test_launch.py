"""`python -m poh_tune.launch` end to end on a real local Ray (loopback only): grid, optuna, resume, --address."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from poh_tune.config import load_config
from tests.cli_runs import kill_session

TB_TAGS = ("tau/dev", "tau/dev_all_pairs", "tau/iter_01", "entropy/iter_01", "loss/train",
           "loss/train_rank", "schedule/temperature", "schedule/entropy_weight")


def launch(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "poh_tune.launch", *args],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:], (e.stderr or b"")[-3000:]
        raise AssertionError(f"launch {args} timed out after {timeout} s: {out}") from None


def rows_of(exp_dir: Path) -> list[dict]:
    with open(exp_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def epochs_of(trial_dir: str | Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in open(Path(trial_dir) / "metrics.jsonl")]


def tb(trial_dir: str | Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(Path(trial_dir) / "tb"), purge_orphaned_data=False)
    ea.Reload()
    return ea


def check_trial_dirs(rows: list[dict], epochs: int) -> None:
    """Every epoch logged once, τ of every inner iteration, scalars and HParams in TensorBoard."""
    for r in rows:
        assert epochs_of(r["trial_dir"]) == list(range(1, epochs + 1))
        cfg = yaml.safe_load(open(Path(r["trial_dir"]) / "poh_trial.yaml"))["config"]
        n_iters = 1 if cfg["model"] == "baseline" else cfg["max_inner_iters"]
        for line in open(Path(r["trial_dir"]) / "metrics.jsonl"):
            m = json.loads(line)
            assert len(m["tau_iter"]) == n_iters, m["epoch"]
        ea = tb(r["trial_dir"])
        tags = set(ea.Tags()["scalars"])
        assert set(TB_TAGS) - ({"entropy/iter_01"} if cfg["model"] == "baseline" else set()) <= tags
        assert [e.step for e in ea.Scalars("tau/dev")] == list(range(1, epochs + 1))
        hp = ea.PluginTagToContent("hparams")  # the experiment is the run directory's own
        assert "_hparams_/session_start_info" in hp and "_hparams_/session_end_info" in hp


@pytest.mark.slow
def test_grid_smoke(tmp_path):
    p = launch("grid", "--smoke", "--experiment", "iterations", "--storage", str(tmp_path),
               "--name", "g", "--no-report")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    exp = tmp_path / "g"
    assert f"tensorboard --logdir {exp}" in p.stdout
    rows = rows_of(exp)
    assert len(rows) == 4
    assert all(r["status"] == "TERMINATED" and r["stopped_early"] == "False" for r in rows)
    assert all(r["experiments"] == "iterations" for r in rows)
    assert sorted(int(r["config.max_inner_iters"]) for r in rows) == [1, 2, 3, 4]
    check_trial_dirs(rows, 3)
    info = yaml.safe_load(open(exp / "poh_experiment.yaml"))
    assert info["mode"] == "grid" and info["metric"] == "tau" and info["metric_mode"] == "max"
    assert info["experiments"] == {"iterations": {"swept": "max_inner_iters",
                                                  "description": info["experiments"]
                                                  ["iterations"]["description"]}}
    assert load_config(exp / "best_config.yaml").epochs == 3


@pytest.mark.slow
def test_optuna_smoke_asha_prunes(tmp_path):
    import optuna

    p = launch("optuna", "--smoke", "--num-samples", "8", "--storage", str(tmp_path),
               "--name", "o", "--no-report")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    exp = tmp_path / "o"
    rows = rows_of(exp)
    assert len(rows) == 8 and all(r["status"] == "TERMINATED" for r in rows)
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped, "ASHA stopped no trial"
    study = optuna.load_study(study_name="o", storage=f"sqlite:///{exp / 'optuna_study.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == len(stopped)
    assert states.count(optuna.trial.TrialState.COMPLETE) == 8 - len(stopped)
    for t in study.trials:
        if t.state == optuna.trial.TrialState.PRUNED:
            assert t.user_attrs["stopped_at_epoch"] < 3
            assert max(t.intermediate_values) == t.user_attrs["stopped_at_epoch"]
    best = load_config(exp / "best_config.yaml")
    assert best.array_len == 8
    assert (exp / "poh_experiment.yaml").exists()
    # Each Optuna trial names its Tune trial; poh_tune's best is Optuna's best (ties included:
    # smoke trials often tie on τ).
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == sorted(
        r["trial_id"] for r in rows)
    assert {k: getattr(best, k) for k in study.best_trial.params} == study.best_trial.params


@pytest.mark.slow
def test_driver_killed_then_resumed(tmp_path):
    """SIGKILL the driver (and its embedded Ray) after two trials finished; --resume completes."""
    import optuna

    args = ["optuna", "--smoke", "--num-samples", "6", "--scheduler", "fifo", "--storage",
            str(tmp_path), "--name", "r", "--no-report", "epochs=4"]
    proc = subprocess.Popen([sys.executable, "-m", "poh_tune.launch", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    exp = tmp_path / "r"
    finished: dict[Path, bytes] = {}
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            finished = {}
            for f in exp.glob("train_trial_*/metrics.jsonl"):
                data = f.read_bytes()
                if data.count(b"\n") == 4:
                    finished[f] = data
            if len(finished) >= 2:
                break
            time.sleep(0.5)
    finally:
        kill_session(proc)  # the driver and the Ray processes it started
    assert len(finished) >= 2, "the run ended before it could be killed"
    assert not (exp / "results.csv").exists()

    p = launch("optuna", "--resume", "--name", "r", "--storage", str(tmp_path), "--no-report")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = rows_of(exp)
    assert len(rows) == 6
    assert all(r["status"] == "TERMINATED" and r["stopped_early"] == "False" for r in rows)
    check_trial_dirs(rows, 4)
    for f, data in finished.items():  # finished trials were not rerun
        assert f.read_bytes() == data
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{exp / 'optuna_study.db'}")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == len(params)  # no configuration evaluated twice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_address_joins_a_separately_started_head(tmp_path):
    ray_cli = shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray CLI is not installed")
    port = _free_port()
    # A private Ray temp dir (short: Ray's socket paths): `ray start` records the head in
    # <temp dir>/ray/ray_current_cluster and a stopped head leaves that file behind; in the
    # shared /tmp/ray it would send every later `--address auto` on this machine to a dead head.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(ray_tmp)}
    # --block keeps the head's processes children of this one process: stopping it stops them
    # (`ray stop` would also stop every other Ray on this machine).
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2",
                             "--include-dashboard=false", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        p = launch("grid", "--smoke", "--experiment", "baseline_vs_hrm", "--address",
                   f"127.0.0.1:{port}", "--storage", str(tmp_path), "--name", "a", "--no-report",
                   env={"RAY_AUTH_MODE": "token", "RAY_TMPDIR": str(ray_tmp)}, timeout=150)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        rows = rows_of(tmp_path / "a")
        assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
        # The head recorded itself in the private temp dir, not in the shared one.
        assert (ray_tmp / "ray" / "ray_current_cluster").read_text().strip() == f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(ray_tmp, ignore_errors=True)  # the address file goes with it


def test_trial_larger_than_every_node_is_an_error_not_a_hang(tmp_path):
    """The embedded Ray cannot grow: a per-trial share no node holds would wait forever."""
    p = launch("grid", "--smoke", "--gpus-per-trial", "1", "--storage", str(tmp_path / "runs"),
               timeout=120)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "--gpus-per-trial=1" in p.stderr and "0 GPU" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists()  # nothing written
