"""Where a training step's time goes in fp32 and in bf16: self CPU time per aten op, per step.

    PYTHONPATH=. python docs/precision_profile.py [--steps 8] [key=value ...]

Profiles one seed of the SPEC configuration (or the overrides) with torch.profiler, the two
precisions alternated step by step so that both see the same machine, and prints per step:
the wall time, the matmul time (bmm, baddbmm, mm, addmm), the cast time (_to_copy), every other
aten op, and the ops whose time differs most between the precisions. Times are the ops' self CPU
times; the Python between ops is in the wall time only.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from poh_tune.config import load_config, parse_overrides
from poh_tune.trainer import TrialRunner

MATMUL = {"aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm"}
CAST = {"aten::_to_copy"}
PRECISIONS = ("fp32", "bf16")


def profiled_step(steps) -> tuple[dict[str, tuple[float, int]], float]:
    """One step of the `steps` generator: {aten op: (self CPU µs, calls)} and its wall seconds."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        next(steps)
        wall = time.perf_counter() - t
    return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()
            if e.key.startswith("aten::")}, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="profiled steps per precision")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    cfg = load_config(None, {"controller_warmup_epochs": 0, "seeds": [1]}
                      | parse_overrides(args.overrides))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runs = {p: TrialRunner(cfg.replace(precision=p), "cpu").train_steps() for p in PRECISIONS}
    for steps in runs.values():  # warm-up: first-call allocations and weight-cast caches
        next(steps)
        next(steps)
    ops = {p: defaultdict(lambda: [0.0, 0]) for p in PRECISIONS}
    wall = dict.fromkeys(PRECISIONS, 0.0)
    for _ in range(args.steps):  # alternated, one step at a time
        for p, steps in runs.items():
            per, w = profiled_step(steps)
            wall[p] += w
            for k, (us, calls) in per.items():
                ops[p][k][0] += us
                ops[p][k][1] += calls
    n = args.steps

    def ms(p: str, names) -> float:
        return round(sum(ops[p][k][0] for k in names) / n / 1e3, 2)

    out: dict = {}
    for p in PRECISIONS:
        every = list(ops[p])
        out[p] = {"step_wall_ms": round(wall[p] / n * 1e3, 2), "aten_self_ms": ms(p, every),
                  "matmul_ms": ms(p, MATMUL & set(every)), "cast_ms": ms(p, CAST & set(every)),
                  "other_aten_ms": ms(p, set(every) - MATMUL - CAST),
                  "aten_calls": int(sum(c for _, c in ops[p].values()) / n)}
    names = set(ops["fp32"]) | set(ops["bf16"])
    top = sorted(names, key=lambda k: -abs(ops["bf16"][k][0] - ops["fp32"][k][0]))[:15]
    out["ops_that_differ_most"] = {
        k: {p: {"ms": round(ops[p][k][0] / n / 1e3, 2), "calls": int(ops[p][k][1] / n)}
            for p in PRECISIONS} for k in top}
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
