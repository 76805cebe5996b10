"""Packed vs one-after-the-other: one training epoch (+ dev evaluation) of two configurations.

    PYTHONPATH=. python docs/pack_measure.py [--repeats 3] [key=value ...]

Runs on one torch thread (a trial's default share: --cpus-per-trial 1), alternating the packed
run and the two single runs; prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from poh_tune.config import load_config, parse_overrides
from poh_tune.trainer import TrialRunner


def epoch_s(cfgs) -> float:
    runner = TrialRunner(cfgs if len(cfgs) > 1 else cfgs[0], device="cpu")
    t = time.perf_counter()
    runner.run_epoch_per_config()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    torch.set_num_threads(1)
    base = load_config(None, parse_overrides(a.overrides))
    cfgs = [base.replace(entropy_reg=5e-4), base.replace(entropy_reg=2e-3)]
    packed, single = [], []
    for r in range(a.repeats):
        packed.append(epoch_s(cfgs))
        single.append(sum(epoch_s([c]) for c in cfgs))
        print(f"repeat {r}: packed {packed[-1]:.2f} s, one after the other {single[-1]:.2f} s",
              flush=True)
    mp, ms = statistics.median(packed), statistics.median(single)
    print(f"median packed {mp:.2f} s, one after the other {ms:.2f} s, ratio {mp / ms:.2f}")


if __name__ == "__main__":
    main()
