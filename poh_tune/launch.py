"""`python -m poh_tune.launch grid|optuna|report`: run a search space on Ray Tune, write its results.

Kept short: the arguments and what they resolve to are in poh_tune.cli, Ray and the Tuner in
poh_tune.tuner, results.csv, best_config.yaml and the report in poh_tune.results. Bad input exits
2 before Ray or torch is imported.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from poh_tune import trackers, tuner
from poh_tune.cli import UsageError, build_parser, experiment_info, hparam_domains, resolve
from poh_tune.config import ConfigError
from poh_tune.io import EXPERIMENT_FILE, TUNER_FILE, atomic_write_text
from poh_tune.results import finish, report_command, report_interrupted
from poh_tune.spaces import grid_variants
from poh_tune.storage import RemoteStorage, StorageError
from poh_tune.tblog import write_hparams_experiment


def plan_line(n_configs: int, packs: list[list[int]], gpu: float, slots: int) -> str:
    """The pack plan in one line: N configurations in M trials on K GPU slots."""
    where = f"on {slots} GPU slots" if gpu > 0 else "on CPUs"
    return f"pack plan: {n_configs} configurations in {len(packs)} trials {where}"


class _MirroredResult:
    """A Tune result whose trial folder is read from the local mirror of remote storage."""

    def __init__(self, r: Any, path: Path):
        self.path, self.error, self.metrics, self.config = str(path), r.error, r.metrics, r.config


def mirror_results(results, remote: RemoteStorage, exp_dir: Path
                   ) -> tuple[list[_MirroredResult], dict[str, tuple[int, int]]]:
    """Download the experiment (no checkpoints) into exp_dir; the results with local folders.

    Returns:
        the results, and the mirror's file states for RemoteStorage.upload_changed.
    """
    before = remote.download(exp_dir.name, exp_dir)
    stored = remote.path(exp_dir.name)
    out = []
    for r in results:
        rel = str(r.path)[len(stored):].lstrip("/") if str(r.path).startswith(stored) \
            else Path(r.path).name
        out.append(_MirroredResult(r, exp_dir / rel))
    return out, before


def run(args: argparse.Namespace) -> int:
    """One command; returns its exit status (0 done, 1 a trial errored, 130 interrupted)."""
    if args.command == "report":
        return report_command(Path(args.exp_dir), args.out)
    space, exp_dir, launch = resolve(args)
    try:
        tracking = trackers.prepare(launch.get("mlflow"), launch.get("wandb"), exp_dir.name)
    except trackers.TrackerError as e:
        raise UsageError(str(e)) from None
    remote: RemoteStorage | None = args.remote  # a storage URI; exp_dir is then its mirror
    shown = remote.where(exp_dir.name) if remote is not None else str(exp_dir)
    tuner.check_dashboard(args.dashboard, args.address)
    if args.address is not None:
        args.address = tuner.check_address(args.address)
    variants, membership = grid_variants(space, launch["experiment_names"]) \
        if args.command == "grid" else ([{}], {})
    print(f"experiment dir: {shown}\n  tensorboard --logdir {shown}", flush=True)
    tuner.start_ray(args.address, args.num_cpus, args.dashboard)
    tuner.check_trial_fits(launch["cpu"], launch["gpu"], embedded=args.address is None)
    if args.command == "grid":
        if not args.resume:  # a resumed run keeps its recorded plan, whatever the cluster now
            launch["gpu_slots"] = tuner.gpu_slots(launch["gpu"])
            launch["packs"] = tuner.pack_plan(space, launch, launch["gpu_slots"])
        if "packs" in launch:
            print(plan_line(len(variants), launch["packs"], launch["gpu"],
                            int(launch.get("gpu_slots", 0))), flush=True)
    trainable = tuner.make_trainable(space, launch, membership, tracking)
    if args.resume:
        run_tuner = tuner.restore_tuner(args.command, space, launch, exp_dir, trainable, remote)
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(exp_dir / EXPERIMENT_FILE,
                          yaml.safe_dump(experiment_info(args.command, space, launch),
                                         sort_keys=False))
        write_hparams_experiment(exp_dir, space.base.to_dict(),
                                 hparam_domains(args.command, space, launch))
        if remote is not None:
            remote.upload_changed(exp_dir, exp_dir.name, {})
        run_tuner = tuner.make_tuner(args.command, space, launch, exp_dir, trainable, remote)
    storage_arg = shlex.quote(args.storage) if remote is not None else str(exp_dir.parent)
    resume_line = (f"python -m poh_tune.launch {args.command} --resume --name {exp_dir.name} "
                   f"--storage {storage_arg}"
                   + (f" --address {args.address}" if args.address else ""))
    try:
        with tuner.interruption_watch() as interrupted:
            results = run_tuner.fit()
            was_interrupted = interrupted()  # here: leaving the block puts the old handler back
    except KeyboardInterrupt:  # a second Ctrl-C while Tune saved its state, or one before
        resumable = (remote.exists(f"{exp_dir.name}/{TUNER_FILE}") if remote is not None
                     else (exp_dir / TUNER_FILE).exists())  # Tune registered the experiment
        print("\ninterrupted; " + (f"continue with: {resume_line}" if resumable else
                                   "the run had not started, there is nothing to resume"),
              file=sys.stderr)
        return 130
    before: dict[str, tuple[int, int]] = {}
    if remote is not None:
        results, before = mirror_results(results, remote, exp_dir)
    if was_interrupted:
        expected = len(variants) if args.command == "grid" else launch["num_samples"]
        rc = report_interrupted(results, expected, space.base.epochs, resume_line)
    else:
        rc = finish(args.command, space, exp_dir, results, args.no_report,
                    shown=None if remote is None else shown)
        if remote is not None:
            n = remote.upload_changed(exp_dir, exp_dir.name, before)
            print(f"{n} files written to {shown}")
    for line in trackers.after_run(tracking, exp_dir):
        print(line, file=sys.stderr)
    return rc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, UsageError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before Tune started: an earlier run is as it was
        print("interrupted before the run started" + (
            "; the run is as it was, continue it with --resume" if args.resume
            else "; there is nothing to resume"), file=sys.stderr)
        return 130
    finally:
        if getattr(args, "mirror", None) is not None:  # remote storage's local mirror
            shutil.rmtree(args.mirror, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
