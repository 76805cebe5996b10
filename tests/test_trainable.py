"""The Tune trainable on a real local Ray: per-epoch reports, files, and a crash resumed from a checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from poh_tune.io import TB_DIR
from poh_tune.trainable import CRASH_ENV, METRICS_FILE, TRIAL_FILE, train_trial
from poh_tune.trainer import TrialRunner

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

CRASH_EPOCH = 2


@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Every trial of this module's Ray session kills its own process once, after CRASH_EPOCH.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {CRASH_ENV: str(CRASH_EPOCH)}})
    yield
    ray.shutdown()


def test_trial_survives_a_crash_and_logs_each_epoch_once(local_ray, tiny_cfg, tmp_path):
    base = tiny_cfg.to_dict()
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=base, membership=None, checkpoint_every=1),
        {"cpu": 1})
    tuner = tune.Tuner(
        trainable, param_space={"entropy_reg": tune.grid_search([0.001, 0.002])},
        tune_config=tune.TuneConfig(metric="tau", mode="max"),
        run_config=tune.RunConfig(name="t", storage_path=str(tmp_path), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=2)))
    results = tuner.fit()
    assert not results.errors
    assert len(results) == 2
    for r in results:
        assert (r.path and os.path.exists(os.path.join(r.path, ".crashed")))  # it did crash
        rows = [json.loads(x) for x in open(os.path.join(r.path, METRICS_FILE))]
        assert [x["epoch"] for x in rows] == [1, 2, 3]
        info = yaml.safe_load(open(os.path.join(r.path, TRIAL_FILE)))
        assert info["experiments"] == [] and info["trial_id"] == rows[0]["trial_id"]
        assert info["config"]["entropy_reg"] == r.config["entropy_reg"]
        assert r.metrics["node_id"] and r.metrics["torch_threads"] == 1
        for x in rows:
            assert len(x["tau_iter"]) == len(x["entropy_iter"]) == tiny_cfg.max_inner_iters
        # Tune gets the record flat: per-iteration and per-seed values as scalars.
        assert r.metrics[f"tau_iter_{tiny_cfg.max_inner_iters - 1}"] == rows[-1]["tau_iter"][-1]
        assert r.metrics["tau_seed_1"] == rows[-1]["per_seed"][0]["tau"]
        # The resumed run ends with exactly the metrics of an uninterrupted one.
        torch.set_num_threads(1)
        runner = TrialRunner(tiny_cfg.replace(entropy_reg=r.config["entropy_reg"]), "cpu")
        direct = [runner.run_epoch() for _ in range(tiny_cfg.epochs)]
        for got, want in zip(rows, direct, strict=True):
            for k in ("tau", "tau_all", "train_loss", "best_tau", "test_tau", "tau_iter"):
                assert got[k] == pytest.approx(want[k], abs=1e-6), k
        assert os.path.isdir(os.path.join(r.path, TB_DIR))
