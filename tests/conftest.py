"""Shared fixtures: a tiny configuration that trains in well under a second per epoch."""

from __future__ import annotations

import os

# Every Ray a test starts stays on 127.0.0.1. Ray reads this once, when ray is first imported
# (ray_constants.ENABLE_RAY_CLUSTER), so it must be set before any test module imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest

from poh_tune.config import TrialConfig

TINY = dict(array_len=8, mask_rate=0.5, train_samples=64, dev_samples=32, test_samples=32,
            epochs=3, batch_size=16, seeds=(1, 2), d_model=32, n_heads=4, d_ff=64, d_ctrl=16,
            max_inner_iters=4, hrm_period=2, controller_warmup_epochs=1)


@pytest.fixture
def tiny_cfg() -> TrialConfig:
    return TrialConfig(**TINY)


@pytest.fixture
def two_torch_threads():
    """torch on 2 intra-op threads for the test (the CPU matmul split's case), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
