"""--storage given as a URI (s3://, gs://, any pyarrow file system URI): checks, copies both ways.

Ray writes the trials there itself (RunConfig(storage_filesystem=...)). The driver's own files
(the run record, results.csv, best_config.yaml, the report) are written to a local mirror of the
experiment folder and uploaded: the report and results code read and write local files, and a
download-then-upload keeps that code one implementation for both kinds of storage.
pyarrow is imported inside the functions, so that a local --storage never loads it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

# Not downloaded into the mirror: Tune's checkpoints and the trial state (only trials read them).
SKIP_PARTS = ("checkpoint_",)
SKIP_NAMES = ("trial_state.pt",)


def download_tree(fs: Any, base: str, local: Path, skipped) -> None:
    """Copy every file under `base` of the pyarrow file system `fs` into `local` (each written
    atomically), but those whose path below `base` `skipped(sub)` is true."""
    import pyarrow.fs

    from poh_tune.io import atomic_write_bytes

    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
    for info in infos:
        sub = info.path[len(base):].lstrip("/")
        if info.type != pyarrow.fs.FileType.File or skipped(sub):
            continue
        dest = local / sub
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as f:
            atomic_write_bytes(dest, f.read())


class StorageError(Exception):
    """The storage cannot be opened, reached or written."""


def is_uri(storage: str) -> bool:
    """A URI with a scheme (s3://, gs://, ...), not a local path; file:// counts as local."""
    return "://" in storage and not storage.startswith("file://")


def local_path(storage: str) -> str:
    """A local --storage as a path (file:///x -> /x)."""
    return storage[len("file://"):] if storage.startswith("file://") else storage


class RemoteStorage:
    """A storage URI opened with pyarrow: its file system, its root path on it, its display name.

    Args:
        uri: as given to --storage; a query (`?endpoint_override=...&scheme=http`) configures
            the file system and is not part of the path.
    """

    def __init__(self, uri: str):
        import pyarrow.fs

        self.uri = uri
        try:
            self.fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        except Exception as e:  # unknown scheme, malformed URI, file system not built in
            raise StorageError(f"--storage {uri}: not a storage URI that pyarrow (and so Ray) "
                               f"can open ({_first_line(e)})") from None
        self.root = root.rstrip("/")
        scheme = uri.split("://", 1)[0]
        self.display = f"{scheme}://{self.root}"

    def where(self, rel: str = "") -> str:
        """The display URI of `rel` below the root (no query: it may hold an endpoint)."""
        return f"{self.display}/{rel}".rstrip("/")

    def path(self, rel: str = "") -> str:
        """`rel` below the root as a path on self.fs."""
        return f"{self.root}/{rel}".rstrip("/")

    def check_writable(self) -> None:
        """Write and delete a probe file at the root: reachable, existing, writable."""
        probe = self.path(f".poh_probe_{uuid.uuid4().hex[:12]}")
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"poh_tune storage probe\n")
            self.fs.delete_file(probe)
        except Exception as e:
            raise StorageError(f"--storage {self.uri}: cannot write to {self.display} "
                               f"({_first_line(e)})") from None

    def exists(self, rel: str) -> bool:
        import pyarrow.fs

        try:
            return self.fs.get_file_info(self.path(rel)).type != pyarrow.fs.FileType.NotFound
        except Exception as e:
            raise StorageError(f"--storage {self.uri}: cannot read {self.where(rel)} "
                               f"({_first_line(e)})") from None

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def download(self, rel: str, local: Path) -> dict[str, tuple[int, int]]:
        """Copy the folder `rel` (an experiment) into `local`, checkpoints and trial states left out.

        Returns:
            the state of every downloaded file (path relative to `local` -> size, mtime_ns), for
            upload_changed.
        """

        local.mkdir(parents=True, exist_ok=True)
        download_tree(self.fs, self.path(rel), local, _skipped)
        return snapshot(local)

    def upload_changed(self, local: Path, rel: str, before: dict[str, tuple[int, int]]) -> int:
        """Upload the files of `local` that are new or changed since `before` (download's
        snapshot), and delete the stored copies of downloaded files removed locally.

        Returns:
            how many files were uploaded.
        """
        now = snapshot(local)
        changed = [sub for sub, state in now.items() if before.get(sub) != state]
        for sub in changed:
            dest = self.path(f"{rel}/{sub}")
            self.fs.create_dir(dest.rpartition("/")[0], recursive=True)
            with self.fs.open_output_stream(dest) as f:
                f.write((local / sub).read_bytes())
        for sub in set(before) - set(now):  # e.g. poh_trial.yaml renamed to poh_trial.lost.yaml
            self.fs.delete_file(self.path(f"{rel}/{sub}"))
        return len(changed)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below `folder` (relative POSIX path -> size, mtime_ns)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            out[p.relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def _skipped(sub: str) -> bool:
    parts = sub.split("/")
    return parts[-1] in SKIP_NAMES or any(p.startswith(SKIP_PARTS) for p in parts[:-1])


def _first_line(e: Any) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
