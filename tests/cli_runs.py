"""Running the real CLI in a fresh interpreter: a tiny grid and Optuna space, process helpers."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

# A tiny grid: every trial trains in a fraction of a second.
TINY_BASE = dict(array_len=4, train_samples=16, dev_samples=8, test_samples=8, epochs=1,
                 batch_size=16, max_inner_iters=1, hrm_period=1, d_model=8, n_heads=2, d_ff=8,
                 d_ctrl=4, seeds=[1], controller_warmup_epochs=0)
GRID = {"name": "t", "base": TINY_BASE,
        "experiments": {"lr": {"description": "two learning rates",
                               "sweep": {"lr_encoder": [0.001, 0.002]}}}}
OPTUNA = {"name": "o", "base": TINY_BASE, "num_samples": 2,
          "search": {"entropy_reg": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
# Runs main() (launch's, or train's when the first argument is "train") in a fresh interpreter
# and says whether Ray was even imported before it returned.
WRAPPER = ("import sys\nif sys.argv[1] == 'train':\n    from poh_tune.train import main\n"
           "    argv = sys.argv[2:]\nelse:\n    from poh_tune.launch import main\n"
           "    argv = sys.argv[1:]\ntry:\n    rc = main(argv)\n"
           "finally:\n    print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY')\n"
           "sys.exit(rc)\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_value(d: dict, path: str, value) -> dict:
    """A deep copy of `d` with the dotted `path` set to `value`."""
    out = json.loads(json.dumps(d))
    *head, last = path.split(".")
    node = out
    for k in head:
        node = node[k]
    node[last] = value
    return out


def dump(d: dict) -> str:
    return yaml.safe_dump(d, sort_keys=False)


def lr_grid(lrs: list[float], **base) -> str:
    """The tiny grid's space file text, sweeping lr_encoder over `lrs`, with `base` keys set."""
    d = with_value(GRID, "experiments.lr.sweep.lr_encoder", lrs)
    for key, value in base.items():
        d = with_value(d, f"base.{key}", value)
    return dump(d)



def launch_popen(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "poh_tune.launch", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def results_rows(exp_dir: Path) -> list[dict]:
    with open(exp_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def logged_epochs(trial_dir: str | Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in open(Path(trial_dir) / "metrics.jsonl")]




def wait_for(cond, proc: subprocess.Popen, timeout: float = 240) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if cond():
            return True
        time.sleep(0.1)
    return False


def kill_session(proc: subprocess.Popen) -> str:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    except ProcessLookupError:
        pass
    return proc.communicate()[0]


def metrics_lines(exp: Path) -> dict[Path, bytes]:
    return {f: f.read_bytes() for f in exp.glob("train_trial_*/metrics.jsonl")}



def launch_wrapped(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})

