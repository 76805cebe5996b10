"""`python -m poh_tune.launch grid|optuna|report`: run a search space on Ray Tune, write its results."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml

from poh_tune.config import ConfigError, TrialConfig, from_dict, parse_overrides, read_yaml
from poh_tune.io import atomic_write_text, read_metrics
from poh_tune.spaces import (
    Space,
    canonical,
    grid_variants,
    load_space,
    pack_variants,
    resolve_space_path,
)

EXPERIMENT_FILE = "poh_experiment.yaml"
METRICS_FILE = "metrics.jsonl"  # = poh_tune.trainable.METRICS_FILE (not imported: no ray/torch
TRIAL_FILE = "poh_trial.yaml"  # import before the arguments are validated)
# What ray.dashboard.optional_deps imports first (checked without importing ray).
DASHBOARD_DEPS = ("aiohttp", "aiohttp_cors", "opencensus", "prometheus_client")
DEFAULT_SPACE = {"grid": "document_grid.yaml", "optuna": "optuna_refine.yaml"}
# Columns of results.csv taken from a trial's last logged epoch ("final_") and its best epoch.
FINAL_KEYS = ("tau", "tau_all", "tau_ci95", "accuracy", "perfect_sort", "train_loss",
              "herfindahl", "max_alpha", "routing_healthy")
BEST_KEYS = ("best_tau", "best_epoch", "test_tau", "test_tau_ci95", "test_tau_all",
             "test_accuracy", "test_perfect_sort")
# --pack auto without GPUs: configurations per pack (1 = off). On CPU a pack trains no faster
# than its configurations one after the other (README "Packing": measured), and separate
# trials spread over the CPUs; see docs/pack_measure.py.
CPU_DEFAULT_PACK = 1


class UsageError(Exception):
    """A user mistake outside a config file (paths, --resume, --address): exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m poh_tune.launch", description=__doc__)
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
        s.add_argument("--name", default=None, help="run name (default: the space's name)")
        s.add_argument("--storage", default="poh_runs", help="results root (default ./poh_runs)")
        s.add_argument("--address", default=None, help="join this Ray cluster instead of an "
                                                        "embedded local one")
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
        s.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                       help="seconds between progress lines (default 30)")
        s.add_argument("--reuse-actors", action="store_true",
                       help="keep trial processes for the next trial: many short trials start "
                            "several times faster (each new process imports torch)")
        s.add_argument("--pack", default="auto", metavar="auto|off|N",
                       help="train up to N grid configurations that share tensor shapes as one "
                            "trial (one ensemble); each keeps its own results row and files. "
                            "auto: all that share shapes when trials have GPUs, off on CPU "
                            "(default auto; never packed with --scheduler asha or optuna)")
        s.add_argument("--max-failures", type=int, default=2,
                       help="retries of a trial whose process dies (from its last checkpoint)")
        s.add_argument("--resume", action="store_true", help="continue an interrupted run")
        s.add_argument("--smoke", action="store_true", help="a tiny task with the same structure")
        s.add_argument("--no-report", action="store_true", help="skip the report at the end")
    r = sub.add_parser("report", help="write the report of a finished experiment")
    r.add_argument("exp_dir", help="experiment directory written by grid or optuna")
    r.add_argument("--out", default=None, help="output directory (default: the experiment dir)")
    return p


# --- what to run ----------------------------------------------------------------------------------
def resolve(args: argparse.Namespace) -> tuple[Space, Path, dict[str, Any]]:
    """Validate everything before Ray starts. Returns the space, the experiment dir, launch info."""
    if args.space and "=" in args.space and not Path(args.space).exists():
        args.overrides.insert(0, args.space)  # `launch grid epochs=3`: no space given
        args.space = None
    if args.name is not None:
        check_name(args.name, "--name")
    if args.max_failures < 0:  # Ray reads a negative count as infinitely many retries
        raise UsageError(f"--max-failures={args.max_failures}: must be >= 0 (retries of a trial "
                         f"whose process dies)")
    storage = Path(args.storage).expanduser().resolve()
    if not args.progress_every > 0:
        raise UsageError(f"--progress-every={args.progress_every}: must be > 0 (seconds)")
    if args.resume:
        if args.name is None:
            raise UsageError("--resume needs --name RUN (the run to continue) "
                             f"under {storage}")
        exp_dir = storage / args.name
        info_file = exp_dir / EXPERIMENT_FILE
        if not (exp_dir / "tuner.pkl").exists() or not info_file.exists():
            raise UsageError(f"--resume: nothing to resume in {exp_dir} (no tuner.pkl or "
                             f"{EXPERIMENT_FILE})")
        info = read_yaml(info_file)
        keys = ("mode", "space_file", "launch")
        if not isinstance(info, dict) or any(k not in info for k in keys) or not isinstance(
                info["launch"], dict) or any(k not in info["launch"] for k in ("overrides", "smoke")):
            raise UsageError(f"--resume: {info_file} is not a poh_tune experiment record "
                             f"(expected the keys {', '.join(keys)}); it was changed or damaged")
        if info["mode"] != args.command:
            raise UsageError(f"--resume: {exp_dir} is a {info['mode']} run, not {args.command}")
        launch = info["launch"]
        space = load_space(info["space_file"], launch["overrides"], launch["smoke"])
        check_storage(storage, args.storage)
        return space, exp_dir, launch
    if args.max_concurrent is not None and args.max_concurrent < 0:
        raise UsageError(f"--max-concurrent={args.max_concurrent}: must be >= 0")
    if args.checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every={args.checkpoint_every}: must be >= 1")
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
    if (exp_dir / "tuner.pkl").exists():
        raise UsageError(f"{exp_dir} holds a run already: continue it with --resume --name "
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
    launch = {
        "smoke": args.smoke, "overrides": overrides,
        "experiment_names": getattr(args, "experiment", None),
        "cpu": cpu, "gpu": gpu, "checkpoint_every": args.checkpoint_every,
        "max_concurrent": (args.max_concurrent if args.max_concurrent is not None
                           else space.max_concurrent),
        "scheduler": args.scheduler or space.scheduler,
        "num_samples": (space.num_samples if getattr(args, "num_samples", None) is None
                        else args.num_samples),
        "seed": getattr(args, "seed", None) if getattr(args, "seed", None) is not None
        else space.seed,
    }
    if launch["num_samples"] < 1:
        raise UsageError(f"--num-samples={launch['num_samples']}: must be >= 1")
    pack = parse_pack(args.pack)
    if args.command == "grid":
        variants, _ = grid_variants(space, launch["experiment_names"])  # unknown names fail here
    if args.command == "optuna" or launch["scheduler"] == "asha":
        if isinstance(pack, int) and pack > 1:
            who = ("launch optuna: the searcher" if args.command == "optuna"
                   else "--scheduler asha: ASHA")
            raise UsageError(f"--pack {args.pack}: {who} decides per configuration, so its "
                             f"trials are never packed; use --pack off")
        pack = 1
    elif pack == "auto":
        pack = len(variants) if gpu > 0 else CPU_DEFAULT_PACK
    launch["pack"] = pack
    check_storage(storage, args.storage)
    return space, exp_dir, launch


def parse_pack(value: str) -> str | int:
    """--pack: "auto", or the most configurations per trial (off = 1)."""
    if value in ("auto", "off"):
        return 1 if value == "off" else value
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--pack={value!r}: expected auto, off or an integer >= 1")
    return int(value)


def grid_param_space(space: Space, launch: dict[str, Any]
                     ) -> tuple[dict[str, Any], list[dict[str, Any]] | None, int]:
    """A grid's Tune param_space, the points to evaluate, and Tune's num_samples.

    Unpacked: one trial per configuration (its swept params, as preset points). Packed: a grid
    search over packs, each trial's config {"pack": [params, ...]} (spaces.pack_variants);
    packs cannot be preset points, which Tune assigns leaf by leaf onto the first point's shape.
    """
    from ray import tune

    variants, _ = grid_variants(space, launch["experiment_names"])
    size = int(launch.get("pack", 1))
    if size <= 1:
        return dict(variants[0]), variants, len(variants)
    packs = [[variants[i] for i in p] for p in pack_variants(space.base, variants, size)]
    return {"pack": tune.grid_search(packs)}, None, 1


def hparam_domains(command: str, space: Space, launch: dict[str, Any]
                   ) -> dict[str, dict[str, Any]]:
    """Swept key -> {"values": [...]} (grid points, Optuna choices) or {"low", "high"} (Optuna)."""
    if command == "grid":
        variants, _ = grid_variants(space, launch["experiment_names"])
        return {k: {"values": sorted({v[k] for v in variants}, key=lambda x: (str(type(x)), x))}
                for k in variants[0]}
    return {k: ({"values": list(s["values"])} if s["type"] == "choice"
                else {"low": s["low"], "high": s["high"]}) for k, s in space.search.items()}


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
    names = launch["experiment_names"]
    exps = {e.name: {"swept": e.swept, "description": e.description}
            for e in space.experiments if not names or e.name in names}
    return {"mode": command, "space_file": str(space.path), "metric": space.metric,
            "metric_mode": space.metric_mode, "experiments": exps if command == "grid" else {},
            "base_config": space.base.to_dict(), "launch": launch}


# --- Ray ------------------------------------------------------------------------------------------
# ray.init against an address where no Ray head answers retries for minutes ("Failed to get
# cluster ID from GCS server: TimedOut"); poh_tune gives up after this many seconds.
ADDRESS_TIMEOUT_S = float(os.environ.get("POH_TUNE_ADDRESS_TIMEOUT_S", "30"))


def ray_address_file() -> Path:
    """Where `ray start` records the last cluster it started (Ray's own lookup for "auto")."""
    tmp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith(
        "linux") else None) or "/tmp"
    return Path(tmp) / "ray" / "ray_current_cluster"


def check_address(address: str) -> str:
    """Fail in seconds with one clear line (before Ray is imported), not after Ray's minutes of
    retries, when nothing answers at --address HOST:PORT, or at the address "auto" stands for.

    Returns:
        the address to join: HOST:PORT ("auto" resolved as Ray would: RAY_ADDRESS, then the
        address file of the last `ray start`), or "auto" when neither exists (Ray then looks for
        a running head itself and says so quickly when there is none).
    """
    given, source = address, ""
    if address == "auto":
        env, file = os.environ.get("RAY_ADDRESS", ""), ray_address_file()
        if env and env != "auto":
            address, source = env, " (from RAY_ADDRESS)"
        elif file.is_file():
            text = file.read_text().strip()
            address = text.splitlines()[0] if text else ""
            source = f" (from {file}, left by the last `ray start`; a stopped cluster leaves it)"
        else:
            return "auto"
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {given!r}{source}: expected HOST:PORT of a Ray head")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UsageError(f"--address {given}: no Ray head answers at {address}{source} "
                         f"({e})") from None
    return address


def check_dashboard(args: argparse.Namespace) -> None:
    """--dashboard: embedded Ray only, and Ray's dashboard packages must be installed."""
    if not getattr(args, "dashboard", False):
        return
    if args.address is not None:
        raise UsageError("--dashboard starts the embedded Ray's dashboard; a cluster joined with "
                         "--address keeps its own")
    import importlib.util

    missing = [m for m in DASHBOARD_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"--dashboard needs Ray's dashboard packages (missing: "
                         f"{', '.join(missing)}): pip install 'ray[default]'")


def start_ray(address: str | None, num_cpus: int | None, dashboard: bool = False) -> None:
    # Read when Tune starts: our own TensorBoard writer
    # (one event per epoch even after a restore) instead of Ray's.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # num_to_keep forces a state snapshot per kept checkpoint; with sub-second smoke epochs Ray
    # warns about it on every epoch. Real epochs take seconds to minutes.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    host = (address or "").rpartition(":")[0]
    if address is None or host in ("127.0.0.1", "localhost"):
        # Single-node mode, every port on 127.0.0.1 (for a loopback head: else Ray rewrites
        # 127.0.0.1 to this machine's network address and connects there). Ray reads this once,
        # when ray is first imported, into ray_constants.ENABLE_RAY_CLUSTER: set before the
        # import, and on the constant where something imported ray already.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if "ray" in sys.modules:
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
    if address is None:
        # Ray 2.60 turns on token authentication for a new local cluster and warns about it on
        # every start. Keep it (any local user can reach loopback ports) and say so, quietly.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if address is None:
        # The dashboard only when asked for, and then on loopback (Ray's default binds it to
        # all interfaces when the node is not single-node).
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                 include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=False)
        return
    def give_up() -> None:  # ray.init blocks in native code: only leaving the process stops it
        print(f"error: --address {address}: no Ray cluster answered within "
              f"{ADDRESS_TIMEOUT_S:g} s; check the address (and RAY_AUTH_MODE=token for a head "
              f"started with `ray start`)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)

    watchdog = threading.Timer(ADDRESS_TIMEOUT_S, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as e:  # unreachable address, refused auth, ...
        raise UsageError(f"--address {address}: cannot join the Ray cluster "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         ) from None
    finally:
        watchdog.cancel()


def check_trial_fits(cpu: float, gpu: float, embedded: bool) -> None:
    """A trial that no node can hold would wait forever: an error on the embedded Ray (which
    cannot grow), a warning on a cluster (an autoscaler may still add such a node)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpu and r.get("GPU", 0) >= gpu for r in nodes):
        return
    have = ", ".join(f"{r.get('CPU', 0):g} CPU / {r.get('GPU', 0):g} GPU" for r in nodes)
    msg = (f"--cpus-per-trial={cpu:g} --gpus-per-trial={gpu:g}: no node of this Ray has that "
           f"much (nodes: {have}); lower the per-trial share")
    if embedded:
        ray.shutdown()
        raise UsageError(msg)
    print(f"warning: {msg}; trials wait until such a node joins", file=sys.stderr)


def make_trainable(space: Space, launch: dict[str, Any], membership: dict[str, list[str]]):
    from ray import tune

    from poh_tune.trainable import train_pack, train_trial

    if int(launch.get("pack", 1)) > 1:
        fn = tune.with_parameters(train_pack, base=space.base.to_dict(), membership=membership,
                                  checkpoint_every=launch["checkpoint_every"],
                                  metric=space.metric, mode=space.metric_mode)
    else:
        fn = tune.with_parameters(train_trial, base=space.base.to_dict(), membership=membership,
                                  checkpoint_every=launch["checkpoint_every"])
    return tune.with_resources(fn, {"cpu": launch["cpu"], "gpu": launch["gpu"]})


def make_tuner(command: str, space: Space, launch: dict[str, Any], exp_dir: Path, trainable):
    import numpy as np
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    # Grid points are presets over constant values; Ray warns for every one that differs.
    logging.getLogger("ray.tune.search.variant_generator").setLevel(logging.ERROR)
    np.random.seed(launch["seed"])  # ASHA draws its brackets from NumPy's global state
    epochs = space.base.epochs
    if launch["scheduler"] == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs,
                                  grace_period=min(space.grace_period, epochs),
                                  reduction_factor=space.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    max_conc = launch["max_concurrent"]
    if command == "grid":
        param_space, points, num_samples = grid_param_space(space, launch)
        search_alg = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_conc)
        n_trials = num_samples if points is not None else len(param_space["pack"]["grid_search"])
    else:
        from optuna.samplers import TPESampler

        from poh_tune.search import PohOptunaSearch, distributions, study_storage

        searcher = PohOptunaSearch(
            space=distributions(space.search), metric=space.metric, mode=space.metric_mode,
            sampler=TPESampler(seed=launch["seed"]), study_name=exp_dir.name,
            storage=study_storage(exp_dir), epochs=epochs)
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=max_conc or 2)
        param_space = {}
        num_samples = n_trials = launch["num_samples"]
    from poh_tune.progress import ProgressLine

    reporter = ProgressLine(exp_dir, n_trials, epochs,
                            every_s=float(launch.get("progress_every", 30.0)), metric=space.metric,
                            mode=space.metric_mode, asha=launch["scheduler"] == "asha")
    run_config = tune.RunConfig(
        name=exp_dir.name, storage_path=str(exp_dir.parent),
        failure_config=tune.FailureConfig(max_failures=launch.get("max_failures", 2)),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=3),
        callbacks=[JsonLoggerCallback(), CSVLoggerCallback()], progress_reporter=reporter,
        verbose=1)
    tune_config = tune.TuneConfig(metric=space.metric, mode=space.metric_mode,
                                  search_alg=search_alg, scheduler=scheduler,
                                  num_samples=num_samples,
                                  reuse_actors=bool(launch.get("reuse_actors", False)))
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=run_config)


# --- results --------------------------------------------------------------------------------------
def _csv_text(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def collect(results, epochs_of: dict[str, int]) -> list[dict[str, Any]]:
    """One row per configuration from Tune's ResultGrid and each configuration's own files.

    A trial is one configuration (its folder is the trial's) or a pack of them (its k-th
    configuration's folder is <trial folder>/c<k>/, trial_id <pack id>_c<k>).
    """
    rows = []
    for order, r in enumerate(results):  # Tune's trials in the order it created them
        trial_dir = Path(r.path)
        error = None if r.error is None else str(r.error).strip().splitlines()[-1][:500]
        pack = (r.config or {}).get("pack")
        tune_id = (r.metrics or {}).get("trial_id") or trial_dir.name
        if isinstance(pack, list) and len(pack) > 1:
            for k in range(len(pack)):
                folder = trial_dir / f"c{k}"  # = poh_tune.trainable.config_folder(k)
                rows.append(_row(folder, f"{tune_id}_c{k}", error, epochs_of, order,
                                 tune_id))
        else:
            rows.append(_row(trial_dir, tune_id, error, epochs_of, order))
    return sorted(rows, key=lambda x: x["trial_id"])


def _row(folder: Path, fallback_id: str, error: str | None, epochs_of: dict[str, int],
         order: int, pack_id: str = "") -> dict[str, Any]:
    """One configuration's results.csv row; `error`: its trial's (a pack's: every member's,
    unless the member diverged: then its own message); `order`: its Tune trial's place in
    Tune's creation order (a pack's members share it)."""
    info = yaml.safe_load((folder / TRIAL_FILE).read_text()) if (
        folder / TRIAL_FILE).exists() else {}
    cfg = info.get("config") or {}
    trial_id = info.get("trial_id") or fallback_id
    diverged = folder / ".diverged"  # = poh_tune.trainable.DIVERGED_FILE (a pack's member)
    if pack_id and diverged.is_file():  # its own divergence, also when the whole pack ended
        # Worded as Ray words a single diverged trial's error (the exception's last line).
        error = ("poh_tune.trainer.TrainingDiverged: "
                 + diverged.read_text().strip().splitlines()[-1])[:500]
    hist = read_metrics(folder / METRICS_FILE)
    last = hist[-1] if hist else {}
    done = int(last.get("epoch", 0))
    epochs = int(cfg.get("epochs", epochs_of.get(trial_id, 0)) or 0)
    row: dict[str, Any] = {
        "trial_id": trial_id, "pack_id": info.get("pack_id", pack_id), "trial_order": order,
        "status": "ERROR" if error else "TERMINATED",
        "experiments": ";".join(info.get("experiments") or []),
        "epochs_done": done, "stopped_early": error is None and done < epochs,
        "error": error or "", "trial_dir": str(folder)}
    row.update({f"config.{k}": (v if not isinstance(v, list) else " ".join(map(str, v)))
                for k, v in cfg.items()})
    row.update({f"final_{k}": last.get(k, "") for k in FINAL_KEYS})
    row.update({k: last.get(k, "") for k in BEST_KEYS})
    return row


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """Best trial by the metric at its last epoch, among trials that ran every epoch.

    A tie goes to the earliest trial reaching the best value, as Optuna's best_trial and Ray's
    get_best_result break it: the lowest Optuna trial number (`optuna_trial`) where there is one,
    else the first in Tune's creation order (`trial_order`). Trial ids are random: no order.
    """
    def score(r):
        v = r.get(f"final_{metric}", r.get(metric, ""))
        return float(v) if v != "" and math.isfinite(float(v)) else None

    ok = [r for r in rows if r["status"] == "TERMINATED" and not r["stopped_early"]
          and score(r) is not None]
    if not ok:
        return None
    sign = -1.0 if mode == "max" else 1.0

    def earliest(r):
        n = r.get("optuna_trial", "")
        return int(n) if n != "" else int(r.get("trial_order", sys.maxsize))

    return min(ok, key=lambda r: (sign * score(r), earliest(r), str(r["trial_id"])))


def config_of(row: dict[str, Any]) -> TrialConfig:
    """A row's configuration: its poh_trial.yaml's, else parsed from its config columns."""
    spec = Path(row.get("trial_dir", "")) / TRIAL_FILE
    info = read_yaml(spec) if row.get("trial_dir") and spec.is_file() else None
    if isinstance(info, dict) and isinstance(info.get("config"), dict):
        return from_dict(info["config"])
    d = {k[len("config."):]: v for k, v in row.items() if k.startswith("config.")}
    d["seeds"] = [int(s) for s in str(d["seeds"]).split()]
    return from_dict(d)


LOST_TRIAL_FILE = "poh_trial.lost.yaml"


def retire_lost_trials(exp_dir: Path, rows: list[dict[str, Any]]) -> int:
    """Rename poh_trial.yaml in trial folders that no row of results.csv names.

    A Tune trial started after the driver's last snapshot is unknown to the restored experiment:
    its configuration runs again as a new trial, and the old folder's partial epochs must not be
    counted as one more trial.
    """
    known = {Path(r["trial_dir"]).resolve() for r in rows}
    n = 0
    specs = [*exp_dir.glob(f"*/{TRIAL_FILE}"), *exp_dir.glob(f"*/c*/{TRIAL_FILE}")]  # packs
    for f in specs:
        if f.parent.resolve() not in known:
            os.replace(f, f.parent / LOST_TRIAL_FILE)
            n += 1
    return n


def finish(command: str, space: Space, exp_dir: Path, results, no_report: bool) -> int:
    rows = collect(results, {})
    if command == "optuna":  # each row's Optuna trial number (the searcher records the link)
        import optuna

        from poh_tune.search import study_storage

        study = optuna.load_study(study_name=exp_dir.name, storage=study_storage(exp_dir))
        numbers = {t.user_attrs.get("ray_trial_id"): t.number for t in study.trials}
        for r in rows:
            r["optuna_trial"] = numbers.get(r["trial_id"], "")
    atomic_write_text(exp_dir / "results.csv", _csv_text(rows))
    from poh_tune.tblog import write_session_end
    from poh_tune.trainable import TB_DIR

    for r in rows:  # how each trial ended, for TensorBoard's HParams (an ASHA stop included)
        if Path(r["trial_dir"]).is_dir():
            write_session_end(Path(r["trial_dir"]) / TB_DIR, r["status"], int(r["epochs_done"]),
                              bool(r["stopped_early"]))
    lost = retire_lost_trials(exp_dir, rows)
    if lost:
        print(f"{lost} trial folder(s) from before the restore belong to no trial of this "
              f"experiment (started after its last snapshot, rerun since): their "
              f"{TRIAL_FILE} was renamed {LOST_TRIAL_FILE}")
    n_err = sum(r["status"] == "ERROR" for r in rows)
    n_stop = sum(bool(r["stopped_early"]) for r in rows)
    print(f"\n{len(rows)} trials: {len(rows) - n_err - n_stop} completed, {n_stop} stopped "
          f"early, {n_err} errored")
    for r in rows:
        if r["error"]:
            print(f"  {r['trial_id']} errored: {r['error']}")
    if command == "optuna":
        from poh_tune.search import STUDY_FILE, close_stale_trials

        stale = close_stale_trials(study)
        if stale:
            print(f"  {stale} Optuna trial(s) left RUNNING were marked FAIL")
        print(f"Optuna study: {exp_dir / STUDY_FILE} (optuna-dashboard sqlite:///"
              f"{exp_dir / STUDY_FILE})")
    best = best_row(rows, space.metric, space.metric_mode)
    if best is not None:
        cfg = config_of(best)
        from poh_tune.config import save_config

        save_config(cfg, exp_dir / "best_config.yaml")
        print(f"best trial {best['trial_id']}: {space.metric}={best[f'final_{space.metric}']} "
              f"(best dev tau {best['best_tau']}, test tau {best['test_tau']})")
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        print(f"written to {exp_dir / 'best_config.yaml'} "
              f"(python -m poh_tune.train --config {exp_dir / 'best_config.yaml'})")
    print(f"results: {exp_dir / 'results.csv'}")
    if not no_report:
        run_report(exp_dir, None, quiet_missing=True)
    print(f"experiment dir: {exp_dir}\n  tensorboard --logdir {exp_dir}")
    return 1 if n_err else 0


def run_report(exp_dir: Path, out: str | None, quiet_missing: bool = False) -> int:
    """Call poh_tune.report.write_report; a failure is printed, never fatal to a finished run."""
    try:
        from poh_tune.report import PLOT_FILES, write_report
    except ImportError as e:
        if not quiet_missing:
            print(f"error: the report module is not available ({e})", file=sys.stderr)
        return 2
    try:
        path = write_report(exp_dir, out_dir=out)
    except Exception as e:
        print(f"report failed ({type(e).__name__}: {e}); the run's results are intact",
              file=sys.stderr)
        return 1
    text = path.read_text()
    plots = [str(path.parent / n) for n in PLOT_FILES if f"]({n})" in text]  # those it shows
    print(f"report: {path}\nsummary: {path.parent / 'summary.csv'}\nplots: "
          + (", ".join(plots) or "none (nothing to plot)"))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "report":
        exp_dir = Path(args.exp_dir)
        if exp_dir.exists() and not exp_dir.is_dir():
            raise UsageError(f"{exp_dir}: is a file; `report` takes an experiment directory "
                             f"(the folder holding results.csv and the trial folders)")
        if not exp_dir.is_dir():
            raise UsageError(f"{exp_dir}: no such experiment directory")
        if (exp_dir / TRIAL_FILE).exists():
            raise UsageError(f"{exp_dir}: is a trial folder (it holds {TRIAL_FILE}); `report` "
                             f"takes its experiment directory, {exp_dir.resolve().parent}")
        return run_report(exp_dir, args.out)
    space, exp_dir, launch = resolve(args)
    check_dashboard(args)
    if args.address is not None:
        args.address = check_address(args.address)
    launch["max_failures"] = args.max_failures
    launch["reuse_actors"] = args.reuse_actors
    launch["progress_every"] = args.progress_every
    variants, membership = grid_variants(space, launch["experiment_names"]) \
        if args.command == "grid" else ([{}], {})
    print(f"experiment dir: {exp_dir}\n  tensorboard --logdir {exp_dir}", flush=True)
    start_ray(args.address, args.num_cpus, args.dashboard)
    check_trial_fits(launch["cpu"], launch["gpu"], embedded=args.address is None)
    from ray import tune

    trainable = make_trainable(space, launch, membership)
    if args.resume:
        # tuner.pkl does not keep the param space: a run killed before Tune's first experiment
        # snapshot restores a fresh variant generator that needs it (KeyError otherwise).
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True,
                                   resume_errored=True,
                                   param_space=grid_param_space(space, launch)[0]
                                   if args.command == "grid" else {})
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(exp_dir / EXPERIMENT_FILE,
                          yaml.safe_dump(experiment_info(args.command, space, launch),
                                         sort_keys=False))
        from poh_tune.tblog import write_hparams_experiment

        write_hparams_experiment(exp_dir, space.base.to_dict(),
                                 hparam_domains(args.command, space, launch))
        tuner = make_tuner(args.command, space, launch, exp_dir, trainable)
    resume_line = (f"python -m poh_tune.launch {args.command} --resume --name {exp_dir.name} "
                   f"--storage {exp_dir.parent}"
                   + (f" --address {args.address}" if args.address else ""))
    try:
        with interruption_watch() as interrupted:
            results = tuner.fit()
            was_interrupted = interrupted()  # here: leaving the block puts the old handler back
    except KeyboardInterrupt:  # a second Ctrl-C while Tune saved its state, or one before
        resumable = (exp_dir / "tuner.pkl").exists()  # Tune registered the experiment
        print("\ninterrupted; " + (f"continue with: {resume_line}" if resumable else
                                   "the run had not started, there is nothing to resume"),
              file=sys.stderr)
        return 130
    if was_interrupted:
        expected = len(variants) if args.command == "grid" else launch["num_samples"]
        return report_interrupted(results, expected, space.base.epochs, resume_line)
    return finish(args.command, space, exp_dir, results, args.no_report)


class _DropTuneRestoreHint(logging.Filter):
    """Tune's own "Resume experiment with: Tuner.restore(...)" does not apply to poh_tune."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


@contextlib.contextmanager
def interruption_watch():
    """Yields a function that says, after Tuner.fit(), whether SIGINT (or SIGUSR1) stopped it.

    Tune catches the first SIGINT and makes fit() return normally, as if the run were done. Its
    handler puts back the handler it found and nothing else does: so a marker handler installed
    here is back in place after fit() exactly when the run was interrupted.
    """
    def marker(signum, frame):  # only reached when Tune did not install its own handler
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, marker)
    hint_filter = _DropTuneRestoreHint()
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addFilter(hint_filter)
    tune_handles_sigint = not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") or 0)
    try:
        yield lambda: tune_handles_sigint and signal.getsignal(signal.SIGINT) is marker
    finally:
        signal.signal(signal.SIGINT, previous)
        tune_logger.removeFilter(hint_filter)


def report_interrupted(results, expected: int, epochs: int, resume_line: str) -> int:
    """The truth about an interrupted run, from each trial's own files; nothing is written.

    Tune marks every trial TERMINATED when it is interrupted, so a trial counts as finished when it
    errored or logged all its epochs, interrupted when it logged some, not started otherwise
    (trials Tune never created included). An ASHA stop counts as interrupted here; --resume keeps
    it stopped.
    """
    finished = partial = 0
    for r in results:
        trial_dir = Path(r.path)
        pack = (r.config or {}).get("pack")
        folders = ([trial_dir / f"c{k}" for k in range(len(pack))]  # a pack's configurations
                   if isinstance(pack, list) and len(pack) > 1 else [trial_dir])
        for folder in folders:
            info = yaml.safe_load((folder / TRIAL_FILE).read_text()) if (
                folder / TRIAL_FILE).exists() else {}
            want = int(((info or {}).get("config") or {}).get("epochs", epochs))
            done = len(read_metrics(folder / METRICS_FILE))
            if r.error is not None or done >= want:
                finished += 1
            elif done > 0:
                partial += 1
    not_started = max(0, expected - finished - partial)
    print(f"\ninterrupted: {finished} of {expected} trials finished, {partial} interrupted, "
          f"{not_started} not started; results.csv, best_config.yaml and the report were not "
          f"written\ncontinue with: {resume_line}", file=sys.stderr)
    return 130


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


__all__ = ["main", "canonical"]
