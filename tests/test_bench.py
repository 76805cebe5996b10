"""The speed bench: its CLI, its side-by-side seed comparison and its errors (tiny model)."""

import json

import pytest
import torch

from poh_tune import bench

TINY_KEYS = ("array_len", "mask_rate", "train_samples", "dev_samples", "test_samples",
             "batch_size", "d_model", "n_heads", "d_ff", "d_ctrl", "max_inner_iters", "hrm_period")


def ratio_of(num: float, den: float) -> pytest.approx:
    """num / den, where both are times the bench rounded to 4 decimals: the tolerance covers
    that rounding (tiny epochs take about 0.01 s) plus the ratio's own rounding to 3."""
    rel = 5e-5 / num + 5e-5 / den
    # Both parts add up (pytest.approx takes the larger of rel and abs, not their sum).
    return pytest.approx(num / den, abs=rel * num / den + 5e-4)


@pytest.fixture
def run_bench(capsys, tiny_cfg):
    """bench's CLI on the tiny configuration: (exit code, stdout, stderr)."""
    overrides = [f"{k}={getattr(tiny_cfg, k)}" for k in TINY_KEYS]

    def run(*args: str) -> tuple[int, str, str]:
        rc = bench.main([*args, *overrides])
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


def test_seeds_side_by_side_with_the_batch_reference(run_bench):
    rc, out, err = run_bench("--epochs", "3", "--warmup", "0", "--seeds", "3",
                             "--batch-reference")
    assert rc == 0
    res = json.loads(out)
    progress = err.splitlines()  # one line per epoch while it runs, every run's time in it
    assert [line.split(" done")[0] for line in progress] == [
        f"bench: epoch {i}/3" for i in (1, 2, 3)]
    assert all("1 seed " in line and "3 seeds " in line and "3x batch" in line
               for line in progress)
    one, three = res["train_epoch_s_all"], res["train_epoch_s_3_seeds_all"]
    assert len(one) == len(three) == 3
    assert res["train_epoch_s"] == min(one) and res["train_epoch_s_3_seeds"] == min(three)
    assert res["cost_ratio_3_seeds_vs_1"] == ratio_of(min(three), min(one))
    paired = sorted(zip(three, one, strict=True), key=lambda ab: ab[0] / ab[1])
    assert res["cost_ratio_3_seeds_vs_1_paired_median"] == ratio_of(*paired[1])
    assert res["cost_ratio_1_seed_3x_batch_vs_1"] == ratio_of(
        res["train_epoch_s_1_seed_3x_batch"], res["train_epoch_s"])
    # Same FLOPs per epoch for 3 seeds and for one seed on a 3x batch and training set:
    # mfu x time is FLOPs over peak, so it must agree (up to the 4-decimal rounding of each).
    a, ta = res["mfu_3_seeds"], res["train_epoch_s_3_seeds"]
    b, tb = res["mfu_1_seed_3x_batch"], res["train_epoch_s_1_seed_3x_batch"]
    assert a * ta == pytest.approx(b * tb, rel=sum(5e-5 / v for v in (a, ta, b, tb)))
    assert 0 < res["mfu"] < 1.5 and res["peak_gflops"] > 0
    assert res["config"]["d_model"] == 32


def test_precision_reference_times_both_precisions_side_by_side(run_bench):
    rc, out, err = run_bench("--epochs", "3", "--warmup", "0", "--precision-reference")
    assert rc == 0
    res = json.loads(out)
    progress = [line for line in err.splitlines() if line.startswith("bench: epoch")]
    assert len(progress) == 3, err
    assert all("1 seed " in line and "1 seed, bf16 " in line for line in progress)
    fp32, bf16 = res["train_epoch_s_all"], res["train_epoch_s_bf16_all"]
    assert len(fp32) == len(bf16) == 3 and res["train_epoch_s_bf16"] == min(bf16)
    assert res["bf16_speedup"] == ratio_of(min(fp32), min(bf16))
    paired = sorted(zip(fp32, bf16, strict=True), key=lambda ab: ab[0] / ab[1])
    assert res["bf16_speedup_paired_median"] == ratio_of(*paired[1])
    assert all(isinstance(res[k], int) and res[k] > 100
               for k in ("aten_ops_per_step", "aten_ops_per_step_bf16"))
    assert res["precision"] == "fp32" and "seeds" not in res


def test_one_seed_has_no_seed_keys(run_bench):
    rc, out, _ = run_bench("--epochs", "1", "--warmup", "0")
    assert rc == 0
    res = json.loads(out)
    assert "seeds" not in res and not any("seeds" in k for k in res)
    assert isinstance(res["aten_ops_per_step"], int) and res["aten_ops_per_step"] > 100
    assert 0 < res["eval_fraction"] < 10
    # MFU against the FP32 peak by default; both peaks and the AMX flag are reported
    assert res["precision"] == "fp32" and res["peak_gflops"] == res["peak_gflops_fp32"]
    assert res["peak_gflops_bf16"] > 0 and isinstance(res["cpu_amx_bf16"], bool)


def test_bf16_mfu_is_against_the_bf16_peak(run_bench):
    rc, out, _ = run_bench("--epochs", "1", "--warmup", "0", "precision=bf16")
    assert rc == 0
    res = json.loads(out)
    assert res["precision"] == "bf16" and res["config"]["precision"] == "bf16"
    assert res["peak_gflops"] == res["peak_gflops_bf16"]


@pytest.mark.parametrize("kw", [dict(), dict(controller="mlp"), dict(model="baseline"),
                                dict(hrm_period=5, max_inner_iters=7)])
def test_forward_flops_equals_the_matmuls_torch_counts(kw):
    """The MFU numerator, checked against torch's own FLOP counter over a real forward pass.

    Attention is explicit batched matmuls (poh_tune.ensemble), so the counter sees its
    4·L²·d per sample and block (scores and values) too."""
    from torch.utils.flop_counter import FlopCounterMode

    from poh_tune.config import TrialConfig
    from poh_tune.model import ModelConfig, PoHSorter

    cfg = ModelConfig.from_trial(TrialConfig(**kw))
    m = PoHSorter.from_seeds(cfg, [0])
    B, L = 8, cfg.array_len
    g = torch.Generator().manual_seed(1)
    x, obs = torch.randn(1, B, L, generator=g), torch.rand(1, B, L, generator=g) < 0.5
    counter = FlopCounterMode(display=False)
    with counter:
        out = m(x, obs, keep_hidden=True)
        m.pointer.logits(out.hidden.transpose(0, 1).reshape(1, -1, L, cfg.d_model))
    assert counter.get_total_flops() == bench.forward_flops(cfg, B, pointer=True)


def test_aten_ops_per_step_counts_the_step_the_profiler_sees(tiny_cfg):
    """The bench's count equals one taken here with the legacy autograd profiler over the same
    step, and it measures the model: the baseline (one block, no controller) has far fewer
    calls than PoH (a block and a controller step per iteration)."""
    from poh_tune.trainer import TrialRunner

    cfg = tiny_cfg.replace(seeds=[1], controller_warmup_epochs=0)
    steps = TrialRunner(cfg).train_steps()
    next(steps)
    with torch.autograd.profiler.profile() as prof:
        next(steps)
    direct = sum(1 for e in prof.function_events if e.name.startswith("aten::"))
    poh = bench.aten_ops_per_step(cfg)
    assert poh == direct
    baseline = bench.aten_ops_per_step(cfg.replace(model="baseline"))
    assert 100 < baseline < poh / 2
    with pytest.raises(ValueError, match="two optimizer steps"):
        bench.aten_ops_per_step(cfg.replace(train_samples=cfg.batch_size))


@pytest.mark.parametrize("args, named", [(["--seeds", "0"], "--seeds"),
                                         (["--epochs", "0"], "--epochs"),
                                         (["--warmup", "-1"], "--warmup")])
def test_bad_counts_are_one_line_errors(run_bench, args, named):
    rc, out, err = run_bench(*args)
    assert rc == 2 and out == ""
    assert err.startswith("error:") and named in err and err.count("\n") == 1


def test_bad_config_key_is_an_error(run_bench):
    rc, out, err = run_bench("--epochs", "1", "no_such_key=3")
    assert rc == 2 and out == "" and "no_such_key" in err


def test_epochs_are_interleaved_step_by_step(tiny_cfg):
    """Real runners: every optimizer step of one is followed by one of the other while both
    have steps left; then the longer one finishes alone, and both are evaluated once."""
    runs = [bench.Timed(tiny_cfg.replace(seeds=[1])),
            bench.Timed(tiny_cfg.replace(seeds=[1, 2], train_samples=2 * tiny_cfg.train_samples))]
    log: list[int] = []  # which run took each optimizer step, in order
    for i, r in enumerate(runs):
        steps = r.runner.train_steps
        r.runner.train_steps = lambda steps=steps, i=i: (log.append(i) for _ in steps())
    bench.interleaved_epoch(runs)
    n0 = tiny_cfg.train_samples // tiny_cfg.batch_size
    assert log[: 2 * n0] == [0, 1] * n0  # alternate while both have steps left
    assert log[2 * n0:] == [1] * n0  # then the longer one alone
    assert all(r.runner.epoch == 1 and len(r.train_s) == len(r.eval_s) == 1 for r in runs)


def test_split_reference_turns_the_cpu_split_off_only_inside_its_steps(run_bench,
                                                                      two_torch_threads):
    from poh_tune.matmul import split_point

    big = (5, torch.device("cpu"), 640, 128, 384)
    on, off = bench.Timed.__new__(bench.Timed), bench.Timed.__new__(bench.Timed)
    on.split, off.split = True, False
    with on.matmuls():
        assert split_point(*big) == 4  # 4 members through bmm, 1 alone
    with off.matmuls():
        assert split_point(*big) == 5  # every member through one bmm
    assert split_point(*big) == 4  # restored
    rc, out, _ = run_bench("--epochs", "2", "--warmup", "0", "--seeds", "2", "--split-reference")
    res = json.loads(out)
    assert rc == 0 and len(res["train_epoch_s_2_seeds_all"]) == 2
    assert res["split_speedup_2_seeds"] == ratio_of(
        res["train_epoch_s_2_seeds_bmm"], res["train_epoch_s_2_seeds"])
    assert split_point(*big) == 4  # the bench leaves the model as it found it


def test_device_bench_runs_eager_and_graphed_side_by_side(tiny_cfg):
    """The GPU bench's code on the CPU (both runs eager there): same results, every figure."""
    from poh_tune.bench_cuda import bench_device

    res = bench_device(tiny_cfg.replace(controller_warmup_epochs=0), "cpu", epochs=1, seeds=2,
                       pack=2)
    assert res["members"] == 4 and res["configs"] == 2
    assert res["max_abs_diff"] == {"train_loss": 0.0, "tau": 0.0, "test_tau": 0.0}
    assert res["graphs"] == {"step": 0, "eval": 0, "failure": None}
    for mode in ("eager", "graphed"):
        prof = res[f"{mode}_profile"]
        assert prof["aten_ops_per_step"] > 100 and prof["kernels_per_step"] == 0
        assert res[f"{mode}_step_ms"] > 0


def test_device_bench_without_cuda_is_a_one_line_error(capsys):
    import torch

    from poh_tune import bench

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert bench.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: torch sees no CUDA device") and err.count("\n") == 1


def test_spec_config_step_stays_within_half_the_old_aten_calls():
    """The eager step's budget: 8,145 aten calls per optimizer step before the step was
    trimmed (hand-written layers, the PoH loop on token rows), at most half now (SPEC PoH-HRM,
    one seed, batch 32, controller active; counts are exact for a torch version)."""
    from poh_tune.config import TrialConfig

    n = bench.aten_ops_per_step(TrialConfig(seeds=(1,), controller_warmup_epochs=0,
                                            train_samples=64))
    assert 2000 < n <= 8145 // 2
