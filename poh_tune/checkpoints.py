"""A trial's checkpoints: what a (re)started trial resumes from, and load_trial for users.

Every checkpointed epoch the trial's state is written twice: to its own state file (local
storage) and as a Tune checkpoint, which Ray keeps per CheckpointConfig(num_to_keep). A restore
takes the newer of the two. The state file keeps a driver restore exact when Tune's experiment
snapshot lags behind the trial; the Tune checkpoint is what plain Ray reads
(`Result.checkpoint`, `ExperimentAnalysis.get_best_checkpoint`) and what a scheduler such as
PBT hands from one trial to another.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from poh_tune.config import from_dict
from poh_tune.evaluate import aggregate
from poh_tune.io import CKPT_FILE, STATE_FILE
from poh_tune.trainer import TrialRunner

logger = logging.getLogger(__name__)

# Tune's checkpoint folders inside a trial folder: checkpoint_000000, checkpoint_000001, ...
CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


def state_bytes(runner: TrialRunner, trial_id: str) -> bytes:
    """The runner's state (trainer.TrialRunner.state_dict) naming the Tune trial it belongs to."""
    buf = io.BytesIO()
    torch.save({**runner.state_dict(), "trial_id": trial_id}, buf)
    return buf.getvalue()


def read_state(path: Path) -> dict[str, Any] | None:
    """A state file or a checkpoint's trial.pt; None (with a warning) when it cannot be read,
    e.g. one torn by a kill while Ray copied it into the checkpoint folder."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        logger.warning("poh_tune: ignoring unreadable trial state %s (%s: %s)", path,
                       type(e).__name__, e)
        return None


def choose_state(state_file: Path | None, checkpoint_dir: Path | None,
                 trial_id: str) -> tuple[dict[str, Any] | None, str]:
    """What a trial resumes from: its own state file or the Tune checkpoint it was handed.

    A checkpoint of another trial (PBT's exploit step) wins; otherwise the one with more
    epochs, the state file on a tie. A state file of another trial (a folder reused by a
    restarted trial) is ignored.

    Returns:
        the state dict (None: start from scratch) and where it came from, for the log.
    """
    own = read_state(state_file) if state_file is not None and state_file.is_file() else None
    if own is not None and own.get("trial_id", trial_id) != trial_id:
        own = None
    tune_sd = None
    if checkpoint_dir is not None and (checkpoint_dir / CKPT_FILE).is_file():
        tune_sd = read_state(checkpoint_dir / CKPT_FILE)
    if tune_sd is not None and tune_sd.get("trial_id", trial_id) != trial_id:
        return tune_sd, f"the checkpoint of trial {tune_sd['trial_id']}"
    if own is not None and (tune_sd is None or own["epoch"] >= tune_sd["epoch"]):
        return own, f"{STATE_FILE} (epoch {own['epoch']})"
    if tune_sd is not None:
        return tune_sd, f"Tune's checkpoint (epoch {tune_sd['epoch']})"
    return None, "scratch"


def newest_checkpoint(storage) -> Any:
    """The highest-numbered Tune checkpoint in a trial's folder on storage, or None.

    Args:
        storage: the trial's ray.train StorageContext (a Trainable's `_storage`).
    """
    import pyarrow.fs
    from ray.tune import Checkpoint

    fs, folder = storage.storage_filesystem, storage.trial_fs_path
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    except Exception:
        return None
    found = []
    for info in infos:
        m = CHECKPOINT_DIR.match(info.base_name)
        if m and info.type == pyarrow.fs.FileType.Directory:
            inner = fs.get_file_info(f"{info.path}/{CKPT_FILE}")
            if inner.type == pyarrow.fs.FileType.File:
                found.append((int(m.group(1)), info.path))
    if not found:
        return None
    return Checkpoint(path=max(found)[1], filesystem=fs)


def with_checkpoint_fallback(fn):
    """A Tune function trainable as a Trainable class that restores from the newest checkpoint
    that still exists.

    Tune's experiment snapshot lags behind the trials; after a driver restore it can name a
    checkpoint that CheckpointConfig(num_to_keep) has deleted since (ray-project/ray#30073),
    and Ray then fails the trial on every retry. Here the trial restores from its newest
    remaining checkpoint instead, or from none, and the trainable takes its state file where
    that is newer (choose_state).
    """
    from ray.train._internal.checkpoint_manager import _TrainingResult
    from ray.train._internal.storage import _exists_at_fs_path
    from ray.tune.trainable.function_trainable import wrap_function

    trainable_cls = wrap_function(fn)

    class Trainable(trainable_cls):
        def restore(self, checkpoint_path):
            result = checkpoint_path
            ckpt = getattr(result, "checkpoint", None)
            if ckpt is not None and not _exists_at_fs_path(ckpt.filesystem, ckpt.path):
                newest = newest_checkpoint(self._storage)
                logger.warning("poh_tune: checkpoint %s is gone (deleted after Tune's last "
                               "experiment snapshot); restoring from %s", ckpt.path,
                               newest.path if newest else "the trial's state file or scratch")
                if newest is None:
                    return None  # the trainable starts without a Tune checkpoint
                result = _TrainingResult(checkpoint=newest, metrics=result.metrics)
            return super().restore(result)

    # Tune names trial folders after the trainable (train_trial_<id>_...).
    Trainable.__name__ = Trainable.__qualname__ = trainable_cls.__name__
    return Trainable


@dataclass
class LoadedTrial:
    """A trained trial loaded from a checkpoint: its model and the data it was evaluated on.

    `runner.model` is the ensemble of every (configuration, seed) pair of the trial (a pack
    holds several configurations); `configs[k]` is configuration k's TrialConfig.
    """

    runner: TrialRunner

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def configs(self) -> list:
        return list(self.runner.cfgs)

    @property
    def epoch(self) -> int:
        """Epochs the checkpointed model had trained."""
        return self.runner.epoch

    def evaluate(self, split: str = "dev") -> list[dict[str, Any]]:
        """Each configuration's metrics on `split` ("dev" or "test"), as the trial reported
        them that epoch: the mean over seeds (tau, tau_all, accuracy, ...) and per_seed.

        The routing temperature is the one of the checkpoint's epoch (trainer.temperature_at).
        """
        r = self.runner
        temps = r.schedules(max(r.epoch - 1, 0))[0]
        per = r.evaluate(split, temps, diagnostics=split == "dev" and r.cfg.diagnostics)
        for m in per:
            m.setdefault("epoch", r.epoch)
            m.setdefault("epoch_s", 0.0)
        return [aggregate([m for (c, _), m in zip(r.members, per, strict=True) if c == k],
                          list(cfg.seeds)) for k, cfg in enumerate(r.cfgs)]


def load_trial(checkpoint: Any, device: str = "cpu") -> LoadedTrial:
    """Load a trial's checkpoint back into a trained model.

    Args:
        checkpoint: a `ray.tune.Checkpoint` (Result.checkpoint,
            ExperimentAnalysis.get_best_checkpoint(...)), a checkpoint folder, or a trial.pt /
            trial_state.pt file.
        device: where the model goes ("cpu", "cuda").
    Returns:
        the LoadedTrial; `.evaluate("dev")` reproduces the τ the trial reported that epoch.
    """
    if hasattr(checkpoint, "as_directory"):
        with checkpoint.as_directory() as d:
            return load_trial(Path(d), device)
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CKPT_FILE if (path / CKPT_FILE).is_file() else path / STATE_FILE
    sd = torch.load(path, map_location=device, weights_only=True)
    runner = TrialRunner([from_dict(c) for c in sd["configs"]], device=device)
    runner.load_state_dict(sd)
    return LoadedTrial(runner)
