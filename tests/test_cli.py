"""poh_tune.cli: the launch arguments resolved into a run, before Ray or torch is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from poh_tune.cli import UsageError, build_parser, experiment_info, hparam_domains, resolve
from poh_tune.io import EXPERIMENT_FILE, TUNER_FILE
from tests.cli_runs import TINY_BASE

GRID = {"name": "g", "base": TINY_BASE,
        "experiments": {"lr": {"sweep": {"lr_encoder": [0.002, 0.001]}},
                        "iters": {"sweep": {"max_inner_iters": [1, 2]}}}}


def _args(tmp_path: Path, *argv: str):
    space_file = tmp_path / "g.yaml"
    space_file.write_text(yaml.safe_dump(GRID))
    return build_parser().parse_args(["grid", str(space_file), *argv,
                                      "--storage", str(tmp_path / "runs")])


def test_the_launcher_imports_no_ray_torch_or_optuna():
    """Bad input exits 2 fast: launch and the modules it imports load none of them."""
    code = ("import sys, poh_tune.launch\n"
            "print(sorted(m for m in ('ray', 'torch', 'numpy', 'optuna', 'tensorboardX')"
            " if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_run_settings_come_from_the_command_line_defaults(tmp_path):
    """max_failures, reuse_actors and progress_every: the parser's defaults, set once."""
    launch = resolve(_args(tmp_path))[2]
    defaults = {k: getattr(build_parser().parse_args(["grid"]), k)
                for k in ("max_failures", "reuse_actors", "progress_every")}
    assert {k: launch[k] for k in defaults} == defaults
    assert resolve(_args(tmp_path, "--max-failures", "0"))[2]["max_failures"] == 0


def test_resume_takes_the_run_record_and_this_command_lines_run_settings(tmp_path):
    space, exp_dir, launch = resolve(_args(tmp_path, "epochs=2", "--name", "r",
                                           "--max-concurrent", "1"))
    exp_dir.mkdir(parents=True)
    (exp_dir / EXPERIMENT_FILE).write_text(yaml.safe_dump(
        experiment_info("grid", space, launch), sort_keys=False))
    (exp_dir / TUNER_FILE).write_bytes(b"")
    args = build_parser().parse_args(["grid", "--resume", "--name", "r", "--max-failures", "5",
                                      "--storage", str(tmp_path / "runs")])
    space2, exp_dir2, launch2 = resolve(args)
    assert exp_dir2 == exp_dir and space2.base.epochs == 2
    assert launch2 == {**launch, "max_failures": 5}
    args = build_parser().parse_args(["optuna", "--resume", "--name", "r",
                                      "--storage", str(tmp_path / "runs")])
    with pytest.raises(UsageError, match="is a grid run, not optuna"):
        resolve(args)


def test_experiment_record_and_hparam_domains_name_the_chosen_experiments(tmp_path):
    space, _, launch = resolve(_args(tmp_path, "--experiment", "lr"))
    info = experiment_info("grid", space, launch)
    assert info["mode"] == "grid" and list(info["experiments"]) == ["lr"]
    assert info["experiments"]["lr"]["swept"] == "lr_encoder"
    assert hparam_domains("grid", space, launch) == {"lr_encoder": {"values": [0.001, 0.002]}}
