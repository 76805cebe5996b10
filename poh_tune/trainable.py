"""The Ray Tune function trainables: one configuration, or a pack of them, trained on its seeds."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from poh_tune.checkpoints import choose_state, state_bytes
from poh_tune.config import TrialConfig, from_dict
from poh_tune.io import (
    CKPT_FILE,
    DIVERGED_FILE,
    METRICS_FILE,
    STATE_FILE,
    TRIAL_FILE,
    atomic_write_bytes,
    atomic_write_text,
    config_folder,
    read_metrics,
)
from poh_tune.record import flat
from poh_tune.spaces import canonical
from poh_tune.tblog import TensorBoardWriter
from poh_tune.trackers import FAILED, FINISHED, KILLED, RunInfo, Trackers, remote_writers, run_label
from poh_tune.trainer import TrainingDiverged, TrialRunner

# Test-only fault injection: the trial's process exits hard after this epoch, once.
CRASH_ENV = "POH_TUNE_CRASH_AFTER_EPOCH"


def last_logged_epoch(path: Path) -> int:
    """The highest epoch in a metrics.jsonl (0 if none); a torn last line is ignored."""
    rows = read_metrics(path)
    return int(rows[-1]["epoch"]) if rows else 0


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def trial_storage_dir() -> tuple[Path, bool]:
    """The trial's folder in the experiment's storage, written directly, and whether it is.

    `get_trial_dir()` is a staging copy in the Ray session's temp folder that Ray syncs up over
    the stored one; after a driver restore the new session's staging folder starts empty, so an
    append-only file kept there would be overwritten by its tail.

    Returns:
        the folder; True when it is the storage itself (local storage), False for Ray's staging
        copy (remote storage, synced up with SyncConfig(sync_artifacts=True)), where only Tune's
        checkpoints decide where a resumed trial continues.
    """
    ctx = tune.get_context()
    storage = None
    try:
        import pyarrow.fs

        storage = ctx.get_storage()
        if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            return Path(storage.trial_fs_path), True
    except Exception:  # a remote storage filesystem: fall back to Ray's synced folder
        pass
    staging = Path(ctx.get_trial_dir())
    if storage is not None:
        pull_stored_files(storage.storage_filesystem, storage.trial_fs_path, staging)
    return staging, False


def pull_stored_files(fs, stored: str, staging: Path) -> None:
    """A resumed trial on remote storage: copy its stored files (no checkpoints) into an empty
    staging folder, so that its append-only files continue instead of replacing the stored ones
    at the next sync."""
    from poh_tune.storage import download_tree

    if staging.is_dir() and any(staging.iterdir()):
        return
    download_tree(fs, stored, staging, lambda sub: sub.startswith("checkpoint_"))


def select_device() -> str:
    """cuda when Ray gave this trial a GPU and torch sees one, else cpu."""
    try:
        gpus = ray.get_gpu_ids()
    except Exception:
        gpus = []
    return "cuda" if gpus and torch.cuda.is_available() else "cpu"


def cpu_share() -> int:
    """Whole CPUs Ray assigned to this trial (at least 1)."""
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:
        cpus = 1
    return max(1, int(cpus))


class TrialFiles:
    """One configuration's own files: poh_trial.yaml, metrics.jsonl, and its record writers
    (poh_tune.trackers): its TensorBoard run, and its MLflow and W&B runs when asked for.

    Used by a single-configuration trial (its Tune trial folder) and by each configuration of a
    pack (a sub-folder of the pack's trial folder), so both write the same files.
    """

    def __init__(self, folder: Path, cfg: TrialConfig, trial_id: str, experiments: list[str],
                 extra: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
                 trackers: Trackers | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.cfg, self.trial_id = folder, cfg, trial_id
        trial_file = folder / TRIAL_FILE
        if not trial_file.exists():
            import yaml

            atomic_write_text(trial_file, yaml.safe_dump(
                {"config": cfg.to_dict(), "experiments": list(experiments),
                 "trial_id": trial_id, **(extra or {})}, sort_keys=False))
        self.metrics_file = folder / METRICS_FILE
        self.logged = last_logged_epoch(self.metrics_file)
        run = RunInfo(name=f"{trial_id} {run_label(params or {})}", trial_id=trial_id,
                      folder=folder, epochs_logged=self.logged,
                      tags={"experiments": ",".join(experiments), "folder": str(folder),
                            **{k: str(v) for k, v in (extra or {}).items()}})
        self.writers = [TensorBoardWriter(), *remote_writers(trackers)]
        for w in self.writers:  # a tracker run new to a resumed configuration gets its epochs
            if w.open(cfg.to_dict(), run) and self.logged:
                for row in read_metrics(self.metrics_file):
                    w.epoch(row, int(row["epoch"]))

    def log(self, m: dict[str, Any]) -> None:
        """Append one epoch's record; an epoch replayed after a restore is logged once."""
        epoch = int(m["epoch"])
        if epoch <= self.logged:
            return
        _append_jsonl(self.metrics_file, {**m, "trial_id": self.trial_id})
        for w in self.writers:
            w.epoch(m, epoch)
        self.logged = epoch

    def close(self, status: str = FINISHED) -> None:
        """status: FINISHED, FAILED or KILLED (poh_tune.trackers); the first close counts."""
        writers, self.writers = self.writers, []
        for w in writers:
            w.close(status)


def report_epoch(runner: TrialRunner, report: dict[str, Any], checkpoint_due: bool,
                 state_file: Path, trial_id: str, logs_in: Path | None = None) -> None:
    """Report an epoch to Tune, with a checkpoint when due (and after the last epoch).

    A checkpointed epoch's state goes to the trial's own state file first (replaced
    atomically), then to Tune as its checkpoint (checkpoints.choose_state picks the newer on
    restore). `training_iteration` is the epoch, so Tune's count survives retries that resume
    from the state file.
    """
    row = {**flat(report), "training_iteration": int(report["epoch"])}
    if not (checkpoint_due or runner.done):
        tune.report(row)
        return
    data = state_bytes(runner, trial_id)
    atomic_write_bytes(state_file, data)
    with tempfile.TemporaryDirectory() as tmp:
        atomic_write_bytes(Path(tmp) / CKPT_FILE, data)  # a folder Tune copies from
        if logs_in is not None:
            copy_logs(logs_in, Path(tmp))
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(tmp))


def copy_logs(src: Path, dst: Path, only_longer: bool = False) -> None:
    """Every metrics.jsonl under `src` (a trial's, or each configuration's of a pack) to the
    same place under `dst`; only_longer: only where it holds more epochs than dst's copy.

    On remote storage Ray uploads a checkpoint with its report but the trial's other files
    later, in the background; a driver killed in between would resume from the checkpoint with
    a log that ends earlier, and the next upload would replace the stored log by the new epochs
    alone. A checkpoint carries the logs of its epoch, so a resumed trial starts from those."""
    for f in src.rglob(METRICS_FILE):
        rel = f.relative_to(src)
        if any(part.startswith("checkpoint_") for part in rel.parts):
            continue
        target = dst / rel
        if only_longer and last_logged_epoch(target) >= last_logged_epoch(f):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, f.read_bytes())


def resume(runner: TrialRunner, state_file: Path, trial_id: str,
           logs_in: Path | None = None) -> None:
    """Load the newer of the trial's state file and the Tune checkpoint it was handed; with
    `logs_in` (remote storage: the staging folder) the checkpoint's logs where they are longer."""
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        sd, _ = choose_state(state_file, None, trial_id)
    else:
        with ckpt.as_directory() as d:
            sd, _ = choose_state(state_file, Path(d), trial_id)
            if logs_in is not None:
                copy_logs(Path(d), logs_in, only_longer=True)
    if sd is not None:
        runner.load_state_dict(sd)


def crash_if_asked(folder: Path, epoch: int, crash_after: int) -> None:
    """Test-only fault injection (CRASH_ENV): exit hard once, after epoch `crash_after`."""
    marker = folder / ".crashed"
    if crash_after and epoch == crash_after and not marker.exists():
        marker.touch()
        os._exit(1)


def train_trial(config: dict[str, Any], base: dict[str, Any],
                membership: dict[str, list[str]] | None = None,
                checkpoint_every: int = 1, trackers: Trackers | None = None) -> None:
    """Tune function trainable.

    Args:
        config: the hyperparameters Tune chose (only those); applied on top of `base`.
        base: the fixed full TrialConfig dict (through tune.with_parameters).
        membership: canonical(config) -> grid experiments this configuration counts for.
        checkpoint_every: epochs between checkpoints (one is also written at the end).
        trackers: MLflow / W&B settings (poh_tune.trackers.prepare); None: TensorBoard only.
    """
    started_at = time.time()  # wall clock: placement checks compare trials' lifetimes per node
    cfg = from_dict({**base, **config})
    threads = cpu_share()
    torch.set_num_threads(threads)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    trial_dir, durable = trial_storage_dir()
    logs_in = None if durable else trial_dir  # remote storage: checkpoints carry the logs
    trial_dir.mkdir(parents=True, exist_ok=True)
    diverged = trial_dir / DIVERGED_FILE
    if diverged.exists():  # a retry (FailureConfig) of a diverged trial: it would diverge again
        raise TrainingDiverged(diverged.read_text().strip())
    runner = TrialRunner(cfg, device=select_device())

    state_file = trial_dir / STATE_FILE
    resume(runner, state_file, trial_id, logs_in)

    files = TrialFiles(trial_dir, cfg, trial_id,
                       (membership or {}).get(canonical(dict(config)), []), params=dict(config),
                       trackers=trackers)
    node_id = ray.get_runtime_context().get_node_id()
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)

    def extra() -> dict[str, Any]:
        return {"node_id": node_id, "gpu_ids": ",".join(gpu_ids),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "device": str(runner.device), "torch_threads": threads,
                "started_at": started_at, "reported_at": time.time()}

    if runner.done:
        # Finished before a driver kill that Tune's snapshot predates: Tune still waits for a
        # result, so the last epoch's row is reported once more (it is not logged again).
        files.close()
        rows = read_metrics(files.metrics_file)
        tune.report({**flat({**(rows[-1] if rows else {"epoch": runner.epoch}), **extra()}),
                     "training_iteration": runner.epoch})
        return
    status = FAILED
    try:
        while not runner.done:
            try:
                m = runner.run_epoch()
            except TrainingDiverged as e:  # the trial ends ERROR naming the seed and epoch
                atomic_write_text(diverged, f"{e}\n")
                raise
            epoch = int(m["epoch"])
            files.log(m)
            if runner.done:  # before the last report: Tune may end this process right after it
                files.close(FINISHED)
            report = {**m, **extra()}
            report_epoch(runner, report, epoch % checkpoint_every == 0, state_file, trial_id,
                         logs_in)
            crash_if_asked(trial_dir, epoch, crash_after)
        status = FINISHED
    except SystemExit:  # how tune.report ends a trial that Tune stops (ASHA, an interruption);
        status = FINISHED if runner.done else KILLED  # ASHA stops one at max_t as well
        raise
    finally:
        files.close(status)


def _score(v: Any, mode: str) -> float:
    """A metric value to rank by; a missing or non-finite one ranks last."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else (-math.inf if mode == "max" else math.inf)


def train_pack(config: dict[str, Any], base: dict[str, Any],
               membership: dict[str, list[str]] | None = None, checkpoint_every: int = 1,
               metric: str = "tau", mode: str = "max", trackers: Trackers | None = None) -> None:
    """Tune function trainable for a pack: several configurations trained as one ensemble.

    Each configuration writes the files of a single-configuration trial to its own folder
    `<trial folder>/c<k>/`, with trial_id `<pack trial id>_c<k>`. Tune gets one result per epoch:
    the record of the pack's best configuration by `metric` (pack_best names it) and every
    configuration's `c<k>_<metric>`; schedulers that decide per configuration are not used.

    Args:
        config: {"pack": [the swept params of each configuration]}; a pack of one trains as an
            ordinary trial (train_trial, the same files).
        base, membership, checkpoint_every, trackers: as train_trial.
        metric, mode: the search metric, to choose the configuration whose record Tune gets.
    """
    params = list(config["pack"])
    if len(params) == 1:
        return train_trial(params[0], base, membership, checkpoint_every, trackers)
    started_at = time.time()
    cfgs = [from_dict({**base, **p}) for p in params]
    threads = cpu_share()
    torch.set_num_threads(threads)
    pack_id = tune.get_context().get_trial_id()
    pack_dir, durable = trial_storage_dir()
    logs_in = None if durable else pack_dir  # remote storage: checkpoints carry the logs
    pack_dir.mkdir(parents=True, exist_ok=True)
    diverged = pack_dir / DIVERGED_FILE
    if diverged.exists():  # every configuration diverged: a retry would diverge again
        raise TrainingDiverged(diverged.read_text().strip())
    runner = TrialRunner(cfgs, device=select_device())
    state_file = pack_dir / STATE_FILE
    resume(runner, state_file, pack_id, logs_in)
    files = [TrialFiles(pack_dir / config_folder(k), c, f"{pack_id}_c{k}",
                        (membership or {}).get(canonical(dict(p)), []),
                        extra={"pack_id": pack_id, "pack_index": k}, params=dict(p),
                        trackers=trackers)
             for k, (c, p) in enumerate(zip(cfgs, params, strict=True))]
    node_id = ray.get_runtime_context().get_node_id()
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    pick = max if mode == "max" else min

    def pack_report(records: list[dict[str, Any]]) -> dict[str, Any]:
        live = [k for k in range(len(cfgs)) if k not in runner.diverged]
        best = pick(live, key=lambda k: _score(records[k].get(metric), mode))
        return {**records[best], "pack_best": best, "pack_size": len(cfgs),
                "pack_diverged": len(runner.diverged),
                **{f"c{k}_{metric}": records[k].get(metric) for k in range(len(cfgs))},
                "node_id": node_id, "gpu_ids": ",".join(gpu_ids),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "device": str(runner.device), "torch_threads": threads,
                "started_at": started_at, "reported_at": time.time()}

    if runner.done:  # finished before a driver kill (see train_trial): its last result, once
        for f in files:
            f.close()
        last = [(read_metrics(f.metrics_file) or [{"epoch": runner.epoch}])[-1] for f in files]
        tune.report({**flat(pack_report(last)), "training_iteration": runner.epoch})
        return
    status = FAILED
    try:
        while not runner.done:
            records = runner.run_epoch_per_config()
            epoch = int(records[0]["epoch"])
            for k, m in enumerate(records):
                if k in runner.diverged:  # its epochs end here, as a diverged trial's do
                    marker = files[k].folder / DIVERGED_FILE
                    if not marker.exists():
                        atomic_write_text(marker, f"{runner.diverged[k]}\n")
                    files[k].close(FAILED)
                else:
                    files[k].log(m)
                    if runner.done:  # before the last report (see train_trial)
                        files[k].close(FINISHED)
            live = [k for k in range(len(cfgs)) if k not in runner.diverged]
            if not live:
                msg = "; ".join(f"configuration {k}: {runner.diverged[k]}"
                                for k in range(len(cfgs)))
                atomic_write_text(diverged, f"{msg}\n")
                raise TrainingDiverged(msg)
            report = pack_report(records)
            report_epoch(runner, report, epoch % checkpoint_every == 0, state_file, pack_id,
                         logs_in)
            crash_if_asked(pack_dir, epoch, crash_after)
        status = FINISHED
    except SystemExit:  # Tune stopped the pack (see train_trial)
        status = FINISHED if runner.done else KILLED
        raise
    finally:
        for k, f in enumerate(files):
            f.close(FAILED if k in runner.diverged else status)
