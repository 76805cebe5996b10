"""Atomic writes and the metrics.jsonl reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from poh_tune.io import atomic_write_bytes, atomic_write_text, read_metrics


def test_atomic_write_creates_parents_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(path, "first")
    assert path.read_text() == "first"
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # the write itself fails, after the temp file exists
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_read_metrics_orders_epochs_keeps_the_first_row_and_skips_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": 2, "tau": 0.2}, {"epoch": 1, "tau": 0.1}, {"epoch": 2, "tau": 9.9},
            {"no_epoch": True}, [1, 2]]
    text = "\n".join(json.dumps(r) for r in rows) + "\n\n" + '{"epoch": 3, "tau'  # torn by a kill
    path.write_text(text)
    assert read_metrics(path) == [{"epoch": 1, "tau": 0.1}, {"epoch": 2, "tau": 0.2}]


def test_read_metrics_of_a_missing_file_is_empty(tmp_path):
    assert read_metrics(tmp_path / "nothing.jsonl") == []


def test_no_unsafe_loading_no_shell_and_atomic_result_writes():
    """Static checks over the package: YAML via safe_load, checkpoints with weights_only=True,
    no shell, and every result file written atomically (poh_tune.io or temp file + replace)."""
    pkg = Path(__file__).resolve().parent.parent / "poh_tune"
    for f in sorted(pkg.rglob("*.py")):
        src = f.read_text()
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(|yaml\.(Unsafe|Full)?Loader\b",
                             src), f
        assert not re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(|import subprocess", src), f
        assert not re.search(r"pickle\.loads?\(", src), f
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, (f, call)
        if f.name == "io.py":
            continue
        for line in src.splitlines():
            if re.search(r"\.write_(text|bytes)\(|open\([^)]*[\"']w", line):
                assert "tmp" in line and ".replace(" in src, (f.name, line)

