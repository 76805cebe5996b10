"""Time training epochs and a dev evaluation; report model FLOPs utilisation against this machine's own matmul peak.

    python -m poh_tune.bench [--epochs N] [--warmup N] [key=value ...]

MFU follows nanoGPT's accounting: analytic matmul FLOPs of the model (forward + 2x for backward)
per second, divided by a peak that is measured here, in the same run, with the same threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from poh_tune.config import ConfigError, load_config, parse_overrides
from poh_tune.model import forward_flops
from poh_tune.trainer import SeedTrainer

PEAK_N = 2048


def matmul_peak_gflops(n: int = PEAK_N, repeats: int = 5) -> float:
    """Best-of-`repeats` FP32 throughput of an n x n matmul on the current torch threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def bench(cfg, epochs: int = 3, warmup: int = 1) -> dict:
    trainer = SeedTrainer(cfg, cfg.seeds[0], "cpu")
    peak = matmul_peak_gflops()
    for _ in range(warmup):
        trainer.train_pass()
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        trainer.train_pass()
        times.append(time.perf_counter() - t)
    trainer.evaluate("dev", 1.0, diagnostics=cfg.diagnostics)  # warm-up of the eval path
    t = time.perf_counter()
    trainer.evaluate("dev", 1.0, diagnostics=cfg.diagnostics)
    eval_s = time.perf_counter() - t
    peak = max(peak, matmul_peak_gflops())  # the better of two reads, before and after
    train_s = min(times)
    gflop = 3 * forward_flops(trainer.model.cfg, cfg.train_samples, cfg.loss == "pointer_ce") / 1e9
    return {
        "train_epoch_s": round(train_s, 4),
        "train_epoch_s_all": [round(x, 4) for x in times],
        "eval_s": round(eval_s, 4),
        "eval_fraction": round(eval_s / train_s, 4),
        "model_gflop_per_epoch": round(gflop, 2),
        "achieved_gflops": round(gflop / train_s, 2),
        "peak_gflops": round(peak, 2),
        "mfu": round(gflop / train_s / peak, 4),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": {k: getattr(cfg, k) for k in (
            "model", "controller", "loss", "deep_supervision", "grad_mode", "max_inner_iters",
            "hrm_period", "array_len", "mask_rate", "train_samples", "dev_samples", "batch_size",
            "d_model", "n_heads", "d_ff", "d_ctrl", "diagnostics", "controller_warmup_epochs")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m poh_tune.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs (the fastest is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    try:
        # Time the steady state: the controller trains from the first epoch unless asked otherwise.
        cfg = load_config(None, {"controller_warmup_epochs": 0} | parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(json.dumps(bench(cfg, args.epochs, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
