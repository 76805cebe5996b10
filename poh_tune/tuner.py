"""Ray and the Tuner: join or start Ray, build the trainable and the Tuner, watch for Ctrl-C.

Ray, torch, numpy and optuna are imported inside the functions that need them, so that the
launcher's arguments are checked before any of them loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from poh_tune.cli import KEEP_CHECKPOINTS, UsageError
from poh_tune.spaces import Space, grid_variants, pack_variants, plan_packs
from poh_tune.storage import RemoteStorage

# What ray.dashboard.optional_deps imports first (checked without importing ray).
DASHBOARD_DEPS = ("aiohttp", "aiohttp_cors", "opencensus", "prometheus_client")
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
    if address.startswith("ray://"):
        # Ray Client runs Tuner.fit on the cluster, away from this process: the progress line,
        # the results, best_config.yaml and the report are written by this process from the
        # trial files, which it could not read there.
        raise UsageError(f"--address {address}: Ray Client (ray://) is not supported: this "
                         f"launcher must run where the trials' storage is; run it on the head "
                         f"node, e.g. ray job submit --address http://HEAD:8265 -- python -m "
                         f"poh_tune.launch ... --address auto")
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


def check_dashboard(dashboard: bool, address: str | None) -> None:
    """--dashboard: embedded Ray only, and Ray's dashboard packages must be installed."""
    if not dashboard:
        return
    if address is not None:
        raise UsageError("--dashboard starts the embedded Ray's dashboard; a cluster joined with "
                         "--address keeps its own")
    import importlib.util

    missing = [m for m in DASHBOARD_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"--dashboard needs Ray's dashboard packages (missing: "
                         f"{', '.join(missing)}): pip install 'ray[default]'")


def start_ray(address: str | None, num_cpus: int | None, dashboard: bool = False) -> None:
    """Start the embedded Ray (on loopback), or join the cluster at `address`."""
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


def gpu_slots(gpus_per_trial: float) -> int:
    """Trials with a GPU share that the joined Ray runs at once: its total GPUs / the share."""
    import ray

    if gpus_per_trial <= 0:
        return 0
    total = float(ray.cluster_resources().get("GPU", 0))
    return int(total / gpus_per_trial + 1e-9)  # 1 / (1/3) is 2.9999...


def pack_plan(space: Space, launch: dict[str, Any], slots: int) -> list[list[int]]:
    """A new grid run's packs (indices into its variants), from --pack and the GPU slots."""
    variants, _ = grid_variants(space, launch["experiment_names"])
    if launch.get("pack_auto") and launch["gpu"] > 0:
        return plan_packs(space.base, variants, slots)
    return pack_variants(space.base, variants, max(1, int(launch.get("pack", 1))))


def grid_packs(space: Space, launch: dict[str, Any]) -> list[list[int]] | None:
    """The run's packs, None when every configuration is its own trial.

    launch["packs"] is the plan written to the run's record; a record from before it existed
    has only the most configurations per pack, launch["pack"].
    """
    if "packs" in launch:
        packs = [list(p) for p in launch["packs"]]
    else:
        variants, _ = grid_variants(space, launch["experiment_names"])
        packs = pack_variants(space.base, variants, max(1, int(launch.get("pack", 1))))
    return packs if any(len(p) > 1 for p in packs) else None


def grid_param_space(space: Space, launch: dict[str, Any]
                     ) -> tuple[dict[str, Any], list[dict[str, Any]] | None, int]:
    """A grid's Tune param_space, the points to evaluate, and Tune's num_samples.

    Unpacked: one trial per configuration (its swept params, as preset points). Packed: a grid
    search over packs, each trial's config {"pack": [params, ...]} (grid_packs); packs cannot
    be preset points, which Tune assigns leaf by leaf onto the first point's shape.
    """
    from ray import tune

    variants, _ = grid_variants(space, launch["experiment_names"])
    plan = grid_packs(space, launch)
    if plan is None:
        return dict(variants[0]), variants, len(variants)
    packs = [[variants[i] for i in p] for p in plan]
    return {"pack": tune.grid_search(packs)}, None, 1


def make_trainable(space: Space, launch: dict[str, Any], membership: dict[str, list[str]],
                   trackers: Any = None):
    """The Tune trainable: train_trial, or train_pack when configurations are packed.

    trackers: poh_tune.trackers.Trackers (MLflow / W&B), or None."""
    from ray import tune

    from poh_tune.checkpoints import with_checkpoint_fallback
    from poh_tune.trainable import train_pack, train_trial

    if grid_packs(space, launch) is not None:
        fn = tune.with_parameters(train_pack, base=space.base.to_dict(), membership=membership,
                                  checkpoint_every=launch["checkpoint_every"],
                                  metric=space.metric, mode=space.metric_mode,
                                  trackers=trackers)
    else:
        fn = tune.with_parameters(train_trial, base=space.base.to_dict(), membership=membership,
                                  checkpoint_every=launch["checkpoint_every"],
                                  trackers=trackers)
    return tune.with_resources(with_checkpoint_fallback(fn),
                               {"cpu": launch["cpu"], "gpu": launch["gpu"]})


def restore_trainable(exp_dir: str | Path):
    """The trainable to pass to `ray.tune.Tuner.restore(exp_dir, trainable=...)` for a run
    that poh_tune launched, rebuilt from its poh_experiment.yaml (the space file it names must
    still exist). An Optuna run's study is then opened in `exp_dir`, wherever it was moved."""
    from poh_tune.cli import read_experiment
    from poh_tune.search import use_run_dir
    from poh_tune.spaces import load_space

    exp_dir = Path(exp_dir).resolve()
    info = read_experiment(exp_dir)
    launch = info["launch"]
    space = load_space(info["space_file"], launch["overrides"], launch["smoke"])
    membership = (grid_variants(space, launch["experiment_names"])[1]
                  if info["mode"] == "grid" else {})
    use_run_dir(exp_dir)
    return make_trainable(space, launch, membership)


def make_search(command: str, space: Space, launch: dict[str, Any], exp_dir: Path
                ) -> tuple[Any, dict[str, Any], int, int]:
    """The search algorithm of a new run, its param_space, Tune's num_samples and the trials.

    launch["max_concurrent"] is the most trials running at once in both modes; 0: as many as the
    resources allow.
    """
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    max_conc = launch["max_concurrent"]
    if command == "grid":
        param_space, points, num_samples = grid_param_space(space, launch)
        n_trials = num_samples if points is not None else len(param_space["pack"]["grid_search"])
        return (BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_conc),
                param_space, num_samples, n_trials)
    from poh_tune.search import (
        PohOptunaSearch,
        distributions,
        in_space,
        make_sampler,
        warm_start_points,
    )

    base = space.base.to_dict()
    warm, n_grid = (warm_start_points(launch["warm_start"], space) if launch.get("warm_start")
                    else ([], 0))
    base_point = in_space(base, base, space.search)
    # The search's first trial is the base configuration, unless the grid measured it already.
    first = [base_point] if base_point is not None and base_point not in [
        w.params for w in warm] else None
    searcher = PohOptunaSearch(
        space=distributions(space.search), metric=space.metric, mode=space.metric_mode,
        sampler=make_sampler(launch["seed"]), study_name=exp_dir.name, run_dir=exp_dir,
        backend=launch.get("study_backend", "sqlite"), epochs=space.base.epochs,
        points_to_evaluate=first)
    if launch.get("warm_start"):
        grid = launch["warm_start"]
        if warm:
            searcher.warm_start(warm)
            print(f"warm start: {len(warm)} of the {n_grid} configurations of {grid} lie in "
                  f"this space; told to the study as COMPLETE trials ({space.metric} at their "
                  f"last epoch)", flush=True)
        else:
            print(f"warm start: none of the {n_grid} configurations of {grid} lies in this "
                  f"space with the same fixed keys; nothing told to the study", flush=True)
    # ConcurrencyLimiter takes only a positive limit; without one Tune asks the searcher for as
    # many trials as the resources can run.
    search_alg = ConcurrencyLimiter(searcher, max_concurrent=max_conc) if max_conc else searcher
    return search_alg, {}, launch["num_samples"], launch["num_samples"]


def storage_settings(exp_dir: Path, remote: RemoteStorage | None) -> dict[str, Any]:
    """RunConfig's storage: the local folder above exp_dir, or the URI's file system and path.

    With remote storage a trial writes its files to its local working folder, which Ray uploads
    only with sync_artifacts (after every checkpoint and when the trial ends).
    """
    from ray import tune

    if remote is None:
        return {"storage_path": str(exp_dir.parent)}
    return {"storage_path": remote.root, "storage_filesystem": remote.fs,
            "sync_config": tune.SyncConfig(sync_artifacts=True)}


def make_tuner(command: str, space: Space, launch: dict[str, Any], exp_dir: Path, trainable,
               remote: RemoteStorage | None = None):
    """A new run's Tuner: the grid's trials or an Optuna search, FIFO or ASHA, our progress line.

    `remote`: the storage URI's (the experiment then lives there; exp_dir is a local mirror).
    """
    import numpy as np
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

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
    search_alg, param_space, num_samples, n_trials = make_search(command, space, launch, exp_dir)
    from poh_tune.progress import ProgressLine

    shown = exp_dir if remote is None else remote.where(exp_dir.name)
    reporter = ProgressLine(shown, n_trials, epochs, every_s=float(launch["progress_every"]),
                            metric=space.metric, mode=space.metric_mode,
                            asha=launch["scheduler"] == "asha")
    run_config = tune.RunConfig(
        name=exp_dir.name, **storage_settings(exp_dir, remote),
        failure_config=tune.FailureConfig(max_failures=launch["max_failures"]),
        # The best checkpoints by the search metric (Ray also keeps the newest); the trial's
        # state file covers the ones deleted after Tune's last snapshot (checkpoints.py).
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=launch.get("keep_checkpoints", KEEP_CHECKPOINTS),
            checkpoint_score_attribute=space.metric, checkpoint_score_order=space.metric_mode),
        callbacks=[JsonLoggerCallback(), CSVLoggerCallback()], progress_reporter=reporter,
        verbose=1)
    tune_config = tune.TuneConfig(metric=space.metric, mode=space.metric_mode,
                                  search_alg=search_alg, scheduler=scheduler,
                                  num_samples=num_samples,
                                  reuse_actors=bool(launch["reuse_actors"]))
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=run_config)


def restore_tuner(command: str, space: Space, launch: dict[str, Any], exp_dir: Path, trainable,
                  remote: RemoteStorage | None = None):
    """The Tuner of an interrupted run, continued where Tune's last snapshot left it."""
    from ray import tune

    from poh_tune.search import use_run_dir

    use_run_dir(exp_dir)  # the study is the one in exp_dir, wherever the run was moved
    where = {} if remote is None else {"storage_filesystem": remote.fs}
    path = str(exp_dir) if remote is None else remote.path(exp_dir.name)
    # tuner.pkl does not keep the param space: a run killed before Tune's first experiment
    # snapshot restores a fresh variant generator that needs it (KeyError otherwise).
    return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                              param_space=grid_param_space(space, launch)[0]
                              if command == "grid" else {}, **where)


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
