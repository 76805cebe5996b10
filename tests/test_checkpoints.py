"""Tune checkpoints of real runs: the best checkpoint loads into a model that reproduces the
reported τ, num_to_keep keeps the best, restarts start afresh, a deleted checkpoint falls back to
the state file, and the snippets of docs/plain-ray.md run as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poh_tune.checkpoints import choose_state, load_trial
from poh_tune.io import read_metrics
from poh_tune.trainer import TrialRunner
from tests.cli_runs import launch_popen, lr_grid

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plain-ray.md"
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


def grid_run(tmp: Path, name: str, lrs: list[float], *args: str, env: dict | None = None,
             **base) -> tuple[Path, int, str]:
    space = tmp / f"{name}.yaml"
    space.write_text(lr_grid(lrs, **base))
    proc = launch_popen(["grid", str(space), "--storage", str(tmp), "--name", name,
                         "--no-report", "--num-cpus", "2", *args], env=env)
    out = proc.communicate(timeout=300)[0]
    return tmp / name, proc.returncode, out


def python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **RAY_ENV})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def checkpoint_epochs(trial_dir: Path) -> dict[str, int]:
    """checkpoint folder name -> the epoch its trial.pt holds."""
    return {d.name: int(torch.load(d / "trial.pt", weights_only=True)["epoch"])
            for d in sorted(trial_dir.glob("checkpoint_*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny grid: 2 configurations, 5 epochs, the 2 best checkpoints kept."""
    tmp = tmp_path_factory.mktemp("ckpt")
    exp, rc, out = grid_run(tmp, "g", [0.001, 0.003], "--keep-checkpoints", "2", epochs=5,
                            train_samples=32, dev_samples=24, test_samples=24)
    assert rc == 0, out[-3000:]
    return exp


@pytest.mark.slow
def test_num_to_keep_keeps_the_best_epochs_and_the_newest(finished):
    trials = sorted(finished.glob("train_trial_*"))
    assert len(trials) == 2
    for t in trials:
        rows = {r["epoch"]: r for r in read_metrics(t / "metrics.jsonl")}
        kept = set(checkpoint_epochs(t).values())
        assert 5 in kept and 2 <= len(kept) <= 3, kept  # the newest, and the 2 best
        best_kept = [e for e in kept if e != 5] or [5]
        deleted = set(rows) - kept
        # Every deleted epoch scores no better than the kept ones it lost to.
        assert all(rows[d]["tau"] <= min(rows[e]["tau"] for e in best_kept) for d in deleted), (
            rows, kept)
        # training_iteration is the epoch in Tune's own result.json.
        its = [(json.loads(x)["training_iteration"], json.loads(x)["epoch"])
               for x in open(t / "result.json")]
        assert its and all(i == e for i, e in its)


@pytest.mark.slow
def test_best_checkpoint_reproduces_the_reported_tau(finished):
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(finished))
    for trial in analysis.trials:
        ckpt = analysis.get_best_checkpoint(trial, metric="tau", mode="max")
        assert ckpt is not None
        rows = {r["epoch"]: r for r in read_metrics(Path(trial.path) / "metrics.jsonl")}
        loaded = load_trial(ckpt)
        kept = checkpoint_epochs(Path(trial.path))
        # The best by dev τ among the kept checkpoints (ties: any of the equal ones).
        assert rows[loaded.epoch]["tau"] == max(rows[e]["tau"] for e in kept.values())
        dev = loaded.evaluate("dev")[0]
        assert dev["tau"] == pytest.approx(rows[loaded.epoch]["tau"], abs=1e-6)
        assert dev["tau_all"] == pytest.approx(rows[loaded.epoch]["tau_all"], abs=1e-6)
        if rows[loaded.epoch]["best_epoch"] == loaded.epoch:  # its test τ was measured then
            test = loaded.evaluate("test")[0]
            assert test["tau"] == pytest.approx(rows[loaded.epoch]["test_tau"], abs=1e-6)


def _snippets() -> tuple[list[str], list[str]]:
    """docs/plain-ray.md's python blocks: those that say Ray only, and all of them in order."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 3
    return [b for b in blocks if "poh_tune need not be importable" in b], blocks


@pytest.mark.slow
def test_plain_ray_snippets_run_as_documented(finished):
    ray_only, blocks = _snippets()
    assert ray_only
    pre = f"exp_dir = {str(finished)!r}\n"
    # Ray-only blocks with poh_tune made unimportable.
    block_import = "import sys\nsys.modules['poh_tune'] = None\n"
    p = python(block_import + pre + "\n".join(ray_only) + "\nprint('BEST', best_trial.path)\n")
    best_path = re.search(r"BEST (\S+)", p.stdout).group(1)
    check = ("import json\nprint('OUT', json.dumps({'n': len(df), 'last': [r.checkpoint is not "
             "None for r in results], 'epoch': trial.epoch, 'dev': dev[0]['tau'], 'best': "
             "best_trial.path, 'last_epoch': poh_tune.load_trial(last_ckpt).epoch, "
             "'df_tau': sorted(df['tau'])}))\n")
    p = python(pre + "\n".join(blocks) + "\n" + check)
    out = json.loads(p.stdout.split("OUT ", 1)[1])
    trials = sorted(finished.glob("train_trial_*"))
    assert out["n"] == len(trials) and all(out["last"]) and out["last_epoch"] == 5
    assert out["best"] == best_path
    rows = {r["epoch"]: r for r in read_metrics(Path(best_path) / "metrics.jsonl")}
    assert out["dev"] == pytest.approx(rows[out["epoch"]]["tau"], abs=1e-6)
    final = sorted(read_metrics(t / "metrics.jsonl")[-1]["tau"] for t in trials)
    assert out["df_tau"] == pytest.approx(final)


@pytest.mark.slow
def test_pack_checkpoint_loads_every_configuration(tmp_path):
    exp, rc, out = grid_run(tmp_path, "p", [0.001, 0.003], "--pack", "2",
                            "--keep-checkpoints", "10", epochs=3)
    assert rc == 0, out[-3000:]
    (trial,) = sorted(exp.glob("train_pack_*"))
    kept = checkpoint_epochs(trial)
    assert sorted(kept.values()) == [1, 2, 3]
    for name, epoch in kept.items():
        loaded = load_trial(trial / name)
        assert loaded.epoch == epoch and len(loaded.configs) == 2
        for k, rec in enumerate(loaded.evaluate("dev")):
            row = read_metrics(trial / f"c{k}" / "metrics.jsonl")[epoch - 1]
            assert rec["tau"] == pytest.approx(row["tau"], abs=1e-6), (name, k)
    first = load_trial(trial / "checkpoint_000000").evaluate("test")  # epoch 1 always improves
    for k, rec in enumerate(first):
        assert rec["tau"] == pytest.approx(
            read_metrics(trial / f"c{k}" / "metrics.jsonl")[0]["test_tau"], abs=1e-6)


@pytest.fixture(scope="module")
def errored(tmp_path_factory):
    """A grid whose trials all end ERROR: two crash after epoch 2 (no retries), one diverges."""
    tmp = tmp_path_factory.mktemp("err")
    exp, rc, out = grid_run(tmp, "e", [0.001, 0.003, 1e6], "--max-failures", "0", epochs=3,
                            env={"POH_TUNE_CRASH_AFTER_EPOCH": "2"})
    assert rc == 1, out[-3000:]
    return exp


RESTORE = ("import json, poh_tune\nfrom ray import tune\nimport ray\n"
           "ray.init(address='local', num_cpus=2, include_dashboard=False)\n"
           "exp = {exp!r}\n"
           "r = tune.Tuner.restore(exp, trainable=poh_tune.restore_trainable(exp), {how}=True).fit()\n"
           "print('OUT', json.dumps([{{'path': x.path, 'error': x.error is not None, "
           "'lr': x.config['lr_encoder']}} for x in r]))\n")


def _restore(exp: Path, how: str) -> list[dict]:
    p = python(RESTORE.format(exp=str(exp), how=how))
    return json.loads(p.stdout.split("OUT ", 1)[1])


@pytest.mark.slow
def test_restart_errored_starts_from_scratch(errored, tmp_path):
    exp = tmp_path / "e"
    shutil.copytree(errored, exp)
    old = {d.name for d in exp.glob("train_trial_*")}
    assert len([d for d in exp.glob("train_trial_*") if (d / "trial_state.pt").exists()]) == 3
    assert len(list(exp.glob("train_trial_*/.diverged"))) == 1
    out = _restore(exp, "restart_errored")
    assert len(out) == 3
    for r in out:
        folder = Path(r["path"])
        assert folder.name not in old  # a new trial, in a new folder
        rows = read_metrics(folder / "metrics.jsonl")
        its = [json.loads(x)["training_iteration"] for x in open(folder / "result.json")]
        if r["lr"] == 1e6:  # trained again from epoch 1, and diverged again
            assert r["error"] and [x["epoch"] for x in rows] == [1]
        else:
            assert not r["error"] and [x["epoch"] for x in rows] == [1, 2, 3] == its
            (before,) = [d for d in errored.glob("train_trial_*")
                         if load_trial(d / "trial_state.pt").configs[0].lr_encoder == r["lr"]]
            # Epoch 1 again, as the errored trial first trained it.
            assert rows[0]["tau"] == read_metrics(before / "metrics.jsonl")[0]["tau"]


@pytest.mark.slow
def test_resume_from_a_deleted_checkpoint_takes_the_state_file(errored, tmp_path):
    """Tune's snapshot names a checkpoint that is gone (the ray#30073 race, made on purpose):
    the trial resumes from its state file (epoch 2) instead of failing."""
    exp = tmp_path / "e"
    shutil.copytree(errored, exp)
    crashed = [d for d in exp.glob("train_trial_*") if not (d / ".diverged").exists()]
    for d in crashed:
        newest = max(d.glob("checkpoint_*"))
        shutil.rmtree(newest)  # the epoch-2 checkpoint the snapshot names
        assert max(checkpoint_epochs(d).values()) == 1
    out = _restore(exp, "resume_errored")
    by_path = {Path(r["path"]).name: r for r in out}
    for d in crashed:
        assert not by_path[d.name]["error"]
        assert [x["epoch"] for x in read_metrics(d / "metrics.jsonl")] == [1, 2, 3]
        last = json.loads(open(d / "result.json").read().splitlines()[-1])
        assert last["training_iteration"] == 3
        # Epoch 3 from the state file equals an uninterrupted run's epoch 3.
        cfg = load_trial(d / "trial_state.pt").configs[0]
        torch.set_num_threads(1)
        runner = TrialRunner(cfg, "cpu")
        direct = [runner.run_epoch() for _ in range(3)]
        assert read_metrics(d / "metrics.jsonl")[2]["tau"] == pytest.approx(direct[2]["tau"],
                                                                             abs=1e-6)


def test_choose_state_takes_the_newer_and_a_foreign_checkpoint(tiny_cfg, tmp_path):
    from poh_tune.checkpoints import state_bytes

    runner = TrialRunner(tiny_cfg.replace(epochs=2), "cpu")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    runner.run_epoch()
    (ckpt / "trial.pt").write_bytes(state_bytes(runner, "a"))  # epoch 1
    runner.run_epoch()
    state = tmp_path / "trial_state.pt"
    state.write_bytes(state_bytes(runner, "a"))  # epoch 2
    assert choose_state(state, ckpt, "a")[0]["epoch"] == 2
    assert choose_state(None, ckpt, "a")[0]["epoch"] == 1
    # Trial b (a restart in a reused folder) ignores a's state file; a's checkpoint handed to
    # it counts as another trial's.
    assert choose_state(state, None, "b")[0] is None
    assert choose_state(state, ckpt, "b")[0]["epoch"] == 1
    (ckpt / "trial.pt").write_bytes(state_bytes(runner, "b")[:100])  # torn by a kill
    assert choose_state(state, ckpt, "a")[0]["epoch"] == 2
    (ckpt / "trial.pt").write_bytes(state_bytes(TrialRunner(tiny_cfg, "cpu"), "pbt"))
    sd, why = choose_state(state, ckpt, "a")  # PBT hands in another trial's (older) state
    assert sd["trial_id"] == "pbt" and sd["epoch"] == 0 and "pbt" in why
