"""Train one configuration on each of its seeds, without Ray.

    python -m poh_tune.train [--config FILE] [key=value ...] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from poh_tune.config import ConfigError, TrialConfig, load_config, save_config
from poh_tune.fmt import MIN_CI_SEEDS, ci_shown, ci_text, config_label, distinct_digits, sig
from poh_tune.io import METRICS_FILE
from poh_tune.metrics import mean_ci95
from poh_tune.record import seed_value
from poh_tune.trainer import TrainingDiverged, TrialRunner

OUT_FILES = ("config.yaml", METRICS_FILE, "checkpoint.pt")  # what --out holds


def summary_lines(last: dict, cfg: TrialConfig, out: Path | None) -> list[str]:
    """The closing summary: what was trained (the keys that differ from the defaults), the test
    τ at the best dev epoch to 4 significant digits with its CI (fmt's small-n rule), each
    seed's value, and the files written. The whole configuration is in --out's config.yaml.

    Args:
        last: the last epoch's record (poh_tune.record).
        cfg: the configuration trained.
        out: the --out directory, None without one.
    """
    seeds = list(cfg.seeds)
    tests = [seed_value(last, "test_tau", s) for s in seeds]
    m, hw = mean_ci95(tests)
    n = len(tests)
    over = (f"95 % CI over {n} seeds" if ci_shown(n)
            else f"mean over {n} seed{'s' * (n != 1)}, CI n/a below {MIN_CI_SEEDS} seeds")
    digits = distinct_digits(tests)  # two seeds that differ never read the same
    per_seed = ", ".join(f"{s}: {sig(v, digits[v])}" for s, v in zip(seeds, tests, strict=True))
    lines = [f"trained {cfg.epochs} epochs on {n} seed{'s' * (n != 1)} "
             f"({config_label(cfg.to_dict(), TrialConfig().to_dict())})",
             f"test tau at best dev epoch: {ci_text(m, hw, n)} ({over}); per seed {per_seed}",
             f"all-pairs test tau {sig(last['test_tau_all'])}; perfect sort "
             f"{sig(last['test_perfect_sort'])}"]
    if out is not None:
        lines.append("written: " + ", ".join(str(out / f) for f in OUT_FILES))
    return lines


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
        save_config(cfg, out / OUT_FILES[0])
    runner = TrialRunner(cfg)
    bar = tqdm(total=cfg.epochs, desc="epochs", unit="ep", file=sys.stderr, dynamic_ncols=True)
    last: dict = {}
    try:
        while not runner.done:
            last = runner.run_epoch()
            bar.update(1)
            bar.set_postfix(tau=sig(last["tau"]), best=sig(last["best_tau"]),
                            loss=sig(last["train_loss"]))
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
        runner.save(out / OUT_FILES[2])
    print("\n".join(summary_lines(last, cfg, out)), file=sys.stderr if args.json else sys.stdout)
    if not last.get("routing_healthy", True):
        print(f"note: routing outside the healthy band (Herfindahl {sig(last['herfindahl'])} "
              f"< 0.5 and mean max alpha {sig(last['max_alpha'])} in [0.3, 0.6] expected)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
