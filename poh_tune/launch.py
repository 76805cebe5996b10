"""`python -m poh_tune.launch grid|optuna|report`: run a search space on Ray Tune, write its results.

Kept short: the arguments and what they resolve to are in poh_tune.cli, Ray and the Tuner in
poh_tune.tuner, results.csv, best_config.yaml and the report in poh_tune.results. Bad input exits
2 before Ray or torch is imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from poh_tune import trackers, tuner
from poh_tune.cli import UsageError, build_parser, experiment_info, hparam_domains, resolve
from poh_tune.config import ConfigError
from poh_tune.io import EXPERIMENT_FILE, TUNER_FILE, atomic_write_text
from poh_tune.results import finish, report_command, report_interrupted
from poh_tune.spaces import grid_variants
from poh_tune.tblog import write_hparams_experiment


def run(args: argparse.Namespace) -> int:
    """One command; returns its exit status (0 done, 1 a trial errored, 130 interrupted)."""
    if args.command == "report":
        return report_command(Path(args.exp_dir), args.out)
    space, exp_dir, launch = resolve(args)
    try:
        tracking = trackers.prepare(launch.get("mlflow"), launch.get("wandb"), exp_dir.name)
    except trackers.TrackerError as e:
        raise UsageError(str(e)) from None
    tuner.check_dashboard(args.dashboard, args.address)
    if args.address is not None:
        args.address = tuner.check_address(args.address)
    variants, membership = grid_variants(space, launch["experiment_names"]) \
        if args.command == "grid" else ([{}], {})
    print(f"experiment dir: {exp_dir}\n  tensorboard --logdir {exp_dir}", flush=True)
    tuner.start_ray(args.address, args.num_cpus, args.dashboard)
    tuner.check_trial_fits(launch["cpu"], launch["gpu"], embedded=args.address is None)
    trainable = tuner.make_trainable(space, launch, membership, tracking)
    if args.resume:
        run_tuner = tuner.restore_tuner(args.command, space, launch, exp_dir, trainable)
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(exp_dir / EXPERIMENT_FILE,
                          yaml.safe_dump(experiment_info(args.command, space, launch),
                                         sort_keys=False))
        write_hparams_experiment(exp_dir, space.base.to_dict(),
                                 hparam_domains(args.command, space, launch))
        run_tuner = tuner.make_tuner(args.command, space, launch, exp_dir, trainable)
    resume_line = (f"python -m poh_tune.launch {args.command} --resume --name {exp_dir.name} "
                   f"--storage {exp_dir.parent}"
                   + (f" --address {args.address}" if args.address else ""))
    try:
        with tuner.interruption_watch() as interrupted:
            results = run_tuner.fit()
            was_interrupted = interrupted()  # here: leaving the block puts the old handler back
    except KeyboardInterrupt:  # a second Ctrl-C while Tune saved its state, or one before
        resumable = (exp_dir / TUNER_FILE).exists()  # Tune registered the experiment
        print("\ninterrupted; " + (f"continue with: {resume_line}" if resumable else
                                   "the run had not started, there is nothing to resume"),
              file=sys.stderr)
        return 130
    if was_interrupted:
        expected = len(variants) if args.command == "grid" else launch["num_samples"]
        rc = report_interrupted(results, expected, space.base.epochs, resume_line)
    else:
        rc = finish(args.command, space, exp_dir, results, args.no_report)
    for line in trackers.after_run(tracking, exp_dir):
        print(line, file=sys.stderr)
    return rc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before Tune started: an earlier run is as it was
        print("interrupted before the run started" + (
            "; the run is as it was, continue it with --resume" if args.resume
            else "; there is nothing to resume"), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
