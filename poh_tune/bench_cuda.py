"""The GPU bench: eager against CUDA-graphed steps, their equivalence, launches and GPU busy time.

    python -m poh_tune.bench --device cuda [--seeds K] [--pack N] [--epochs E] [key=value ...]
    python -m poh_tune.bench --estimate-grid --device cuda

One command for anyone with a GPU to check what ../shared/GPU_NOTES.md measured and what the
graphs change: seconds per epoch and per optimizer step, eager and graphed, measured alternately;
the largest difference of losses and τ between the two over the same epochs (same seeds, same
data: only float rounding may differ); kernel launches per optimizer step and the share of the
wall time the GPU was busy (PyTorch profiler). It runs on any device (on a CPU both modes are
eager), so its code is tested where no GPU is.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from poh_tune.config import TrialConfig
from poh_tune.trainer import TrialRunner


def pack_of(cfg: TrialConfig, n: int) -> list[TrialConfig]:
    """n configurations that may train together: cfg with other temperatures and entropy
    weights (keys a pack may vary), as a grid's sweep would give."""
    return [cfg.replace(temperature_init=cfg.temperature_init * (1 + 0.1 * i),
                        temperature_min=min(cfg.temperature_min,
                                            cfg.temperature_init * (1 + 0.1 * i)),
                        entropy_reg=cfg.entropy_reg * (1 + 0.5 * i)) for i in range(n)]


# CUDA runtime and driver calls that launch work: a replayed graph is one cudaGraphLaunch.
LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                          "cuLaunchKernelEx", "cudaGraphLaunch"})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_epoch(runner: TrialRunner) -> tuple[float, list[dict[str, Any]]]:
    _sync(runner.device)
    t = time.perf_counter()
    per = runner.run_epoch_per_seed()
    _sync(runner.device)
    return time.perf_counter() - t, per


def _profile_epoch(runner: TrialRunner) -> dict[str, float]:
    """Kernel launches per optimizer step and the GPU's busy share over one training pass."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda"
                                     else [])
    steps = -(-runner.cfg.train_samples // runner.cfg.batch_size)
    _sync(runner.device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        runner.train_pass()
        _sync(runner.device)
    wall = time.perf_counter() - t
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = [e for e in events if e.name in LAUNCH_CALLS]
    aten = [e for e in events if e.name.startswith("aten::")]
    busy_us = sum(e.device_time for e in kernels)
    return {"launches_per_step": round(len(launches) / steps, 1),  # host calls: a graph is one
            "kernels_per_step": round(len(kernels) / steps, 1),  # kernels the GPU ran
            "aten_ops_per_step": round(len(aten) / steps, 1),
            "gpu_busy_fraction": round(busy_us / 1e6 / wall, 4)}


def bench_device(cfg: TrialConfig, device: str = "cuda", epochs: int = 3, seeds: int = 5,
                 pack: int = 1) -> dict[str, Any]:
    """Eager and graphed runners of the same configurations, epochs alternated.

    Args:
        cfg: the configuration (seeds 1..`seeds` are used).
        device: "cuda" (or "cpu", where both runs are eager: the code path is the same).
        epochs: timed epochs after one warm-up epoch (the graphs are captured in it).
        seeds: seeds per configuration.
        pack: configurations trained together (pack_of).
    Returns:
        The JSON-able results.
    """
    cfg = cfg.replace(seeds=list(range(1, seeds + 1)))
    cfgs = pack_of(cfg, pack) if pack > 1 else [cfg]
    runners = {"eager": TrialRunner([c.replace(cuda_graphs="off") for c in cfgs], device),
               "graphed": TrialRunner([c.replace(cuda_graphs="auto") for c in cfgs], device)}
    steps = -(-cfg.train_samples // cfg.batch_size)
    times: dict[str, list[float]] = {k: [] for k in runners}
    diff = {"train_loss": 0.0, "tau": 0.0, "test_tau": 0.0}
    for e in range(1 + epochs):
        got = {}
        for name, r in runners.items():
            s, per = _timed_epoch(r)
            got[name] = per
            if e > 0:
                times[name].append(s)
        for k in diff:
            for a, b in zip(got["eager"], got["graphed"], strict=True):
                if k in a and k in b:
                    diff[k] = max(diff[k], abs(a[k] - b[k]))
        print(f"bench: epoch {e}/{epochs}" + (" (warm-up, graphs captured)" if e == 0 else "")
              + ": " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items() if v),
              file=sys.stderr, flush=True)
    res: dict[str, Any] = {"device": str(runners["eager"].device),
                           "device_name": (torch.cuda.get_device_name(device)
                                           if torch.device(device).type == "cuda" else "cpu"),
                           # bf16 runs its matmuls on the tensor cores (no AMX question here)
                           "precision": cfg.precision,
                           "configs": len(cfgs), "seeds": seeds, "members": len(cfgs) * seeds,
                           "steps_per_epoch": steps}
    for name in runners:
        best = min(times[name])
        res[f"{name}_epoch_s"] = round(best, 4)
        res[f"{name}_epoch_s_all"] = [round(x, 4) for x in times[name]]
        res[f"{name}_step_ms"] = round(1000 * best / steps, 3)
    res["graph_speedup"] = round(min(times["eager"]) / min(times["graphed"]), 3)
    res["max_abs_diff"] = {k: float(f"{v:.3g}") for k, v in diff.items()}
    g = runners["graphed"]
    step, ev = g.graphed_step, g.evaluator.graphed
    res["graphs"] = {"step": step.n_graphs, "eval": ev.n_graphs,
                     "failure": step.failure or ev.failure}
    for name, r in runners.items():
        res[f"{name}_profile"] = _profile_epoch(r)
    res["torch"] = torch.__version__
    return res


def estimate_grid_device(space_arg: str | None, experiments: list[str] | None,
                         device: str = "cuda", pack: int | None = None) -> dict[str, Any]:
    """Wall time of a grid on one device when its configurations train in packs.

    Every pack (configurations with equal pack_key, at most `pack` of them; all by default) is
    timed for one epoch after a warm-up epoch (graph capture happens there), and the estimate is
    the sum over packs of epochs x that time: packs run one after another on the device.
    """
    from poh_tune.spaces import grid_variants, load_space, pack_variants, resolve_space_path

    space = load_space(resolve_space_path(space_arg, "document_grid.yaml"))
    variants, _ = grid_variants(space, experiments)
    packs = [[space.base.replace(**variants[i], controller_warmup_epochs=0) for i in p]
             for p in pack_variants(space.base, variants, pack or len(variants))]
    rows, total = [], 0.0
    for cfgs in packs:
        runner = TrialRunner(cfgs, device)
        _timed_epoch(runner)  # warm-up: captures the graphs
        epoch_s, _ = _timed_epoch(runner)
        total += epoch_s * cfgs[0].epochs
        rows.append({"configs": len(cfgs), "members": len(runner.members),
                     "epoch_s": round(epoch_s, 3), "pack_s": round(epoch_s * cfgs[0].epochs, 1)})
        print(rows[-1], file=sys.stderr, flush=True)
    return {"space": str(space.path), "device": device, "configs": len(variants),
            "packs": rows, "estimated_wall_s": round(total, 1)}
