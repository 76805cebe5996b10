"""A real smoke grid read back by a real `tensorboard` server on 127.0.0.1, and its progress lines."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from poh_tune.config import TrialConfig

SWEPT = {"model": ["baseline", "pot"], "hrm_period": [1, 2, 3]}  # --smoke ranks 3, 4, 6 -> 1, 2, 3
N_TRIALS = 4  # baseline, pot (hrm_period 2), pot hrm_period 1 and 3
EPOCHS = 3


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray on loopback only
    p = subprocess.run([sys.executable, "-m", "poh_tune.launch", "grid", "--smoke",
                        "--experiment", "baseline_vs_hrm", "--experiment", "hrm_period",
                        "--storage", str(root), "--name", "tb", "--num-cpus", "2",
                        "--progress-every", "1", "--no-report"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root / "tb", p.stdout + p.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"X-XSRF-Protected": "1",
                                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def tensorboard(smoke):
    exp_dir, _ = smoke
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(exp_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false",
                             "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:  # up, and every trial's run loaded
                if len(_get(f"{base}/data/plugin/scalars/tags")) >= N_TRIALS:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "tensorboard did not serve the runs in 120 s"
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_scalar_tags_are_grouped(tensorboard):
    tags = _get(f"{tensorboard}/data/plugin/scalars/tags")
    trial_runs = {run: t for run, t in tags.items() if run.endswith("/tb")}
    assert len(trial_runs) == N_TRIALS
    for run, t in trial_runs.items():
        groups = {tag.split("/")[0] for tag in t}
        assert all("/" in tag for tag in t), run
        assert len(groups) <= 15, (run, groups)
        assert {"tau", "loss", "schedule", "trial"} <= groups, (run, groups)
        assert {"tau/dev", "tau/test", "loss/train", "trial/epochs_done",
                "trial/stopped_early"} <= set(t)
        assert not [tag for tag in t if tag.startswith("ray/")]  # Ray's own logger is off
        iters = sorted(tag for tag in t if tag.startswith("tau/iter_"))
        if iters != ["tau/iter_01"]:  # a PoH trial: iterations 1..n, zero-padded
            assert "routing/herfindahl" in t and "entropy/iter_01" in t
        assert iters == [f"tau/iter_{k:02d}" for k in range(1, len(iters) + 1)]
    run = next(iter(trial_runs))
    series = _get(f"{tensorboard}/data/plugin/scalars/scalars?run={run}&tag=tau/dev")
    assert [step for _, step, _ in series] == list(range(1, EPOCHS + 1))


@pytest.mark.slow
def test_hparams_experiment_lists_the_swept_ones_with_domains(tensorboard):
    exp = _get(f"{tensorboard}/data/plugin/hparams/experiment", {"experimentName": ""})
    infos = {h["name"]: h for h in exp["hparamInfos"]}
    assert {k for k, h in infos.items() if h.get("differs")} == set(SWEPT)
    assert [h["name"] for h in exp["hparamInfos"]][:2] == sorted(SWEPT)  # differing ones first
    assert infos["model"]["domainDiscrete"] == SWEPT["model"]
    assert infos["model"]["type"] == "DATA_TYPE_STRING"
    assert infos["hrm_period"]["domainDiscrete"] == SWEPT["hrm_period"]
    assert infos["hrm_period"]["type"] == "DATA_TYPE_FLOAT64"
    # Every other hyperparameter is listed, constant, with its type.
    assert set(TrialConfig.__dataclass_fields__) | {"n_seeds"} == set(infos)
    assert infos["diagnostics"]["type"] == "DATA_TYPE_BOOL"
    assert infos["n_seeds"]["domainDiscrete"] == [2]
    metrics = {m["name"]["tag"] for m in exp["metricInfos"]}
    assert {"tau/dev", "tau/test", "trial/epochs_done", "trial/stopped_early"} <= metrics

    groups = _get(f"{tensorboard}/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 100,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"],
        "colParams": [{"hparam": k} for k in SWEPT] + [{"metric": {"tag": "trial/stopped_early"}}]})
    sessions = [s for g in groups["sessionGroups"] for s in g["sessions"]]
    assert len(sessions) == N_TRIALS
    assert all(s["status"] == "STATUS_SUCCESS" for s in sessions)
    seen = {(g["hparams"]["model"], g["hparams"]["hrm_period"]) for g in groups["sessionGroups"]}
    assert seen == {("baseline", 2), ("pot", 1), ("pot", 2), ("pot", 3)}
    for g in groups["sessionGroups"]:  # a fifo grid stops nothing early
        values = {m["name"]["tag"]: m["value"] for m in g["metricValues"]}
        assert values["trial/stopped_early"] == 0


@pytest.mark.slow
def test_progress_lines_on_a_smoke_run(smoke):
    exp_dir, out = smoke
    assert "Result logdir" not in out and "== Status ==" not in out
    assert "Token authentication" not in out
    pat = re.compile(r"^\[(\d+):(\d\d):(\d\d)\] trials (\d+) done, (\d+) running, (\d+) waiting "
                     r"\(of (\d+)\) \| epochs (\d+)/(\d+) \| (?:([\d.]+) s/epoch \| )?"
                     r"ETA (.+?)(?: \| best tau [\d.-]+ \(\w+\))? \| (.+)$")
    lines = [m for line in out.splitlines() if (m := pat.match(line))]
    assert len(lines) >= 3, out[-3000:]
    for m in lines:
        done, running, waiting, total = (int(m[i]) for i in (4, 5, 6, 7))
        assert done + running + waiting == total == N_TRIALS
        assert 0 <= int(m[8]) <= int(m[9]) == N_TRIALS * EPOCHS  # fifo: every epoch runs
        assert Path(m[12]) == exp_dir
        if m[10] is not None and int(m[8]) < int(m[9]):
            # The epochs left at the measured pace, one or two trials at a time (2 CPUs).
            h, mi, sec = map(int, m[11].split(":"))
            work = (int(m[9]) - int(m[8])) * float(m[10])
            assert work / 2 - 1 <= 3600 * h + 60 * mi + sec <= work + 1, m[0]
        elif int(m[8]) == 0:
            assert m[11] == "after the first epoch"
    last = lines[-1]
    assert (int(last[4]), int(last[8])) == (N_TRIALS, N_TRIALS * EPOCHS) and last[11] == "0:00:00"
    assert any(m[10] is not None and 0 < int(m[8]) < int(m[9]) for m in lines)  # an ETA mid-run
