"""Shared fixtures: a tiny configuration that trains in well under a second per epoch."""

from __future__ import annotations

import pytest

from poh_tune.config import TrialConfig

TINY = dict(array_len=8, mask_rate=0.5, train_samples=64, dev_samples=32, test_samples=32,
            epochs=3, batch_size=16, seeds=(1, 2), d_model=32, n_heads=4, d_ff=64, d_ctrl=16,
            max_inner_iters=4, hrm_period=2, controller_warmup_epochs=1)


@pytest.fixture
def tiny_cfg() -> TrialConfig:
    return TrialConfig(**TINY)
