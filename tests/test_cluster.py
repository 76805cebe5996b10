"""Multi-node placement: a simulated two-node Ray cluster that declares GPUs, fractional GPU trials."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

NODES = 2
GPUS_PER_NODE = 1
GPUS_PER_TRIAL = 0.5  # two trials per node by GPU; the CPUs (3 per node) would allow three


@pytest.fixture
def two_node_cluster():
    # Keep every node on 127.0.0.1 (single-node networking, as on macOS): see RAY_NOTES.md.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 3, "num_gpus": GPUS_PER_NODE,
                                      "include_dashboard": False})
    for _ in range(NODES - 1):
        cluster.add_node(num_cpus=3, num_gpus=GPUS_PER_NODE)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    live = peak = 0
    for _, step in events:  # an end at the same instant as a start is counted first
        live += step
        peak = max(peak, live)
    return peak


@pytest.mark.slow
def test_fractional_gpu_trials_spread_over_nodes(two_node_cluster, tmp_path):
    storage = tmp_path / "runs"
    p = subprocess.run(
        [sys.executable, "-m", "poh_tune.launch", "grid", "--smoke",
         "--experiment", "iterations", "--experiment", "hrm_period",
         "--address", two_node_cluster.address, "--gpus-per-trial", str(GPUS_PER_TRIAL),
         "--cpus-per-trial", "1", "--storage", str(storage), "--name", "cluster", "--no-report",
         # one trial per configuration: this test is about placing many fractional-GPU trials
         # (with GPUs, --pack auto would train the shareable configurations as one trial)
         "--pack", "off"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = list(csv.DictReader(open(storage / "cluster" / "results.csv")))
    assert len(rows) >= 6 and all(r["status"] == "TERMINATED" for r in rows)

    per_node: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        results = [json.loads(x) for x in open(Path(r["trial_dir"]) / "result.json")]
        assert results
        nodes = {x["node_id"] for x in results}
        assert len(nodes) == 1  # a trial stays where Ray put it
        for x in results:
            # The trial saw exactly the GPU Ray gave it, also through CUDA_VISIBLE_DEVICES.
            assert x["gpu_ids"] in {str(i) for i in range(GPUS_PER_NODE)}
            assert x["cuda_visible_devices"] == x["gpu_ids"]
            assert x["device"] == ("cuda" if _cuda() else "cpu")
        per_node[nodes.pop()].append((results[0]["started_at"], results[-1]["reported_at"]))

    assert len(per_node) == NODES  # trials landed on more than one node
    allowed = int(GPUS_PER_NODE / GPUS_PER_TRIAL)
    peaks = {node: _max_overlap(iv) for node, iv in per_node.items()}
    assert all(p <= allowed for p in peaks.values()), peaks  # never more than the GPUs allow
    assert max(peaks.values()) >= 2, peaks  # and fractional trials did share a GPU


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _fake_gpu_cluster(nodes: int, gpus_per_node: int, cpus_per_node: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": cpus_per_node, "num_gpus": gpus_per_node,
                                      "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node, num_gpus=gpus_per_node)
    cluster.wait_for_nodes()
    return cluster


def _auto_packed_grid(cluster, storage: Path, name: str, *extra: str
                      ) -> subprocess.CompletedProcess:
    """The smoke document grid (11 configurations), --pack auto, one GPU per trial."""
    return subprocess.run(
        [sys.executable, "-m", "poh_tune.launch", "grid", "--smoke", "epochs=1",
         "--address", cluster.address, "--gpus-per-trial", "1", "--cpus-per-trial", "1",
         "--storage", str(storage), "--name", name, "--no-report", *extra],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})


def _trials_and_placements(exp: Path) -> tuple[set[str], dict[str, tuple[str, str]], list[str]]:
    """Tune trials (a pack's id, or a lone configuration's), where each ran, the configurations."""
    rows = list(csv.DictReader(open(exp / "results.csv")))
    assert rows and all(r["status"] == "TERMINATED" for r in rows), rows
    trials, placed, configs = set(), {}, []
    for r in rows:
        trial = r["pack_id"] or r["trial_id"]
        trials.add(trial)
        folder = Path(r["trial_dir"]).parent if r["pack_id"] else Path(r["trial_dir"])
        last = [json.loads(x) for x in open(folder / "result.json")][-1]
        placed[trial] = (last["node_id"], last["gpu_ids"])
        spec = yaml.safe_load(open(Path(r["trial_dir"]) / "poh_trial.yaml"))
        configs.append(json.dumps(spec["config"], sort_keys=True))
    return trials, placed, configs


@pytest.mark.slow
def test_pack_auto_fills_the_gpu_slots_of_the_cluster(tmp_path):
    # 8 fake GPUs on two nodes, 1 per trial: at least 8 trials, each on its own GPU. Then 1 GPU:
    # the 5 packs of shareable shapes. Both train the same 11 configurations.
    runs = {}
    for name, (nodes, gpus, cpus) in {"gpus8": (2, 4, 4), "gpus1": (1, 1, 2)}.items():
        cluster = _fake_gpu_cluster(nodes, gpus, cpus)
        try:
            # One slot: the packs run one after another in one reused process (no torch
            # import per trial).
            p = _auto_packed_grid(cluster, tmp_path, name,
                                  *(["--reuse-actors"] if name == "gpus1" else []))
        finally:
            cluster.shutdown()
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs[name] = (p.stdout, *_trials_and_placements(tmp_path / name))

    out8, trials8, placed8, configs8 = runs["gpus8"]
    assert len(trials8) >= 8
    assert len(set(placed8.values())) == 8  # 8 distinct (node, GPU) pairs
    assert all(gpu in {str(i) for i in range(4)} for _, gpu in placed8.values())
    assert f"11 configurations in {len(trials8)} trials on 8 GPU slots" in out8
    out1, trials1, placed1, configs1 = runs["gpus1"]
    assert len(trials1) == 5
    assert {gpu for _, gpu in placed1.values()} == {"0"}
    assert "11 configurations in 5 trials on 1 GPU slots" in out1
    assert len(configs8) == len(configs1) == 11
    assert sorted(configs8) == sorted(configs1) and len(set(configs8)) == 11
