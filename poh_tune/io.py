"""Atomic file writes and the one reader of metrics.jsonl."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


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
