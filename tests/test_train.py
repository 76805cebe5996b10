"""`python -m poh_tune.train`: one configuration on its seeds without Ray, its files and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import yaml

from poh_tune.config import load_config
from tests.conftest import TINY

TINY_ARGS = [f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY.items()]


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poh_tune.train", *args], capture_output=True,
                          text=True, timeout=300)


def test_trains_writes_its_files_and_summarises_the_last_epoch(tmp_path):
    out = tmp_path / "run"
    p = run_train("--json", "--out", str(out), *TINY_ARGS)
    assert p.returncode == 0, p.stderr
    epochs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == epochs
    cfg = load_config(out / "config.yaml")
    assert cfg == load_config(None, TINY_ARGS)
    assert yaml.safe_load((out / "config.yaml").read_text())["seeds"] == [1, 2]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and list(state["seeds"]) == [1, 2]
    last = epochs[-1]
    # The summary names each seed's test τ of the last epoch's row and their mean, to 4
    # significant digits, without a CI for 2 seeds (the small-n rule).
    seeds = [r["test_tau"] for r in last["per_seed"]]
    [summary] = [ln for ln in p.stderr.splitlines() if ln.startswith("test tau at best dev")]
    assert f"test tau at best dev epoch: {sum(seeds) / 2:.4g} (n=2: CI n/a)" in summary
    if f"{seeds[0]:.4g}" != f"{seeds[1]:.4g}":
        assert f"per seed 1: {seeds[0]:.4g}, 2: {seeds[1]:.4g}" in summary
    assert "±" not in summary and "CI n/a below 3 seeds" in summary
    # What was trained, by the keys that differ from the defaults; where the files went.
    text = p.stderr[p.stderr.index("trained 3 epochs on 2 seeds"):]
    assert "array_len=8" in text and "seeds=1,2" in text and "epochs=3" in text
    assert f"written: {out / 'config.yaml'}, {out / 'metrics.jsonl'}" in text
    assert len(text.strip().splitlines()) <= 5  # no dump of the configuration


def test_an_unknown_key_exits_2_naming_it_without_a_traceback(tmp_path):
    p = run_train("--out", str(tmp_path / "run"), "arry_len=8")
    assert p.returncode == 2
    assert "arry_len" in p.stderr and "array_len" in p.stderr  # the key and the suggestion
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_exits_2(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    p = run_train("--out", str(f), *TINY_ARGS)
    assert p.returncode == 2 and "is a file" in p.stderr and "Traceback" not in p.stderr
    assert f.read_text() == "x"
