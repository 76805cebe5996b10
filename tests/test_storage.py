"""--storage as a URI: a grid run on an S3-compatible server on 127.0.0.1 (moto), its resume,
and storage that cannot be reached or written."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from poh_tune.storage import RemoteStorage, is_uri, snapshot
from tests.cli_runs import WRAPPER, free_port, kill_session, launch_popen, lr_grid

BUCKET = "poh-bucket"
# Dummy keys; no instance metadata lookup (169.254.169.254): nothing may leave loopback.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def s3_uri(port: int, path: str, bucket: str = BUCKET) -> str:
    return (f"s3://{bucket}/{path}?endpoint_override=127.0.0.1:{port}&scheme=http"
            f"&region=us-east-1")


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """moto's S3 server on 127.0.0.1, a bucket in it; stopped by its process id."""
    port = free_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        import pyarrow.fs

        fs, _ = pyarrow.fs.FileSystem.from_uri(s3_uri(port, "") + "&allow_bucket_creation=true")
        deadline = time.time() + 60
        while True:
            try:
                fs.create_dir(BUCKET)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
        yield port, fs
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def stored_files(fs, prefix: str) -> dict[str, int]:
    """Every object below bucket/prefix: relative path -> size."""
    import pyarrow.fs

    base = f"{BUCKET}/{prefix}"
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1:]: i.size for i in infos if i.type == pyarrow.fs.FileType.File}


def read(fs, path: str) -> bytes:
    with fs.open_input_stream(f"{BUCKET}/{path}") as f:
        return f.read()


def test_uris_and_local_paths_are_told_apart():
    assert is_uri("s3://b/x") and is_uri("gs://b/x") and is_uri("mock://x")
    assert not is_uri("runs") and not is_uri("/abs/runs") and not is_uri("file:///abs/runs")


def test_remote_storage_probe_download_and_upload_of_changes(s3, tmp_path):
    port, fs = s3
    remote = RemoteStorage(s3_uri(port, "root/sub"))
    assert remote.display == f"s3://{BUCKET}/root/sub" and remote.root == f"{BUCKET}/root/sub"
    remote.check_writable()
    assert stored_files(fs, "root/sub") == {}  # the probe file was removed
    local = tmp_path / "exp"
    (local / "t1").mkdir(parents=True)
    (local / "a.txt").write_text("a")
    (local / "t1" / "poh_trial.yaml").write_text("config: {}\n")
    assert remote.upload_changed(local, "exp", {}) == 2
    with fs.open_output_stream(f"{BUCKET}/root/sub/exp/t1/checkpoint_000000/trial.pt") as f:
        f.write(b"x" * 10)
    mirror = tmp_path / "mirror"
    before = remote.download("exp", mirror)
    assert sorted(before) == ["a.txt", "t1/poh_trial.yaml"]  # checkpoints are not downloaded
    assert snapshot(mirror) == before
    (mirror / "results.csv").write_text("trial_id\n")
    os.replace(mirror / "t1" / "poh_trial.yaml", mirror / "t1" / "poh_trial.lost.yaml")
    assert remote.upload_changed(mirror, "exp", before) == 2
    assert sorted(stored_files(fs, "root/sub/exp")) == [
        "a.txt", "results.csv", "t1/checkpoint_000000/trial.pt", "t1/poh_trial.lost.yaml"]


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**os.environ})


@pytest.mark.slow
def test_grid_on_s3_writes_every_file_there_and_nothing_here(s3, tmp_path):
    port, fs = s3
    (tmp_path / "g.yaml").write_text(lr_grid([0.001, 0.002], epochs=2))
    p = _run(["grid", "g.yaml", "--name", "s3run", "--num-cpus", "2", "--storage",
              s3_uri(port, "runs")], cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["g.yaml", "moto.log"]  # no s3: here
    files = stored_files(fs, "runs/s3run")
    for name in ("poh_experiment.yaml", "tuner.pkl", "results.csv", "best_config.yaml",
                 "report.md", "summary.csv"):
        assert name in files, (name, sorted(files))
    rows = list(csv.DictReader(io.StringIO(read(fs, "runs/s3run/results.csv").decode())))
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
    lrs = set()
    for r in rows:
        assert r["trial_dir"].startswith(f"s3://{BUCKET}/runs/s3run/"), r["trial_dir"]
        trial = r["trial_dir"][len(f"s3://{BUCKET}/"):]
        spec = yaml.safe_load(read(fs, f"{trial}/poh_trial.yaml"))
        assert spec["trial_id"] == r["trial_id"]
        lrs.add(spec["config"]["lr_encoder"])
        metrics = [json.loads(x) for x in read(fs, f"{trial}/metrics.jsonl").splitlines()]
        assert [m["epoch"] for m in metrics] == [1, 2]
        in_trial = {k for k in files if k.startswith(trial[len("runs/s3run/"):] + "/")}
        assert any("/tb/events.out.tfevents." in k for k in in_trial), in_trial
        assert any(k.endswith("/trial_state.pt") for k in in_trial), in_trial
    assert lrs == {0.001, 0.002}
    best = yaml.safe_load(read(fs, "runs/s3run/best_config.yaml"))
    assert best["lr_encoder"] in lrs and best["epochs"] == 2
    assert all(r["trial_id"] in read(fs, "runs/s3run/report.md").decode() for r in rows)
    assert f"s3://{BUCKET}/runs/s3run" in p.stdout


@pytest.mark.slow
def test_grid_on_s3_killed_then_resumed_logs_every_epoch_once(s3, tmp_path):
    port, fs = s3
    epochs = 4
    (tmp_path / "g.yaml").write_text(lr_grid([0.001, 0.002], epochs=epochs, train_samples=512))
    uri = s3_uri(port, "runs")
    args = ["grid", str(tmp_path / "g.yaml"), "--name", "r", "--num-cpus", "2", "--storage", uri,
            "--max-concurrent", "1"]
    proc = launch_popen(args)

    def some_epochs_stored() -> bool:
        files = stored_files(fs, "runs/r")
        return "tuner.pkl" in files and any(k.endswith("metrics.jsonl") for k in files)

    deadline = time.time() + 240
    while not some_epochs_stored() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    out = kill_session(proc)
    assert some_epochs_stored(), out[-3000:]
    p = _run(["grid", "--resume", "--name", "r", "--storage", uri], cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(read(fs, "runs/r/results.csv").decode())))
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
    for r in rows:
        trial = r["trial_dir"][len(f"s3://{BUCKET}/"):]
        metrics = [json.loads(x) for x in read(fs, f"{trial}/metrics.jsonl").splitlines()]
        assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1)), trial


@pytest.mark.parametrize("case", ["unreachable", "no_bucket", "bad_scheme", "optuna"])
def test_storage_that_cannot_be_used_exits_2_naming_it_before_ray(s3, tmp_path, case):
    port, _ = s3
    (tmp_path / "g.yaml").write_text(lr_grid([0.001]))
    storage = {"unreachable": s3_uri(free_port(), "runs"),
               "no_bucket": s3_uri(port, "runs", bucket="no-such-bucket"),
               "bad_scheme": "nosuchfs://host/runs", "optuna": s3_uri(port, "runs")}[case]
    argv = (["optuna", "--smoke"] if case == "optuna" else ["grid", "g.yaml"])
    p = _run([*argv, "--storage", storage], cwd=tmp_path, timeout=120)
    err = p.stderr.strip()
    assert p.returncode == 2, (p.stdout, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert f"--storage {storage}" in err
    assert {"unreachable": "cannot write", "no_bucket": "cannot write",
            "bad_scheme": "not a storage URI", "optuna": "SQLite"}[case] in err, err
    assert "NO_RAY" in p.stdout and "Traceback" not in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["g.yaml", "moto.log"]
