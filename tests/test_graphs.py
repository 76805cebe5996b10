"""CUDA graphs of whole training steps: the fallback logic everywhere, the graphs where CUDA is."""

from __future__ import annotations

import pytest
import torch

from poh_tune.graphs import GraphedFunction
from poh_tune.trainer import TrialRunner


def test_a_failed_capture_warns_once_and_training_stays_eager(tiny_cfg):
    """The capture is attempted after the warm-up calls of the first variant; when it fails,
    one warning names the reason and every later step runs eagerly, with the same results."""
    attempts = []

    def failing_capture(fn, static, pool):
        attempts.append(len(static))
        raise RuntimeError("operation not permitted when stream is capturing")

    eager = TrialRunner(tiny_cfg, "cpu")
    runner = TrialRunner(tiny_cfg, "cpu")
    runner.graphed_step = GraphedFunction(runner._train_step, runner.device, True,
                                          "training step", capture=failing_capture)
    with pytest.warns(RuntimeWarning, match="capture of the training step failed "
                                            r"\(RuntimeError: operation not permitted"):
        got = runner.run_epoch()
    ref = eager.run_epoch()
    assert attempts == [3]  # once, with idx, temperatures and entropy weights as its buffers
    assert runner.graphed_step.n_graphs == 0 and not runner.graphed_step.enabled
    got2, ref2 = runner.run_epoch(), eager.run_epoch()  # no second attempt, no second warning
    assert attempts == [3]
    for k in ("train_loss", "tau", "test_tau"):
        assert got[k] == ref[k] and got2[k] == ref2[k]


def test_graphs_are_off_on_cpu_and_when_asked(tiny_cfg):
    assert not TrialRunner(tiny_cfg, "cpu").graphed_step.enabled
    if torch.cuda.is_available():
        assert TrialRunner(tiny_cfg, "cuda").graphed_step.enabled
        assert not TrialRunner(tiny_cfg.replace(cuda_graphs="off"), "cuda").graphed_step.enabled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("kw", [dict(), dict(controller_warmup_epochs=1, seeds=(1, 2)),
                                dict(loss="pointer_ce"), dict(model="baseline")])
def test_graphed_training_equals_eager_on_cuda(tiny_cfg, kw):
    """Whole steps and evaluation chunks replayed as CUDA graphs train and measure what eager
    steps do (float tolerance), through the warm-up, the capture and the frozen controller."""
    cfg = tiny_cfg.replace(epochs=4, **kw)
    graphed = TrialRunner(cfg, "cuda")
    eager = TrialRunner(cfg.replace(cuda_graphs="off"), "cuda")
    for _ in range(4):
        got, ref = graphed.run_epoch(), eager.run_epoch()
        for k in ("train_loss", "tau", "tau_all", "best_tau", "test_tau"):
            assert got[k] == pytest.approx(ref[k], abs=2e-4), k
    assert graphed.graphed_step.n_graphs >= 1 and graphed.graphed_step.failure is None
    assert graphed.evaluator.graphed.n_graphs >= 1 and graphed.evaluator.graphed.failure is None
