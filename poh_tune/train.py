"""Train one configuration on each of its seeds, without Ray.

    python -m poh_tune.train [--config FILE] [key=value ...] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from poh_tune.config import ConfigError, load_config, save_config
from poh_tune.io import METRICS_FILE
from poh_tune.metrics import mean_ci95
from poh_tune.record import seed_value
from poh_tune.trainer import TrainingDiverged, TrialRunner


def summary_line(last: dict, seeds) -> str:
    tests = [seed_value(last, "test_tau", s) for s in seeds]
    m, hw = mean_ci95(tests)
    per_seed = ", ".join(f"{s}: {v:.4f}" for s, v in zip(seeds, tests, strict=True))
    ci = (f"± {hw:.4f} (95 % CI, {len(tests)} seeds" if len(tests) > 1
          else "(1 seed: 95 % CI n/a")  # a CI needs two values at least
    return (f"test tau at best dev epoch: {m:.4f} {ci}; per seed {per_seed}); "
            f"all-pairs {last['test_tau_all']:.4f}; perfect sort {last['test_perfect_sort']:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m poh_tune.train",
                                 description="Train one PoH configuration on each of its seeds.")
    ap.add_argument("--config", help="YAML file of TrialConfig keys (e.g. a best_config.yaml)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object per epoch on stdout (means over seeds)")
    ap.add_argument("--out", help="directory for config.yaml, metrics.jsonl and the final checkpoint")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, values as YAML scalars (seeds=[1,2,3])")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = Path(args.out) if args.out else None
    if out is not None:
        if out.exists() and not out.is_dir():
            print(f"error: --out {out}: is a file; expected a directory (created if missing)",
                  file=sys.stderr)
            return 2
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"error: --out {out}: cannot create it ({e.strerror or e})", file=sys.stderr)
            return 2
        save_config(cfg, out / "config.yaml")
    runner = TrialRunner(cfg)
    bar = tqdm(total=cfg.epochs, desc="epochs", unit="ep", file=sys.stderr, dynamic_ncols=True)
    last: dict = {}
    try:
        while not runner.done:
            last = runner.run_epoch()
            bar.update(1)
            bar.set_postfix(tau=f"{last['tau']:.4f}", best=f"{last['best_tau']:.4f}",
                            loss=f"{last['train_loss']:.4f}")
            line = json.dumps(last)
            if args.json:
                print(line, flush=True)
            if out is not None:
                with open(out / METRICS_FILE, "a") as f:
                    f.write(line + "\n")
    except TrainingDiverged as e:
        bar.close()
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    bar.close()
    if out is not None:
        runner.save(out / "checkpoint.pt")
    print(summary_line(last, cfg.seeds), file=sys.stderr if args.json else sys.stdout)
    if not last.get("routing_healthy", True):
        print(f"note: routing outside the healthy band (Herfindahl {last['herfindahl']:.3f} "
              f"< 0.5 and mean max alpha {last['max_alpha']:.3f} in [0.3, 0.6] expected)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
