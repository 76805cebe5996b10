"""Faults on an embedded Ray: a diverged trial errors alone, crashed trials resume to the
uninterrupted metrics, and the embedded Ray listens on loopback only."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.cli_runs import (
    launch_popen,
    logged_epochs,
    lr_grid,
    results_rows,
)


def _session_pids(sid: int) -> set[int]:
    """Every process in session `sid` (the driver started with start_new_session, and Ray's)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            if int(fields[3]) == sid:  # state, ppid, pgrp, session
                pids.add(int(d.name))
    return pids


def _listeners(pids: set[int]) -> set[tuple[str, str]]:
    """(local address, process name) of every listening TCP socket owned by one of `pids`."""
    out = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        cols = line.split()
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                found.add((cols[3], name))
    return found


FAULT_LRS = [0.001, 0.002, 1e6]  # lr_encoder 1e6 makes the tiny task's loss NaN at epoch 2
CRASH_EPOCH = 1


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    """One real grid: every trial's process dies once after epoch 1 (retried from its
    checkpoint), one trial diverges; the driver's and Ray's listening sockets are sampled."""
    if not shutil.which("ss"):
        pytest.skip("ss (iproute2) is not installed")
    tmp = tmp_path_factory.mktemp("faults")
    space = tmp / "faults.yaml"
    space.write_text(lr_grid(FAULT_LRS, epochs=3))
    t0 = time.time()
    proc = launch_popen(["grid", str(space), "--storage", str(tmp), "--name", "f",
                          "--no-report", "--num-cpus", "2", "--max-failures", "2"],
                         env={"POH_TUNE_CRASH_AFTER_EPOCH": str(CRASH_EPOCH)})
    listeners: set[tuple[str, str]] = set()
    try:
        while proc.poll() is None and time.time() - t0 < 300:
            listeners |= _listeners(_session_pids(proc.pid))
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    return {"exp": tmp / "f", "rc": proc.returncode, "out": out, "listeners": listeners,
            "wall_s": time.time() - t0}


@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only(fault_run):
    listeners = fault_run["listeners"]
    names = {n for _, n in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # the sampling saw the run
    for addr, name in listeners:
        host = addr.rsplit(":", 1)[0].strip("[]").split("%")[0]
        assert host not in ("*", "0.0.0.0", "::"), f"{name} listens on all interfaces: {addr}"
        ip = ipaddress.ip_address(host)
        ip = getattr(ip, "ipv4_mapped", None) or ip  # [::ffff:127.0.0.1] is loopback too
        assert ip.is_loopback, f"{name} listens on {addr}"  # never 0.0.0.0, [::] or *


@pytest.mark.slow
def test_diverged_trial_errors_with_seed_and_epoch_the_rest_complete(fault_run):
    exp = fault_run["exp"]
    assert fault_run["rc"] == 1, fault_run["out"][-3000:]  # 1: a trial errored
    rows = {float(r["config.lr_encoder"]): r for r in results_rows(exp)}
    assert sorted(rows) == sorted(FAULT_LRS)
    bad = rows[1e6]
    assert bad["status"] == "ERROR"
    assert "seed 1, epoch 2: training loss is nan" in bad["error"], bad["error"]
    assert logged_epochs(bad["trial_dir"]) == [1]
    # Recorded once; Ray's retries re-raise it instead of training the epoch again.
    diverged = (Path(bad["trial_dir"]) / ".diverged").read_text()
    assert diverged.strip() == "seed 1, epoch 2: training loss is nan"
    for lr in FAULT_LRS[:2]:
        assert rows[lr]["status"] == "TERMINATED" and rows[lr]["error"] == ""
    assert "errored: " in fault_run["out"]


@pytest.mark.slow
def test_crashed_trials_resume_from_checkpoint_and_match_an_uninterrupted_run(fault_run):
    import torch

    from poh_tune.config import from_dict
    from poh_tune.trainer import TrialRunner

    exp = fault_run["exp"]
    rows = [r for r in results_rows(exp) if r["status"] == "TERMINATED"]
    assert len(rows) == 2
    torch.set_num_threads(1)
    for r in rows:
        trial_dir = Path(r["trial_dir"])
        assert (trial_dir / ".crashed").exists()  # its process did die after epoch 1
        got = [json.loads(x) for x in open(trial_dir / "metrics.jsonl")]
        assert [m["epoch"] for m in got] == [1, 2, 3]  # each epoch logged once
        cfg = from_dict(yaml.safe_load(open(trial_dir / "poh_trial.yaml"))["config"])
        runner = TrialRunner(cfg, "cpu")
        want = [runner.run_epoch() for _ in range(cfg.epochs)]
        for g, w in zip(got, want, strict=True):
            for k in ("tau", "tau_all", "train_loss", "best_tau", "test_tau"):
                assert g[k] == pytest.approx(w[k], abs=1e-6), (k, g["epoch"])
    # Faults injected: one process death per trial (3) and one divergence; all contained.
    assert sum((Path(r["trial_dir"]) / ".crashed").exists() for r in results_rows(exp)) == 3

