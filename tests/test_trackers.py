"""MLflow and W&B runs of a real tiny grid (a pack included) and Optuna search, read back from a
real MLflow server on 127.0.0.1 and from W&B's offline run files, against each run's metrics.jsonl."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from poh_tune.record import flat
from tests.cli_runs import OPTUNA, WRAPPER, dump, free_port, lr_grid, results_rows

LRS = [0.001, 0.002, 0.003]  # with --pack 2: one pack of two and one trial of its own
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def start_mlflow(root: Path, port: int) -> subprocess.Popen:
    """A real tracking server on 127.0.0.1 (uvicorn and workers in its own process group)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--default-artifact-root", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_mlflow(proc)
            pytest.fail("the MLflow server did not answer /health within 90 s")
        time.sleep(0.5)


def stop_mlflow(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group of the server this test started
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = start_mlflow(tmp_path, port)
    yield f"http://127.0.0.1:{port}", proc, tmp_path, port
    stop_mlflow(proc)


def launch(args: list[str], env: dict | None = None, timeout: float = 400):
    return subprocess.run([sys.executable, "-m", "poh_tune.launch", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **RAY_ENV, **(env or {})})


def wandb_records(path: Path) -> list:
    """The Record messages of a W&B .wandb file: a 7-byte ":W&B" header, then a LevelDB log
    (32 KiB blocks; each record a 7-byte header, crc32 / length / type, then its bytes; a message
    larger than a block's rest is split FIRST / MIDDLE / LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # zero padding to the block's end
            pos += left - 7
            continue
        chunk, pos = data[pos:pos + n], pos + n
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
    return out


def expected_metrics(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Key -> [(epoch, value)]: every finite number of every epoch's record, flat keys."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for k, v in flat(row).items():
            if k != "epoch" and isinstance(v, (bool, int, float)) and v == v \
                    and abs(v) != float("inf"):
                out.setdefault(k, []).append((int(row["epoch"]), float(v)))
    return out


def configurations(exp_dir: Path) -> list[tuple[Path, dict, list[dict]]]:
    """(folder, poh_trial.yaml, metrics.jsonl rows) of every configuration in results.csv."""
    out = []
    for r in results_rows(exp_dir):
        folder = Path(r["trial_dir"])
        spec = yaml.safe_load((folder / "poh_trial.yaml").read_text())
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        out.append((folder, spec, rows))
    return out


def mlflow_runs(uri: str, experiment: str) -> dict[str, object]:
    """trial id -> MLflow run, of the experiment named after the poh_tune run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return {r.data.tags["poh_tune.trial_id"]: r for r in client.search_runs([exp.experiment_id])}


def mlflow_history(uri: str, run) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}


def test_a_missing_extra_is_one_line_before_ray(tmp_path):
    """mlflow / wandb unimportable (as on a machine without the extra): exit 2, one line."""
    for module, flag, value in (("mlflow", "--mlflow", "http://127.0.0.1:9"),
                                ("wandb", "--wandb", "proj")):
        space = tmp_path / "grid.yaml"
        space.write_text(lr_grid(LRS[:1]))
        blocked = f"import sys\nsys.modules[{module!r}] = None\n" + WRAPPER
        p = subprocess.run([sys.executable, "-c", blocked, "grid", str(space), "--storage",
                            str(tmp_path / "runs"), flag, value], capture_output=True, text=True,
                           timeout=120, env={**os.environ, **RAY_ENV})
        assert p.returncode == 2, p.stdout + p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, p.stderr
        assert lines[0].startswith(f"error: {flag} needs the {module} package")
        assert f"pip install 'poh_tune[{module}]'" in lines[0]
        assert p.stdout.strip().splitlines()[-1] == "NO_RAY"
        assert not (tmp_path / "runs").exists()


def test_an_mlflow_server_that_does_not_answer_at_start_is_one_line_before_ray(tmp_path):
    space = tmp_path / "grid.yaml"
    space.write_text(lr_grid(LRS[:1]))
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    p = subprocess.run([sys.executable, "-c", WRAPPER, "grid", str(space), "--storage",
                        str(tmp_path / "runs"), "--mlflow", uri], capture_output=True, text=True,
                       timeout=180, env={**os.environ, **RAY_ENV})
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --mlflow {uri}: cannot use"), p.stderr
    assert p.stdout.strip().splitlines()[-1] == "NO_RAY"


@pytest.mark.slow
def test_grid_with_a_pack_logs_every_configuration_to_mlflow_and_wandb(mlflow_server, tmp_path):
    uri = mlflow_server[0]
    space = tmp_path / "grid.yaml"
    space.write_text(lr_grid(LRS, epochs=3))
    p = launch(["grid", str(space), "--storage", str(tmp_path / "runs"), "--name", "trk",
                "--num-cpus", "2", "--pack", "2", "--no-report", "--mlflow", uri,
                "--wandb", "poh-test"], env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not [x for x in p.stderr.splitlines()
                if x.startswith(("warning: MLflow", "warning: W&B"))], p.stderr[-3000:]
    confs = configurations(tmp_path / "runs" / "trk")
    assert len(confs) == len(LRS)
    assert sum(bool(spec.get("pack_id")) for _, spec, _ in confs) == 2  # the pack's members
    runs = mlflow_runs(uri, "trk")
    assert sorted(runs) == sorted(spec["trial_id"] for _, spec, _ in confs)
    for folder, spec, rows in confs:
        cfg, tid = spec["config"], spec["trial_id"]
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        want = expected_metrics(rows)
        for part in ("tau", "tau_all", "tau_iter_0", "herfindahl", "max_alpha", "temperature",
                     "entropy_weight", "train_loss"):  # τ, per iteration, routing, schedule, loss
            assert part in want
        run = runs[tid]
        name = run.info.run_name
        assert name.split(" ")[0] == tid and f"lr_encoder={cfg['lr_encoder']:g}" in name
        assert run.info.status == "FINISHED"
        assert run.data.tags.get("poh_tune.pack_id", "") == str(spec.get("pack_id", ""))
        for k, v in cfg.items():  # every hyperparameter, as its text
            if isinstance(v, list):
                assert run.data.params[k] == ",".join(map(str, v))
            elif v is not None:
                assert run.data.params[k] == str(v), k
        assert mlflow_history(uri, run) == want

        # W&B: one offline run in the configuration's folder, the same record.
        files = list(folder.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) == 1, files
        recs = wandb_records(files[0])
        kinds = [r.WhichOneof("record_type") for r in recs]
        run_rec = recs[kinds.index("run")].run
        assert run_rec.display_name == name and run_rec.project == "poh-test"
        assert run_rec.run_id == json.loads((folder / "trackers.json").read_text())["wandb"]
        assert run_rec.run_group == "trk"
        config = {u.key: json.loads(u.value_json) for u in run_rec.config.update}
        for r in recs:
            if r.WhichOneof("record_type") == "config":
                config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        assert {k: config[k] for k in cfg} == cfg
        history: dict[str, list[tuple[int, float]]] = {}
        for r in recs:
            if r.WhichOneof("record_type") == "history":
                items = {i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json)
                         for i in r.history.item}
                for k, v in items.items():
                    if not k.startswith("_"):
                        history.setdefault(k, []).append((int(items["_step"]), float(v)))
        assert history == want
        exits = [r.exit for r in recs if r.WhichOneof("record_type") == "exit"]
        assert len(exits) == 1 and exits[0].exit_code == 0
        status = [json.loads(u.value_json) for r in recs
                  if r.WhichOneof("record_type") == "summary"
                  for u in r.summary.update if (u.key or "/".join(u.nested_key)) == "poh_status"]
        assert status == ["FINISHED"]


@pytest.mark.slow
def test_optuna_with_asha_closes_each_mlflow_run_with_how_it_ended(mlflow_server, tmp_path):
    uri = mlflow_server[0]
    d = {**OPTUNA, "num_samples": 5, "scheduler": "asha", "max_concurrent": 2,
         "asha": {"grace_period": 1, "reduction_factor": 2},
         "base": {**OPTUNA["base"], "epochs": 3, "array_len": 8, "train_samples": 64,
                  "dev_samples": 32},
         "search": {"lr_encoder": {"type": "loguniform", "low": 1e-5, "high": 0.1}}}
    space = tmp_path / "optuna.yaml"
    space.write_text(dump(d))
    p = launch(["optuna", str(space), "--storage", str(tmp_path / "runs"), "--name", "opt",
                "--num-cpus", "2", "--no-report", "--mlflow", uri])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["trial_id"]: r for r in results_rows(tmp_path / "runs" / "opt")}
    runs = mlflow_runs(uri, "opt")
    assert sorted(runs) == sorted(rows)
    want = {t: "KILLED" if r["stopped_early"] == "True" else "FINISHED" for t, r in rows.items()}
    assert {t: r.info.status for t, r in runs.items()} == want
    assert set(want.values()) == {"KILLED", "FINISHED"}, "ASHA stopped none (or all) of them"
    for t, r in runs.items():
        assert r.info.run_name.startswith(f"{t} lr_encoder=")
        assert [s for s, _ in mlflow_history(uri, r)["tau"]] == \
            list(range(1, int(rows[t]["epochs_done"]) + 1))


@pytest.mark.slow
def test_an_mlflow_server_lost_mid_run_warns_once_and_training_goes_on(mlflow_server, tmp_path):
    uri, proc, root, port = mlflow_server
    epochs = 25
    space = tmp_path / "grid.yaml"
    space.write_text(lr_grid(LRS[:2], epochs=epochs, train_samples=256, array_len=8))
    exp = tmp_path / "runs" / "lost"
    run = subprocess.Popen(
        [sys.executable, "-m", "poh_tune.launch", "grid", str(space), "--storage",
         str(tmp_path / "runs"), "--name", "lost", "--num-cpus", "2", "--no-report",
         "--mlflow", uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **RAY_ENV}, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not any(len(f.read_text().splitlines()) >= 2
                      for f in exp.glob("*/metrics.jsonl")):
            assert run.poll() is None and time.time() < deadline, "no epoch logged"
            time.sleep(0.05)
        stop_mlflow(proc, signal.SIGKILL)  # gone mid-run
        out, err = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    assert run.returncode == 0, out[-3000:] + err[-3000:]
    assert len([x for x in err.splitlines() if x.startswith("warning: MLflow")]) == 1, err
    confs = configurations(exp)
    warned = 0
    for folder, _spec, rows in confs:
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))  # training went on
        w = folder / "tracker_warnings.txt"
        lines = w.read_text().splitlines() if w.exists() else []
        assert len(lines) <= 1
        warned += len(lines)
    assert warned >= 1
    # What reached the server before it went is a prefix of each configuration's epochs.
    again = start_mlflow(root, port)
    try:
        runs = mlflow_runs(uri, "lost")
        for _folder, spec, rows in confs:
            if spec["trial_id"] not in runs:  # its run never started: the server had gone
                continue
            got = mlflow_history(uri, runs[spec["trial_id"]]).get("tau", [])
            assert got == expected_metrics(rows)["tau"][:len(got)]
        assert any(len(mlflow_history(uri, r).get("tau", [])) < epochs for r in runs.values())
    finally:
        stop_mlflow(again)
