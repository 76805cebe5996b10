"""The names of the files a run writes, atomic file writes, and the one reader of metrics.jsonl."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# An experiment directory (<storage>/<run name>/).
EXPERIMENT_FILE = "poh_experiment.yaml"  # the mode, space file and launch settings (--resume)
TUNER_FILE = "tuner.pkl"  # Ray Tune's: there once Tune registered the experiment (resumable)
RESULTS_FILE = "results.csv"  # one row per configuration, written when the run ends
BEST_CONFIG_FILE = "best_config.yaml"  # the best configuration, for `python -m poh_tune.train`
REPORT_FILE = "report.md"  # the report; SUMMARY_FILE its table, one row per configuration
SUMMARY_FILE = "summary.csv"
STUDY_FILE = "optuna_study.db"  # the Optuna study (SQLite), optuna mode only
STUDY_JOURNAL = "optuna_study.journal"  # the same as Optuna's journal file (shared file systems)
# A configuration's folder: its Tune trial's folder, or <pack trial folder>/c<k>/ in a pack.
TRIAL_FILE = "poh_trial.yaml"  # the resolved config, experiments, trial id (pack id and index)
LOST_TRIAL_FILE = "poh_trial.lost.yaml"  # TRIAL_FILE of a folder no trial of the run owns
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
TRACKERS_FILE = "trackers.json"  # the configuration's MLflow / W&B run ids (a resume continues them)
TRACKER_WARNINGS_FILE = "tracker_warnings.txt"  # a tracker that failed mid-run, for the driver
# The divergence message (a pack's trial folder holds one when all its configurations diverged);
# retries re-raise it instead of retraining.
DIVERGED_FILE = ".diverged"
# A Tune trial's folder (a pack's: shared by its configurations).
CKPT_FILE = "trial.pt"  # inside a Tune checkpoint
# The trial's own state, in its storage folder, replaced atomically before every checkpointed
# report (which also hands it to Tune as a checkpoint): a resume takes the newer of the two
# (checkpoints.choose_state), whatever Tune's experiment snapshot says (that snapshot lags
# behind the trial and may name a checkpoint that CheckpointConfig(num_to_keep) has deleted).
STATE_FILE = "trial_state.pt"


# Filesystem types of shared (network or cluster) file systems, as /proc/mounts names them:
# Optuna advises against SQLite there (its locking is unreliable on NFS); a journal file is
# made for them.
SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
             "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.cephfs", "9p", "afs", "panfs",
             "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse", "wekafs")
STUDY_BACKENDS = ("sqlite", "journal")


def filesystem_type(path: str | Path) -> str:
    """The type of the file system holding `path` (the longest mount point in /proc/mounts
    above it), or "" where that cannot be read."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    best, fstype = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (str(p) == mount or str(p).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, fstype = mount, parts[2]
    return fstype


def choose_backend(requested: str, storage: str | Path) -> str:
    """--study auto|sqlite|journal: auto is journal on a shared file system, else SQLite."""
    if requested != "auto":
        return requested
    return "journal" if filesystem_type(storage) in SHARED_FS else "sqlite"


def config_folder(k: int) -> str:
    """The sub-folder of a pack's trial folder that holds its k-th configuration's files."""
    return f"c{k}"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that a kill at any moment leaves the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """A trial's metrics.jsonl, one row per epoch in epoch order.

    The first row of an epoch wins (as the trainable logs it); a torn last line after a kill and
    rows without an epoch are skipped; a missing file gives [].
    """
    path = Path(path)
    by_epoch: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "epoch" in row:
            by_epoch.setdefault(int(row["epoch"]), row)
    return [by_epoch[e] for e in sorted(by_epoch)]
