"""Time training epochs and a dev evaluation; report model FLOPs utilisation against this machine's own matmul peak.

    python -m poh_tune.bench [--epochs N] [--warmup N] [--seeds K [--batch-reference] [--split-reference]] [key=value ...]

MFU follows nanoGPT's accounting: analytic matmul FLOPs of the model (forward + 2x for backward)
per second, divided by a peak that is measured here, in the same run, with the same threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from poh_tune.config import ConfigError, load_config, parse_overrides
from poh_tune.matmul import cpu_split
from poh_tune.model import ModelConfig
from poh_tune.trainer import TrialRunner

PEAK_N = 2048


def forward_flops(cfg: ModelConfig, batch: int, pointer: bool) -> float:
    """Matmul FLOPs of one member's forward pass over `batch` samples (2 per multiply-add).

    Counts every linear layer, attention scores and values, the recurrent cells and the readouts;
    elementwise work (norms, softmax, losses) is left out, as in the usual MFU accounting.
    """
    d, L, H, f, c = cfg.d_model, cfg.array_len, cfg.n_heads, cfg.d_ff, cfg.d_ctrl
    tokens = batch * L
    block = tokens * (2 * d * 3 * d + 2 * d * d + 2 * 2 * d * f) + batch * 2 * 2 * L * L * d
    readout = tokens * 2 * d
    total = block  # the encoder block (the value projection is an elementwise product)
    if cfg.model == "baseline":
        total += readout  # the baseline reads scores off the encoder; PoH after each iteration
    else:
        if cfg.controller == "hrm":
            # Every iteration: GRU_L's gates from x (inp composed with ih's token half) and from
            # z_L, the router on z_L; z_H's part of both cached. Period iterations: GRU_H, then
            # z_H's part of both, recomputed.
            per_iter = tokens * (2 * d * 3 * c + 2 * c * 3 * c + 2 * c * H)
            per_period = tokens * (2 * 3 * (c + c) * c + 2 * c * (3 * c + H))
            n_period = len(range(0, cfg.max_inner_iters, cfg.hrm_period))
            ctrl = cfg.max_inner_iters * per_iter + n_period * per_period
            ctrl += 2 * c * (3 * c + H)  # the initial z_H, projected once for all tokens
            ctrl += 2 * (d + 1) * c * 3 * c  # inp's weight and bias composed with ih, once
        else:
            ctrl = cfg.max_inner_iters * tokens * (2 * d * c + 2 * c * H)
        total += cfg.max_inner_iters * (block + readout) + ctrl
    if pointer:
        n = cfg.n_iters
        total += n * (tokens * 2 * 2 * d * d + batch * 2 * L * L * d)  # q, k, q@k^T
    return float(total)


def matmul_peak_gflops(n: int = PEAK_N, repeats: int = 5,
                       dtype: torch.dtype = torch.float32) -> float:
    """Best-of-`repeats` throughput of an n x n matmul in `dtype` on the current torch threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def cpu_has_amx() -> bool:
    """Whether this CPU has bf16 matrix units (Intel AMX: the amx_bf16 flag in /proc/cpuinfo).
    Without them torch still runs bf16 matmuls, through slower AVX-512 or emulated paths."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def matmul_peaks() -> dict[str, float]:
    """The FP32 and bf16 matmul peaks of this machine, GFLOP/s, keyed by precision."""
    return {"fp32": matmul_peak_gflops(), "bf16": matmul_peak_gflops(dtype=torch.bfloat16)}


def aten_ops_per_step(cfg, device: str = "cpu") -> int:
    """aten calls the PyTorch profiler records in one optimizer step (data indexing, forward,
    loss, backward, clipping, optimizer; nested calls included), after one warm-up step.

    The eager path pays a fixed cost for every call (the CPU always, a GPU on its first,
    uncaptured step), so this is the cost a faster kernel cannot remove. Deterministic for a
    given configuration: unlike a time, it can be compared across machines and runs. `cfg` needs
    at least two optimizer steps per epoch.
    """
    from torch.profiler import ProfilerActivity, profile

    if cfg.train_samples // cfg.batch_size < 2:
        raise ValueError(f"aten_ops_per_step needs two optimizer steps in an epoch; got "
                         f"train_samples={cfg.train_samples}, batch_size={cfg.batch_size}")
    steps = TrialRunner(cfg, device).train_steps()
    next(steps)  # warm-up: first-call allocations and lazy initialisation stay out of the count
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        next(steps)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


class Timed:
    """A runner whose training passes and dev evaluations are timed; the fastest counts."""

    def __init__(self, cfg, name: str = "", split: bool = True):
        self.cfg, self.name, self.split = cfg, name, split
        self.runner = TrialRunner(cfg, "cpu")
        self.train_s: list[float] = []
        self.eval_s: list[float] = []
        self.gflop = len(cfg.seeds) * 3 * forward_flops(
            self.runner.model.cfg, cfg.train_samples, cfg.loss == "pointer_ce") / 1e9

    def evaluate(self, record: bool) -> None:
        with self.matmuls():
            t = time.perf_counter()
            self.runner.evaluate("dev", 1.0, diagnostics=self.cfg.diagnostics)
            elapsed = time.perf_counter() - t
        if record:
            self.eval_s.append(elapsed)

    def matmuls(self) -> contextlib.AbstractContextManager:
        """With split=False, the ensemble's CPU matmul split is off: every member in one bmm."""
        return contextlib.nullcontext() if self.split else cpu_split(None)

    @property
    def best(self) -> float:
        return min(self.train_s)


def interleaved_epoch(runs: list[Timed], record: bool = True) -> None:
    """One training epoch of every run, their optimizer steps interleaved one by one so that all
    see the same machine (these machines are shared, and their speed drifts within seconds);
    then a timed dev evaluation of each."""
    steps = [r.runner.train_steps() for r in runs]
    spent = [0.0] * len(runs)
    live = list(range(len(runs)))
    while live:
        for i in list(live):
            with runs[i].matmuls():
                t = time.perf_counter()
                try:
                    next(steps[i])
                except StopIteration:
                    live.remove(i)
                spent[i] += time.perf_counter() - t
    for r, s in zip(runs, spent, strict=True):
        if record:
            r.train_s.append(s)
        r.evaluate(record)


def paired_median(num: list[float], den: list[float]) -> float:
    """Median over epochs of num[i] / den[i], epochs whose steps were interleaved: robust to the
    machine changing speed between epochs, which the ratio of the bests is not."""
    xs = sorted(a / b for a, b in zip(num, den, strict=True))
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def bench(cfg, epochs: int = 3, warmup: int = 1, seeds: int = 1,
          batch_reference: bool = False, split_reference: bool = False,
          precision_reference: bool = False) -> dict:
    """Time one seed and, with seeds > 1, k seeds trained together, interleaved step by step so
    that both see the same machine (these machines are shared and noisy).

    With `batch_reference`, also one seed on a k times larger batch and training set: the same
    arithmetic as k seeds in the same number of steps, but in k times larger matmuls, the best
    that batching k seeds can hope for where the arithmetic is the limit. With
    `split_reference`, also k seeds with the CPU matmul split off (`poh_tune.matmul.cpu_split`).
    With `precision_reference`, also one seed in the other precision (bf16 against fp32)."""
    peaks = matmul_peaks()
    runs = [Timed(cfg.replace(seeds=[cfg.seeds[0]]), "1 seed")]
    extra: dict[str, Timed] = {}
    other = "fp32" if cfg.precision == "bf16" else "bf16"
    if precision_reference:
        extra["precision"] = Timed(cfg.replace(seeds=[cfg.seeds[0]], precision=other),
                                   f"1 seed, {other}")
        runs.append(extra["precision"])
    if seeds > 1:
        runs.insert(1, Timed(cfg.replace(seeds=list(range(1, seeds + 1))), f"{seeds} seeds"))
        if batch_reference:
            extra["batch"] = Timed(cfg.replace(seeds=[cfg.seeds[0]],
                                               batch_size=cfg.batch_size * seeds,
                                               train_samples=cfg.train_samples * seeds),
                                   f"1 seed, {seeds}x batch")
        if split_reference:
            extra["bmm"] = Timed(cfg.replace(seeds=list(range(1, seeds + 1))),
                                 f"{seeds} seeds, no split", split=False)
        runs += [r for key, r in extra.items() if key != "precision"]
    for i in range(warmup + epochs):
        t = time.perf_counter()
        interleaved_epoch(runs, record=i >= warmup)
        what = "warm-up" if i < warmup else f"epoch {i - warmup + 1}/{epochs}"
        times = ", ".join(f"{r.name} {r.train_s[-1]:.2f} s" for r in runs if i >= warmup)
        print(f"bench: {what} done in {time.perf_counter() - t:.1f} s" + (f": {times}" if times
              else ""), file=sys.stderr, flush=True)
    # the better of two reads, before and after; MFU against the peak of the precision used
    peaks = {k: max(v, w) for (k, v), w in zip(peaks.items(), matmul_peaks().values(),
                                                 strict=True)}
    peak = peaks[cfg.precision]
    one = runs[0]
    res = {
        "train_epoch_s": round(one.best, 4),
        "train_epoch_s_all": [round(x, 4) for x in one.train_s],
        "eval_s": round(min(one.eval_s), 4),
        "eval_fraction": round(min(one.eval_s) / one.best, 4),
        "model_gflop_per_epoch": round(one.gflop, 2),
        "achieved_gflops": round(one.gflop / one.best, 2),
        "precision": cfg.precision,
        "peak_gflops": round(peak, 2),
        "peak_gflops_fp32": round(peaks["fp32"], 2),
        "peak_gflops_bf16": round(peaks["bf16"], 2),
        "cpu_amx_bf16": cpu_has_amx(),
        "mfu": round(one.gflop / one.best / peak, 4),
        "aten_ops_per_step": aten_ops_per_step(one.cfg),
    }
    if "precision" in extra:
        ref = extra["precision"]
        fp32, bf16 = (one, ref) if cfg.precision == "fp32" else (ref, one)
        res.update({
            f"train_epoch_s_{other}": round(ref.best, 4),
            f"train_epoch_s_{other}_all": [round(x, 4) for x in ref.train_s],
            f"eval_s_{other}": round(min(ref.eval_s), 4),
            f"aten_ops_per_step_{other}": aten_ops_per_step(ref.cfg),
            # > 1: bf16 is faster; the median of per-epoch ratios of interleaved epochs
            "bf16_speedup": round(fp32.best / bf16.best, 3),
            "bf16_speedup_paired_median": round(paired_median(fp32.train_s, bf16.train_s), 3),
        })
    if seeds > 1:
        k = runs[1]
        res.update({
            "seeds": seeds,
            f"train_epoch_s_{seeds}_seeds": round(k.best, 4),
            f"train_epoch_s_{seeds}_seeds_all": [round(x, 4) for x in k.train_s],
            f"eval_s_{seeds}_seeds": round(min(k.eval_s), 4),
            f"cost_ratio_{seeds}_seeds_vs_1": round(k.best / one.best, 3),
            f"cost_ratio_{seeds}_seeds_vs_1_paired_median": round(
                paired_median(k.train_s, one.train_s), 3),
            f"mfu_{seeds}_seeds": round(k.gflop / k.best / peak, 4),
        })
        if "bmm" in extra:
            ref = extra["bmm"]
            res.update({
                f"train_epoch_s_{seeds}_seeds_bmm": round(ref.best, 4),
                f"split_speedup_{seeds}_seeds": round(ref.best / k.best, 3),
                f"split_speedup_{seeds}_seeds_paired_median": round(
                    paired_median(ref.train_s, k.train_s), 3),
            })
        if "batch" in extra:
            ref = extra["batch"]
            res.update({
                f"train_epoch_s_1_seed_{seeds}x_batch": round(ref.best, 4),
                f"cost_ratio_1_seed_{seeds}x_batch_vs_1": round(ref.best / one.best, 3),
                f"mfu_1_seed_{seeds}x_batch": round(ref.gflop / ref.best / peak, 4),
            })
    res.update({"threads": torch.get_num_threads(), "torch": torch.__version__,
                "config": {key: getattr(cfg, key) for key in (
                    "model", "controller", "loss", "deep_supervision", "grad_mode",
                    "max_inner_iters", "hrm_period", "array_len", "mask_rate", "train_samples",
                    "dev_samples", "batch_size", "d_model", "n_heads", "d_ff", "d_ctrl",
                    "diagnostics", "controller_warmup_epochs", "precision")}})
    return res


def estimate_grid(space_arg: str | None, experiments: list[str] | None) -> dict:
    """Wall time of a grid space on this machine, from one measured epoch of every configuration.

    Each distinct configuration is trained for one epoch on all its seeds (train + dev/test
    evaluation, controller active); the estimate is epochs x that time, summed, since trials here
    share the same cores and are compute-bound.
    """
    from poh_tune.spaces import grid_variants, load_space, resolve_space_path

    space = load_space(resolve_space_path(space_arg, "document_grid.yaml"))
    variants, membership = grid_variants(space, experiments)
    rows, total = [], 0.0
    for params in variants:
        cfg = space.base.replace(**params, controller_warmup_epochs=0)
        runner = TrialRunner(cfg, "cpu")
        t = time.perf_counter()
        runner.run_epoch_per_seed()
        epoch_s = time.perf_counter() - t
        total += epoch_s * cfg.epochs
        rows.append({"params": params, "seeds": len(cfg.seeds), "epoch_s": round(epoch_s, 3),
                     "trial_s": round(epoch_s * cfg.epochs, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"space": str(space.path), "configs": len(variants), "trials": rows,
            "estimated_wall_s": round(total, 1), "estimated_wall_h": round(total / 3600, 2),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m poh_tune.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs (the fastest is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    ap.add_argument("--seeds", type=int, default=1,
                    help="also time k seeds trained together and compare with one seed")
    ap.add_argument("--batch-reference", action="store_true",
                    help="with --seeds k: also one seed on a k times larger batch (same FLOPs)")
    ap.add_argument("--split-reference", action="store_true",
                    help="with --seeds k: also k seeds with the CPU matmul split off")
    ap.add_argument("--precision-reference", action="store_true",
                    help="also time one seed in the other precision (bf16 against fp32), "
                         "interleaved step by step; reports bf16_speedup")
    ap.add_argument("--estimate-grid", nargs="?", const="", default=None, metavar="SPACE",
                    help="estimate the wall time of a grid space here (default: the document's)")
    ap.add_argument("--experiment", action="append", default=None,
                    help="with --estimate-grid: only this experiment (repeatable)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: eager against CUDA-graphed steps on the GPU (bench_cuda)")
    ap.add_argument("--pack", type=int, default=1, metavar="N",
                    help="with --device cuda: N configurations trained together")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        return _main_cuda(args)
    if args.estimate_grid is not None:
        try:
            print(json.dumps(estimate_grid(args.estimate_grid or None, args.experiment)))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        # Time the steady state: the controller trains from the first epoch unless asked otherwise.
        cfg = load_config(None, {"controller_warmup_epochs": 0} | parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.precision == "bf16" and not cpu_has_amx():
        print("bench: this CPU has no AMX (no amx_bf16 flag): bf16 matmuls run without matrix "
              "units here, compare peak_gflops_bf16 with peak_gflops_fp32", file=sys.stderr)
    if args.seeds < 1 or args.epochs < 1 or args.warmup < 0:
        print(f"error: --seeds and --epochs must be >= 1 and --warmup >= 0; got --seeds "
              f"{args.seeds} --epochs {args.epochs} --warmup {args.warmup}", file=sys.stderr)
        return 2
    print(json.dumps(bench(cfg, args.epochs, args.warmup, args.seeds, args.batch_reference,
                           args.split_reference, args.precision_reference)))
    return 0


def _main_cuda(args: argparse.Namespace) -> int:
    from poh_tune import bench_cuda

    if not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA device here (torch "
              f"{torch.__version__}); run it on a machine with a GPU", file=sys.stderr)
        return 2
    if args.pack < 1 or args.seeds < 1 or args.epochs < 1:
        print(f"error: --pack, --seeds and --epochs must be >= 1; got --pack {args.pack} "
              f"--seeds {args.seeds} --epochs {args.epochs}", file=sys.stderr)
        return 2
    try:
        if args.estimate_grid is not None:
            res = bench_cuda.estimate_grid_device(args.estimate_grid or None, args.experiment,
                                                  "cuda", args.pack if args.pack > 1 else None)
        else:
            cfg = load_config(None, {"controller_warmup_epochs": 0}
                              | parse_overrides(args.overrides))
            res = bench_cuda.bench_device(cfg, "cuda", args.epochs, args.seeds, args.pack)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
