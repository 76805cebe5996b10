"""The cluster launch files parse, and every poh_tune command in them is accepted by the real CLI."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from poh_tune.cli import build_parser

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _launch_argv(command: str) -> list[str]:
    tokens = shlex.split(command)
    i = tokens.index("poh_tune.launch")
    assert tokens[i - 2:i] == ["python", "-m"], command
    return tokens[i + 1:]


def _check_cli(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)  # argparse exits (SystemExit) on a flag it lacks
    assert args.command in ("grid", "optuna")


def test_ray_cluster_launcher_yaml():
    text = (LAUNCH / "ray_cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("pip install" in c and "poh_tune" in c for c in cfg["setup_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    # The documented command (in the header comment) must match the CLI.
    cmds = [line.split('"')[1] for line in text.splitlines() if "poh_tune.launch" in line]
    assert cmds
    for c in cmds:
        _check_cli(_launch_argv(c.split("&&")[-1]))


def test_kuberay_rayjob_manifest():
    doc = yaml.safe_load((LAUNCH / "kuberay_rayjob.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["apiVersion"].startswith("ray.io/")
    _check_cli(_launch_argv(doc["spec"]["entrypoint"]))
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in w["template"]["spec"]["containers"][0]["resources"]["limits"]
               for w in workers)
    assert all(isinstance(s, str) for s in _strings(doc))


@pytest.mark.parametrize("env, expect", [
    ({}, ["--gpus-per-trial 0.25", "--name document_grid"]),
    ({"EXPERIMENT": "hrm_period", "RESUME": "1", "GPUS_PER_TRIAL": "0.5"},
     ["--experiment hrm_period", "--resume", "--gpus-per-trial 0.5"]),
])
def test_slurm_script_starts_ray_and_runs_the_grid(tmp_path, env, expect):
    """Run the batch script with stand-ins for srun, scontrol, ray, sleep and python."""
    script = LAUNCH / "slurm_grid.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    stubs = {
        "scontrol": 'printf "nodeA\\nnodeB\\nnodeC\\n"',
        # srun -w NODE CMD...: log it, answer `hostname --ip-address` like a node would.
        "srun": f'echo "srun $*" >> {log}; for a in "$@"; do '
                f'[ "$a" = hostname ] && echo "127.0.0.1"; done; exit 0',
        "sleep": "exit 0",
        "python": f'echo "python $*" >> {log}',
    }
    for name, body in stubs.items():
        f = bin_dir / name
        f.write_text(f"#!/bin/bash\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
               "SLURM_JOB_NODELIST": "nodeA,nodeB,nodeC", "SLURM_CPUS_PER_TASK": "8", **env}
    subprocess.run(["bash", str(script)], env=run_env, check=True, timeout=30)
    calls = log.read_text().splitlines()
    head = [c for c in calls if "ray start --head" in c]
    workers = [c for c in calls if "ray start --address=127.0.0.1:6379" in c]
    assert len(head) == 1 and "-w nodeA" in head[0]
    assert len(workers) == 2 and {"-w nodeB", "-w nodeC"} == {c.split(" ray")[0][-8:] for c in workers}
    py = [c for c in calls if c.startswith("python ")]
    assert len(py) == 1
    argv = _launch_argv(py[0])
    _check_cli(argv)
    assert argv[argv.index("--address") + 1] == "127.0.0.1:6379"
    joined = " ".join(argv)
    assert all(fragment in joined for fragment in expect)
    assert ("--resume" in argv) == (env.get("RESUME") == "1")
