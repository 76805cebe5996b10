"""poh_tune.tuner: what Tune is given for a resolved run (no Ray started, no trial run)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from poh_tune.cli import build_parser, resolve
from poh_tune.tuner import grid_param_space, make_search
from tests.cli_runs import TINY_BASE, free_port, launch_wrapped

SPACES = {
    "grid": {"name": "g", "base": TINY_BASE,
             "experiments": {"lr": {"sweep": {"lr_encoder": [0.001, 0.002, 0.003]}}}},
    "optuna": {"name": "o", "base": TINY_BASE, "num_samples": 2,
               "search": {"entropy_reg": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}},
}


def _resolved(tmp_path: Path, command: str, *argv: str):
    space_file = tmp_path / f"{command}.yaml"
    space_file.write_text(yaml.safe_dump(SPACES[command]))
    args = build_parser().parse_args([command, str(space_file), *argv,
                                      "--storage", str(tmp_path / "runs")])
    return resolve(args)


@pytest.mark.parametrize("command", ["grid", "optuna"])
def test_max_concurrent_zero_means_as_many_as_the_resources_allow_in_both_modes(tmp_path,
                                                                                command):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from poh_tune.search import PohOptunaSearch

    for n in (0, 1, 3):
        space, exp_dir, launch = _resolved(tmp_path, command, "--max-concurrent", str(n),
                                           "--name", f"{command}{n}")
        exp_dir.mkdir(parents=True)  # the Optuna study's file lives there
        alg, _, num_samples, n_trials = make_search(command, space, launch, exp_dir)
        if command == "grid":
            assert isinstance(alg, BasicVariantGenerator) and alg.max_concurrent == n  # 0: none
            assert num_samples == n_trials == 3
        elif n == 0:  # no ConcurrencyLimiter: Tune asks the searcher as resources free up
            assert isinstance(alg, PohOptunaSearch)
        else:
            assert isinstance(alg, ConcurrencyLimiter) and alg.max_concurrent == n
            assert isinstance(alg.searcher, PohOptunaSearch)
    # Without --max-concurrent: the space's max_concurrent, 0 when the file has none.
    assert _resolved(tmp_path, command)[2]["max_concurrent"] == 0


def test_grid_param_space_one_trial_per_configuration_or_per_pack(tmp_path):
    space, _, launch = _resolved(tmp_path, "grid", "--pack", "off")
    param_space, points, num_samples = grid_param_space(space, launch)
    lrs = [{"lr_encoder": v} for v in (0.001, 0.002, 0.003)]
    assert (param_space, points, num_samples) == (lrs[0], lrs, 3)
    space, _, launch = _resolved(tmp_path, "grid", "--pack", "2")
    param_space, points, num_samples = grid_param_space(space, launch)
    assert param_space == {"pack": {"grid_search": [lrs[:2], lrs[2:]]}}
    assert points is None and num_samples == 1



def test_dashboard_is_off_by_default_and_on_loopback_when_asked(monkeypatch):
    """start_ray's ray.init arguments: no dashboard unless --dashboard, and then on 127.0.0.1."""
    import ray

    from poh_tune import cli, tuner

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(os, "environ", dict(os.environ))  # start_ray's settings stay here
    tuner.start_ray(None, 2)
    tuner.start_ray(None, 2, dashboard=True)
    assert calls[0]["include_dashboard"] is False and calls[0]["address"] == "local"
    assert calls[1]["include_dashboard"] is True and calls[1]["dashboard_host"] == "127.0.0.1"
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTER is False  # single-node mode: loopback only
    assert cli.build_parser().parse_args(["grid"]).dashboard is False



def test_address_auto_with_a_stale_cluster_file_exits_2_naming_the_address(tmp_path):
    """`ray start` leaves ray_current_cluster behind when its head stops: --address auto must
    say so in seconds (Ray itself retried for minutes), before Ray is imported."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    try:
        port = free_port()  # nothing listens there
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
        t0 = time.time()
        p = launch_wrapped(["grid", "--smoke", "--address", "auto", "--storage",
                             str(tmp_path / "runs")], {"RAY_TMPDIR": str(ray_tmp)}, 60)
        err = p.stderr.strip()
        assert p.returncode == 2, (p.stdout[-2000:], err[-2000:])
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"no Ray head answers at 127.0.0.1:{port}" in err
        assert str(ray_tmp / "ray" / "ray_current_cluster") in err and "stopped cluster" in err
        assert "NO_RAY" in p.stdout and "--resume" not in err
        assert not (tmp_path / "runs").exists()
        assert time.time() - t0 < 30
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_address_where_nothing_speaks_ray_gives_up_in_bounded_time(tmp_path):
    """A port that accepts connections but never answers (a stale address now taken by another
    program): Ray's join would retry for minutes; poh_tune exits 2 after
    POH_TUNE_ADDRESS_TIMEOUT_S naming the address, having written nothing."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.time()
        p = launch_wrapped(["grid", "--smoke", "--address", address, "--storage",
                             str(tmp_path / "runs")], {"POH_TUNE_ADDRESS_TIMEOUT_S": "10"}, 120)
        wall = time.time() - t0
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
    assert f"error: --address {address}: no Ray cluster answered within 10 s" in p.stderr
    assert "Traceback" not in p.stderr and "--resume" not in p.stderr
    assert wall < 60, wall
    assert not (tmp_path / "runs").exists()
