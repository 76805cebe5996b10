"""poh_tune.tuner: what Tune is given for a resolved run (no Ray started, no trial run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from poh_tune.cli import build_parser, resolve
from poh_tune.tuner import grid_param_space, make_search

TINY_BASE = dict(array_len=4, train_samples=16, dev_samples=8, test_samples=8, epochs=1,
                 batch_size=16, max_inner_iters=1, hrm_period=1, d_model=8, n_heads=2, d_ff=8,
                 d_ctrl=4, seeds=[1], controller_warmup_epochs=0)
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

