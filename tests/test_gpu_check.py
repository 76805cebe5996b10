"""docs/gpu_check.sh, the one command for a GPU machine: what it does where there is no GPU, and
that it keeps to its time budget and says which steps it did not reach."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "gpu_check.sh"
STEPS = ["install", "cuda", "cuda_tests", "bench_5_seeds", "bench_pack_11", "grid"]


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(SCRIPT), *args], cwd=SCRIPT.parents[1], text=True,
                       capture_output=True, timeout=120, env={**os.environ, "OUT": str(out)})
    f = out / "gpu_check.json"
    return p, (json.loads(f.read_text()) if f.exists() else None)


def test_a_budget_of_zero_reaches_no_step_and_says_so(tmp_path):
    p, summary = _run(tmp_path, "--budget", "0")
    assert p.returncode == 0, p.stderr
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert summary["not_reached"] == STEPS
    assert all("of the budget left" in s["reason"] for s in summary["steps"])
    assert summary["grid_wall_s"] is None and summary["bench_5_seeds"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_a_gpu_it_stops_after_the_cuda_check(tmp_path):
    p, summary = _run(tmp_path, "--budget", "60")
    assert p.returncode == 0, p.stderr
    by = {s["name"]: s for s in summary["steps"]}
    assert by["install"]["status"] == "ok"  # no wheelhouse here: nothing to install
    assert by["cuda"]["status"] == "failed" and by["cuda"]["reason"] == "no CUDA device"
    assert summary["not_reached"] == STEPS[2:]
    assert all(by[n]["reason"] == "no CUDA device" for n in STEPS[2:])
    assert summary["elapsed_s"] < 60


@pytest.mark.parametrize("args", [["--budget", "soon"], ["--budgets", "5"]])
def test_bad_arguments_exit_2_naming_them(tmp_path, args):
    p, summary = _run(tmp_path, *args)
    assert p.returncode == 2 and summary is None
    assert args[-1] in p.stderr or args[0] in p.stderr
