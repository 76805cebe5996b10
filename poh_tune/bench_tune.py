"""Tune's own cost: one trial run directly through TrialRunner and then through Ray Tune.

`python -m poh_tune.bench_tune [key=value ...] | tail -1` prints one JSON line: wall times of both, the
epoch time inside Tune over the direct one, and Tune's fixed start-up cost.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

from poh_tune.config import ConfigError, load_config
from poh_tune.io import METRICS_FILE

# A mid-size trial: epochs of about a second on one core, so per-epoch overhead is visible.
BENCH = dict(array_len=20, train_samples=500, dev_samples=200, test_samples=200, epochs=5,
             d_model=64, d_ff=128, d_ctrl=32, max_inner_iters=4, hrm_period=2, seeds=[1, 2],
             controller_warmup_epochs=1, threads=1)


def direct(cfg) -> dict[str, Any]:
    import torch

    from poh_tune.trainer import TrialRunner

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    runner = TrialRunner(cfg, device="cpu")
    rows = [runner.run_epoch() for _ in range(cfg.epochs)]
    return {"wall_s": time.perf_counter() - t0, "epoch_s": sum(r["epoch_s"] for r in rows),
            "tau": rows[-1]["tau"]}


def through_tune(cfg) -> dict[str, Any]:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: loopback
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from poh_tune.trainable import train_trial

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    t_ray = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, base=cfg.to_dict(), membership=None), {"cpu": 1})
        t1 = time.perf_counter()
        res = tune.Tuner(trainable, run_config=tune.RunConfig(
            name="bench", storage_path=tmp, verbose=0,
            callbacks=[JsonLoggerCallback(), CSVLoggerCallback()])).fit()
        t_fit = time.perf_counter() - t1
        assert not res.errors, res.errors
        rows = [json.loads(x) for x in open(os.path.join(res[0].path, METRICS_FILE))]
    ray.shutdown()
    epoch_s = sum(r["epoch_s"] for r in rows)
    return {"ray_init_s": t_ray, "fit_s": t_fit, "epoch_s": epoch_s, "tau": rows[-1]["tau"],
            "trial_startup_s": t_fit - epoch_s}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(None, {**BENCH, **_parse(argv)})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = direct(cfg)
    t = through_tune(cfg)
    out = {"config": {k: cfg.to_dict()[k] for k in BENCH}, "direct": d, "tune": t,
           "epoch_time_ratio": t["epoch_s"] / d["epoch_s"],
           "fit_over_direct_wall": t["fit_s"] / d["wall_s"],
           "fit_minus_direct_s": t["fit_s"] - d["wall_s"],  # per-trial cost, Ray start excluded
           "same_tau": abs(t["tau"] - d["tau"]) < 1e-6}
    print(json.dumps(out))  # one line, the last one (Tune prints its own lines before it)
    return 0


def _parse(argv: list[str]) -> dict[str, Any]:
    from poh_tune.config import parse_overrides

    return parse_overrides(argv)


if __name__ == "__main__":
    sys.exit(main())
