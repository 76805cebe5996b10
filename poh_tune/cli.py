"""The launch command line: its arguments, and what a run will do, checked before Ray or torch load."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from poh_tune.config import ConfigError, parse_overrides, read_yaml
from poh_tune.io import (
    EXPERIMENT_FILE,
    RESULTS_FILE,
    STUDY_BACKENDS,
    TUNER_FILE,
    atomic_write_bytes,
    choose_backend,
)
from poh_tune.spaces import Space, grid_variants, load_space, resolve_space_path
from poh_tune.storage import RemoteStorage, StorageError, is_uri, local_path

DEFAULT_SPACE = {"grid": "document_grid.yaml", "optuna": "optuna_refine.yaml"}
# --pack auto without GPUs: configurations per pack (1 = off). On CPU a pack trains no faster
# than its configurations one after the other (README "Packing": measured), and separate
# trials spread over the CPUs; see docs/pack_measure.py.
CPU_DEFAULT_PACK = 1
# Tune checkpoints kept per trial: the best by the search metric (Ray also keeps the newest).
KEEP_CHECKPOINTS = 3
DESCRIPTION = ("`python -m poh_tune.launch grid|optuna|report`: run a search space on Ray Tune, "
               "write its results.")


class UsageError(Exception):
    """A user mistake outside a config file (paths, --resume, --address): exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m poh_tune.launch", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    commands = {"grid": "run the document's experiment grid (a fixed search space)",
                "optuna": "run an Optuna (TPE) search, ASHA stopping weak trials"}
    for cmd, what in commands.items():
        s = sub.add_parser(cmd, help=what, description=what)
        s.add_argument("space", nargs="?", help=f"search-space YAML (default: search_spaces/"
                                                f"{DEFAULT_SPACE[cmd]}); a bare name is looked up there")
        s.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                       help="changes to the base config, e.g. epochs=20")
        if cmd == "grid":
            s.add_argument("--experiment", action="append", default=None, metavar="NAME",
                           help="run only this experiment (repeatable); default: all")
        else:
            s.add_argument("--num-samples", type=int, default=None,
                           help="trials Optuna proposes (default: the space's num_samples)")
            s.add_argument("--seed", type=int, default=None, help="TPE seed")
            s.add_argument("--warm-start", default=None, metavar="GRID_DIR",
                           help="tell the study every configuration of this finished grid run "
                                "that lies in the space (same fixed keys) as a COMPLETE trial, "
                                "before TPE's first suggestion")
            s.add_argument("--study", choices=("auto", *STUDY_BACKENDS), default="auto",
                           help="the study's storage in the run directory: SQLite, or Optuna's "
                                "journal file (made for shared file systems); auto: journal on "
                                "NFS, Lustre, GPFS, CephFS and the like, else SQLite")
        s.add_argument("--name", default=None, help="run name (default: the space's name)")
        s.add_argument("--storage", default="poh_runs",
                       help="results root: a local folder (default ./poh_runs) or what Ray "
                            "accepts, s3://BUCKET/PATH, gs://..., a pyarrow file system URI")
        s.add_argument("--address", default=None, help="join this Ray cluster (HOST:PORT or "
                                                        "auto) instead of an embedded local one")
        s.add_argument("--dashboard", action="store_true",
                       help="start Ray's dashboard on 127.0.0.1 (embedded Ray; needs ray[default])")
        s.add_argument("--num-cpus", type=int, default=None,
                       help="CPUs of the embedded Ray (default: all)")
        s.add_argument("--cpus-per-trial", type=float, default=None,
                       help="CPUs Ray reserves for each trial; its torch threads (default: the "
                            "space's resources.cpu)")
        s.add_argument("--gpus-per-trial", type=float, default=None,
                       help="GPUs for each trial; a fraction packs several trials on a GPU "
                            "(default: the space's resources.gpu)")
        s.add_argument("--max-concurrent", type=int, default=None,
                       help="trials running at once; 0: as many as the resources allow "
                            "(default: the space's max_concurrent)")
        s.add_argument("--scheduler", choices=("fifo", "asha"), default=None,
                       help="fifo runs every trial to the end; asha stops weak ones early "
                            "(default: the space's scheduler)")
        s.add_argument("--checkpoint-every", type=int, default=1, metavar="EPOCHS",
                       help="epochs between trial checkpoints (one is also written at the end; "
                            "default 1)")
        s.add_argument("--keep-checkpoints", type=int, default=KEEP_CHECKPOINTS, metavar="N",
                       help="Tune checkpoints kept per trial: the N best by the search metric, "
                            f"and the newest (default {KEEP_CHECKPOINTS})")
        s.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                       help="seconds between progress lines (default 30)")
        s.add_argument("--reuse-actors", action="store_true",
                       help="keep trial processes for the next trial: many short trials start "
                            "several times faster (each new process imports torch)")
        s.add_argument("--pack", default="auto", metavar="auto|off|N",
                       help="train up to N grid configurations that share tensor shapes as one "
                            "trial (one ensemble); each keeps its own results row and files. "
                            "auto: with GPUs, those that share shapes, packs split until every "
                            "GPU slot of the cluster has a trial; off on CPU (default auto; "
                            "never packed with --scheduler asha or optuna)")
        s.add_argument("--max-failures", type=int, default=2,
                       help="retries of a trial whose process dies (from its last checkpoint)")
        s.add_argument("--mlflow", default=None, metavar="TRACKING_URI",
                       help="also log every configuration to this MLflow tracking server, as "
                            "one run in the experiment named after the run (needs "
                            "poh_tune[mlflow])")
        s.add_argument("--wandb", default=None, metavar="PROJECT",
                       help="also log every configuration to this W&B project, as one run "
                            "grouped by the run name; WANDB_MODE=offline writes the files only "
                            "(needs poh_tune[wandb])")
        s.add_argument("--resume", action="store_true", help="continue an interrupted run")
        s.add_argument("--smoke", action="store_true", help="a tiny task with the same structure")
        s.add_argument("--no-report", action="store_true", help="skip the report at the end")
    r = sub.add_parser("report", help="write the report of a finished experiment")
    r.add_argument("exp_dir", help="experiment directory written by grid or optuna")
    r.add_argument("--out", default=None, help="output directory (default: the experiment dir)")
    return p


def resolve(args: argparse.Namespace) -> tuple[Space, Path, dict[str, Any]]:
    """Validate everything before Ray starts.

    Returns:
        the space, the experiment dir, and the launch settings (a new run's are written to its
        poh_experiment.yaml; --resume reads them back from there and takes only the settings
        of how it runs, max_failures, reuse_actors and progress_every, from this command line).
        With a storage URI the experiment dir is a local mirror (a new temporary folder) and
        `args.remote` the storage (poh_tune.storage); else `args.remote` is None.
    """
    if args.space and "=" in args.space and not Path(args.space).exists():
        args.overrides.insert(0, args.space)  # `launch grid epochs=3`: no space given
        args.space = None
    if args.name is not None:
        check_name(args.name, "--name")
    if args.max_failures < 0:  # Ray reads a negative count as infinitely many retries
        raise UsageError(f"--max-failures={args.max_failures}: must be >= 0 (retries of a trial "
                         f"whose process dies)")
    args.remote = args.mirror = None
    if is_uri(args.storage):
        if args.command == "optuna":
            raise UsageError(f"--storage {args.storage}: launch optuna keeps its study in SQLite "
                             f"next to the trials, which cannot live in object storage; use a "
                             f"local or mounted folder (NFS, EFS) for --storage")
        try:
            args.remote = RemoteStorage(args.storage)
            args.remote.check_writable()  # reachable, existing, writable: before Ray starts
        except StorageError as e:
            raise UsageError(str(e)) from None
        # The driver's files are written here and uploaded (poh_tune.storage); launch removes it.
        storage = args.mirror = Path(tempfile.mkdtemp(prefix="poh_tune_mirror_"))
    else:
        storage = Path(local_path(args.storage)).expanduser().resolve()
    if not args.progress_every > 0:
        raise UsageError(f"--progress-every={args.progress_every}: must be > 0 (seconds)")
    space, exp_dir, launch = (_resolve_resume if args.resume else _resolve_new)(args, storage)
    launch["max_failures"] = args.max_failures
    launch["reuse_actors"] = args.reuse_actors
    for tracker in ("mlflow", "wandb"):  # a new run's, or --resume's own (else the record's)
        value = getattr(args, tracker, None)
        if value is not None and not value.strip():
            raise UsageError(f"--{tracker}={value!r}: must not be empty")
        launch[tracker] = value if value is not None else launch.get(tracker)
    launch["progress_every"] = args.progress_every
    return space, exp_dir, launch


def _resolve_resume(args: argparse.Namespace, storage: Path
                    ) -> tuple[Space, Path, dict[str, Any]]:
    """--resume: the run's own record says what it runs."""
    if args.name is None:
        raise UsageError("--resume needs --name RUN (the run to continue) "
                         f"under {storage}")
    exp_dir = storage / args.name
    remote = args.remote
    if remote is not None:
        name = args.name
        if not remote.exists(f"{name}/{TUNER_FILE}") or not remote.exists(
                f"{name}/{EXPERIMENT_FILE}"):
            raise UsageError(f"--resume: nothing to resume in {remote.where(name)} (no "
                             f"{TUNER_FILE} or {EXPERIMENT_FILE})")
        exp_dir.mkdir(parents=True)
        atomic_write_bytes(exp_dir / EXPERIMENT_FILE,
                           remote.read_bytes(f"{name}/{EXPERIMENT_FILE}"))
    try:
        info = read_experiment(exp_dir, tuner_checked=remote is not None)
    except UsageError as e:
        raise UsageError(f"--resume: {e}") from None
    if info["mode"] != args.command:
        raise UsageError(f"--resume: {exp_dir} is a {info['mode']} run, not {args.command}")
    launch = info["launch"]
    space = load_space(info["space_file"], launch["overrides"], launch["smoke"])
    if remote is None:
        check_storage(storage, args.storage)
    return space, exp_dir, launch


def read_experiment(exp_dir: Path, tuner_checked: bool = False) -> dict[str, Any]:
    """A resumable run's poh_experiment.yaml, checked (UsageError naming what is wrong).

    tuner_checked: Tune's tuner.pkl was found elsewhere (in remote storage; exp_dir mirrors it).
    """
    info_file = exp_dir / EXPERIMENT_FILE
    if not (tuner_checked or (exp_dir / TUNER_FILE).exists()) or not info_file.exists():
        raise UsageError(f"nothing to resume in {exp_dir} (no {TUNER_FILE} or "
                         f"{EXPERIMENT_FILE})")
    info = read_yaml(info_file)
    keys = ("mode", "space_file", "launch")
    if not isinstance(info, dict) or any(k not in info for k in keys) or not isinstance(
            info["launch"], dict) or any(k not in info["launch"] for k in ("overrides", "smoke")):
        raise UsageError(f"{info_file} is not a poh_tune experiment record "
                         f"(expected the keys {', '.join(keys)}); it was changed or damaged")
    return info


def _resolve_new(args: argparse.Namespace, storage: Path) -> tuple[Space, Path, dict[str, Any]]:
    """A new run: the space file, its overrides and the command line's settings."""
    if args.max_concurrent is not None and args.max_concurrent < 0:
        raise UsageError(f"--max-concurrent={args.max_concurrent}: must be >= 0")
    if args.checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every={args.checkpoint_every}: must be >= 1")
    if args.keep_checkpoints < 1:
        raise UsageError(f"--keep-checkpoints={args.keep_checkpoints}: must be >= 1 (Tune "
                         f"checkpoints kept per trial)")
    path = resolve_space_path(args.space, DEFAULT_SPACE[args.command],
                              args.overrides[0] if args.overrides else None)
    overrides = parse_overrides(args.overrides)
    space = load_space(path, overrides, args.smoke)
    if args.command == "grid" and not space.experiments:
        raise ConfigError(f"{path}: a grid space needs an 'experiments' section")
    if args.command == "optuna" and not space.search:
        raise ConfigError(f"{path}: an optuna space needs a 'search' section")
    name = args.name or (space.name + ("_smoke" if args.smoke else ""))
    check_name(name, f"{path}: name")
    exp_dir = storage / name
    held = (args.remote.exists(f"{name}/{TUNER_FILE}") if args.remote is not None
            else (exp_dir / TUNER_FILE).exists())
    if held:
        where = args.remote.where(name) if args.remote is not None else exp_dir
        raise UsageError(f"{where} holds a run already: continue it with --resume --name "
                         f"{name}, or choose another --name")
    cpu = args.cpus_per_trial if args.cpus_per_trial is not None else space.cpu
    gpu = args.gpus_per_trial if args.gpus_per_trial is not None else space.gpu
    if cpu <= 0 or gpu < 0:
        raise UsageError(f"--cpus-per-trial={cpu} must be > 0 and --gpus-per-trial={gpu} >= 0")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise UsageError(f"--num-cpus={args.num_cpus}: must be >= 1")
    local_cpus = args.num_cpus or os.cpu_count() or 1
    if args.address is None and cpu > local_cpus:  # no trial could ever start: Tune would wait
        raise UsageError(f"--cpus-per-trial={cpu}: the embedded Ray has {local_cpus} CPUs "
                         f"(--num-cpus); allowed: > 0 and <= {local_cpus}")
    seed = getattr(args, "seed", None)
    launch = {
        "smoke": args.smoke, "overrides": overrides,
        "experiment_names": getattr(args, "experiment", None),
        "cpu": cpu, "gpu": gpu, "checkpoint_every": args.checkpoint_every,
        "keep_checkpoints": args.keep_checkpoints,
        "max_concurrent": (args.max_concurrent if args.max_concurrent is not None
                           else space.max_concurrent),
        "scheduler": args.scheduler or space.scheduler,
        "num_samples": (space.num_samples if getattr(args, "num_samples", None) is None
                        else args.num_samples),
        "seed": seed if seed is not None else space.seed,
    }
    if launch["num_samples"] < 1:
        raise UsageError(f"--num-samples={launch['num_samples']}: must be >= 1")
    launch["pack"] = _pack_size(args, space, launch)
    # The packs themselves are planned when Ray has started (its GPU slots): launch.run.
    launch["pack_auto"] = args.pack == "auto" and launch["pack"] > 1
    if args.remote is None:
        check_storage(storage, args.storage)
    if args.command == "optuna":
        launch["study_name"] = name
        launch["study_backend"] = choose_backend(args.study, storage)
        launch["warm_start"] = check_warm_start(args.warm_start)
    return space, exp_dir, launch


def check_warm_start(given: str | None) -> str | None:
    """--warm-start GRID_DIR: a finished grid run (its record says grid, its results.csv is
    written); returns the resolved path."""
    if given is None:
        return None
    grid = Path(given).expanduser().resolve()
    record = grid / EXPERIMENT_FILE
    info = read_yaml(record) if record.is_file() else None
    if not isinstance(info, dict) or info.get("mode") != "grid":
        raise UsageError(f"--warm-start {given}: not a grid run directory (no {EXPERIMENT_FILE} "
                         f"saying mode: grid in {grid})")
    if not (grid / RESULTS_FILE).is_file():
        raise UsageError(f"--warm-start {given}: the grid has not finished (no {RESULTS_FILE}); "
                         f"finish it with --resume first")
    return str(grid)


def _pack_size(args: argparse.Namespace, space: Space, launch: dict[str, Any]) -> int:
    """--pack resolved to the most configurations per trial; 1 where trials are never packed."""
    pack = parse_pack(args.pack)
    if args.command == "grid":
        variants, _ = grid_variants(space, launch["experiment_names"])  # unknown names fail here
    if args.command == "optuna" or launch["scheduler"] == "asha":
        if isinstance(pack, int) and pack > 1:
            who = ("launch optuna: the searcher" if args.command == "optuna"
                   else "--scheduler asha: ASHA")
            raise UsageError(f"--pack {args.pack}: {who} decides per configuration, so its "
                             f"trials are never packed; use --pack off")
        return 1
    if pack == "auto":
        return len(variants) if launch["gpu"] > 0 else CPU_DEFAULT_PACK
    return pack


def parse_pack(value: str) -> str | int:
    """--pack: "auto", or the most configurations per trial (off = 1)."""
    if value in ("auto", "off"):
        return 1 if value == "off" else value
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--pack={value!r}: expected auto, off or an integer >= 1")
    return int(value)


def check_name(name: str, what: str) -> None:
    """A run name is one folder under --storage: `../x` or `a/b` would write elsewhere."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise UsageError(f"{what} {name!r}: must be a single folder name under --storage "
                         f"(no '/', not '.' or '..')")


def check_storage(storage: Path, given: str) -> None:
    """--storage must be a directory or creatable as one, checked before Ray starts.

    Probed by creating (and removing) a temporary folder in the nearest existing ancestor:
    permission bits say nothing for root, read-only mounts or /proc.
    """
    if storage.exists() and not storage.is_dir():
        raise UsageError(f"--storage {given}: is a file; expected a directory (created if "
                         f"missing)")
    probe_in = storage
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise UsageError(f"--storage {given}: {probe_in} is a file; expected a directory "
                         f"(created if missing)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".poh_probe_", dir=probe_in))
    except OSError as e:
        raise UsageError(f"--storage {given}: cannot create a directory in {probe_in} "
                         f"({e.strerror or e})") from None


def experiment_info(command: str, space: Space, launch: dict[str, Any]) -> dict[str, Any]:
    """The run's record, poh_experiment.yaml: what --resume and the report read back."""
    names = launch["experiment_names"]
    # "swept": the one key (as before cross-product sweeps), or the list of keys of a product.
    exps = {e.name: {"swept": e.swept if len(e.keys) <= 1 else list(e.keys),
                     "description": e.description}
            for e in space.experiments if not names or e.name in names}
    return {"mode": command, "space_file": str(space.path), "metric": space.metric,
            "metric_mode": space.metric_mode, "experiments": exps if command == "grid" else {},
            "base_config": space.base.to_dict(), "launch": launch}


def hparam_domains(command: str, space: Space, launch: dict[str, Any]
                   ) -> dict[str, dict[str, Any]]:
    """Swept key -> {"values": [...]} (grid points, Optuna choices) or {"low", "high"} (Optuna)."""
    if command == "grid":
        variants, _ = grid_variants(space, launch["experiment_names"])
        return {k: {"values": sorted({v[k] for v in variants}, key=lambda x: (str(type(x)), x))}
                for k in variants[0]}
    return {k: ({"values": list(s["values"])} if s["type"] == "choice"
                else {"low": s["low"], "high": s["high"]}) for k, s in space.search.items()}
