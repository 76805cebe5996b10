"""The Ray Tune function trainable: one configuration trained on its seeds, reported every epoch."""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from poh_tune.config import from_dict
from poh_tune.io import atomic_write_bytes, atomic_write_text, read_metrics
from poh_tune.spaces import canonical
from poh_tune.tblog import tb_scalars, write_session_start
from poh_tune.trainer import TrainingDiverged, TrialRunner

METRICS_FILE = "metrics.jsonl"
TRIAL_FILE = "poh_trial.yaml"
CKPT_FILE = "trial.pt"
# The trial's own state, in its storage folder, replaced atomically before every report: a resume
# continues from it whatever Tune's experiment snapshot says (that snapshot lags behind the trial
# and may name a checkpoint that CheckpointConfig(num_to_keep) has deleted since).
STATE_FILE = "trial_state.pt"
TB_DIR = "tb"
# Test-only fault injection (issue 6): the trial's process exits hard after this epoch, once.
CRASH_ENV = "POH_TUNE_CRASH_AFTER_EPOCH"
DIVERGED_FILE = ".diverged"  # the divergence message; retries re-raise it instead of retraining


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
        copy (remote storage), where only Tune's checkpoints survive a driver restore.
    """
    ctx = tune.get_context()
    try:
        import pyarrow.fs

        storage = ctx.get_storage()
        if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            return Path(storage.trial_fs_path), True
    except Exception:  # a remote storage filesystem: fall back to Ray's synced folder
        pass
    return Path(ctx.get_trial_dir()), False


def save_state(runner: TrialRunner, path: Path) -> None:
    """The runner's state, replaced atomically (a kill leaves the old state or the new one)."""
    buf = io.BytesIO()
    torch.save(runner.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())


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


def train_trial(config: dict[str, Any], base: dict[str, Any],
                membership: dict[str, list[str]] | None = None,
                checkpoint_every: int = 1) -> None:
    """Tune function trainable.

    Args:
        config: the hyperparameters Tune chose (only those); applied on top of `base`.
        base: the fixed full TrialConfig dict (through tune.with_parameters).
        membership: canonical(config) -> grid experiments this configuration counts for.
        checkpoint_every: epochs between checkpoints (one is also written at the end).
    """
    started_at = time.time()  # wall clock: placement checks compare trials' lifetimes per node
    cfg = from_dict({**base, **config})
    threads = cpu_share()
    torch.set_num_threads(threads)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    trial_dir, durable = trial_storage_dir()
    trial_dir.mkdir(parents=True, exist_ok=True)
    diverged = trial_dir / DIVERGED_FILE
    if diverged.exists():  # a retry (FailureConfig) of a diverged trial: it would diverge again
        raise TrainingDiverged(diverged.read_text().strip())
    runner = TrialRunner(cfg, device=select_device())

    state_file = trial_dir / STATE_FILE
    ckpt = tune.get_checkpoint()
    if durable and state_file.exists():  # never older than a Tune checkpoint of this trial
        runner.load(state_file)
    elif ckpt is not None:
        with ckpt.as_directory() as d:
            runner.load(Path(d) / CKPT_FILE)

    trial_file = trial_dir / TRIAL_FILE
    if not trial_file.exists():
        import yaml

        experiments = (membership or {}).get(canonical(dict(config)), [])
        atomic_write_text(trial_file, yaml.safe_dump(
            {"config": cfg.to_dict(), "experiments": experiments, "trial_id": trial_id},
            sort_keys=False))

    from tensorboardX import SummaryWriter

    metrics_file = trial_dir / METRICS_FILE
    logged = last_logged_epoch(metrics_file)
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
        rows = read_metrics(metrics_file)
        tune.report({**(rows[-1] if rows else {"epoch": runner.epoch}), **extra()})
        return
    writer = SummaryWriter(str(trial_dir / TB_DIR), flush_secs=5)
    if logged == 0:
        write_session_start(writer, cfg.to_dict(), trial_id)
    try:
        while not runner.done:
            try:
                m = runner.run_epoch()
            except TrainingDiverged as e:  # the trial ends ERROR naming the seed and epoch
                atomic_write_text(diverged, f"{e}\n")
                raise
            epoch = int(m["epoch"])
            if epoch > logged:  # each epoch logged once, even when replayed after a restore
                _append_jsonl(metrics_file, {**m, "trial_id": trial_id})
                for tag, v in tb_scalars(m, cfg.max_inner_iters).items():
                    writer.add_scalar(tag, v, epoch)
                writer.flush()
                logged = epoch
            report = {**m, **extra()}
            if epoch % checkpoint_every == 0 or runner.done:
                save_state(runner, state_file)
            if durable:
                # No Tune checkpoint: the state file above is the checkpoint, and a Tune one
                # could only bring back the snapshot race.
                tune.report(report)
            elif epoch % checkpoint_every == 0 or runner.done:
                with tempfile.TemporaryDirectory() as tmp:
                    runner.save(Path(tmp) / CKPT_FILE)
                    tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))
            else:
                tune.report(report)
            marker = trial_dir / ".crashed"
            if crash_after and epoch == crash_after and not marker.exists():
                marker.touch()
                os._exit(1)
    finally:
        writer.close()
