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
