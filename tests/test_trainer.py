import math

import numpy as np
import pytest
import torch

from poh_tune.config import TrialConfig
from poh_tune.data import SortData
from poh_tune.trainer import (
    TrainingDiverged,
    TrialRunner,
    aggregate,
    entropy_weight_at,
    temperature_at,
)


def test_schedules_follow_the_spec_formulas():
    cfg = TrialConfig()  # T0 2.0, T_min 0.8, decay 0.95; w0 1e-3, rate 0.5, every 5
    temps = [temperature_at(cfg, e) for e in range(40)]
    assert temps[0] == 2.0 and temps[1] == pytest.approx(1.9) and temps[2] == pytest.approx(1.805)
    first_floor = next(e for e in range(40) if 2.0 * 0.95**e < 0.8)  # 0.95^18 = 0.397
    assert first_floor == 18
    assert temps[17] == pytest.approx(2.0 * 0.95**17) and temps[17] > 0.8
    assert all(t == 0.8 for t in temps[18:])
    ws = [entropy_weight_at(cfg, e) for e in range(16)]
    assert ws[:5] == [1e-3] * 5
    assert ws[5:10] == [5e-4] * 5
    assert ws[10:15] == [2.5e-4] * 5
    assert ws[15] == pytest.approx(1.25e-4)


def _ctrl_snapshot(t: TrialRunner):
    return [p.detach().clone() for p in t.ctrl_params]


def test_controller_frozen_through_warmup_then_moves(tiny_cfg):
    cfg = tiny_cfg.replace(controller_warmup_epochs=2, epochs=3)
    t = TrialRunner(cfg)
    before = _ctrl_snapshot(t)
    enc_before = [p.detach().clone() for p in t.enc_params]
    for e in range(2):
        m = t.run_epoch()
        assert m["controller_frozen"] is True
        assert all(torch.equal(a, b) for a, b in zip(before, _ctrl_snapshot(t), strict=True)), e
    assert any(not torch.equal(a, b.detach()) for a, b in zip(enc_before, t.enc_params, strict=True))
    m = t.run_epoch()
    assert m["controller_frozen"] is False
    after = _ctrl_snapshot(t)
    for s in range(len(cfg.seeds)):  # every seed's controller moves
        assert any(not torch.equal(a[s], b[s]) for a, b in zip(before, after, strict=True))


def _controller_grad(cfg, entropy_reg):
    t = TrialRunner(cfg.replace(entropy_reg=entropy_reg, seeds=[1]))
    d = t.data["train"]
    x, obs = d.inputs()
    out = t.model(x[:, :16], obs[:, :16], 1.0)
    b = SortData(d.values[:, :16], d.obs_mask[:, :16], d.perm[:, :16], d.ranks[:, :16])
    loss, _ = t.loss_fn(out, b, torch.full((1,), entropy_reg))
    loss.sum().backward()
    return torch.cat([p.grad.flatten() for p in t.ctrl_params])


def test_entropy_term_changes_the_controller_gradient(tiny_cfg):
    g0 = _controller_grad(tiny_cfg, 0.0)
    g1 = _controller_grad(tiny_cfg, 0.5)
    g2 = _controller_grad(tiny_cfg, -0.5)
    assert not torch.allclose(g0, g1)
    # The entropy term is linear in its weight: the three gradients lie on one line.
    assert torch.allclose(g1 - g0, g0 - g2, atol=1e-6)


def test_member_clipping_equals_clip_grad_norm_of_each_member():
    """Each member's gradient clipped on its own, with its own max norm."""
    from poh_tune.optim import MemberAdamW

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 4, 5)), torch.nn.Parameter(torch.randn(3, 1, 5))]
    opt = MemberAdamW(ps, [1e-3] * 3, [0.0] * 3, [0.5, 0.5, 100.0])
    grads = [torch.randn_like(p) * torch.tensor([0.01, 1.0, 10.0]).view(3, 1, 1) for p in ps]
    for p, g in zip(ps, grads, strict=True):
        p.grad.copy_(g)  # the gradient is a view into the optimizer's flat buffer
    refs = []
    for s, norm in enumerate([0.5, 0.5, 100.0]):
        single = [g[s].clone().requires_grad_() for g in grads]
        for q in single:
            q.grad = q.detach().clone()
        torch.nn.utils.clip_grad_norm_(single, norm)
        refs.append([q.grad for q in single])
    opt.clip()
    for s in range(3):
        for p, r in zip(ps, refs[s], strict=True):
            torch.testing.assert_close(p.grad[s], r, rtol=1e-6, atol=1e-7)
    assert torch.equal(ps[0].grad[2], grads[0][2])  # norm 100 > its norm (about 55): unclipped


def test_member_adamw_equals_torch_adamw_per_member_and_frozen_members_stay():
    """Members with their own lr and weight decay step as torch's AdamW on each alone; a frozen
    member keeps its parameters, moments and step count (its warm-up runs longer)."""
    from poh_tune.optim import MemberAdamW

    torch.manual_seed(1)
    init = [torch.randn(3, 4, 5), torch.randn(3, 1, 5)]
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    lrs, wds = [1e-2, 3e-3, 1e-2], [0.01, 0.0, 0.1]
    opt = MemberAdamW(ps, lrs, wds, [1e9] * 3)
    refs = []
    for s in range(3):
        single = [torch.nn.Parameter(x[s].clone()) for x in init]
        refs.append((single, torch.optim.AdamW(single, lr=lrs[s], weight_decay=wds[s],
                                               betas=(0.9, 0.98))))
    active_by_step = [[True, False, True], [True, False, True], [True, True, True]]
    for active in active_by_step:
        grads = [torch.randn_like(x) for x in init]
        opt.zero_grad()
        for p, g in zip(ps, grads, strict=True):
            p.grad.add_(g)
        opt.step(active)
        for s, (single, ref_opt) in enumerate(refs):
            if active[s]:
                for q, g in zip(single, grads, strict=True):
                    q.grad = g[s].clone()
                ref_opt.step()
    for s, (single, _) in enumerate(refs):
        for p, q in zip(ps, single, strict=True):
            torch.testing.assert_close(p[s], q, rtol=1e-5, atol=1e-6)
    # member 1 was frozen for two steps: one step taken, and it moved off its initial value
    assert not torch.equal(ps[0][1], init[0][1])
    steps = [float(opt.opt.state[r]["step"]) for r in opt.rows]
    assert steps == [3.0, 1.0, 3.0]


@pytest.mark.parametrize("split", [False, True], ids=["bmm", "split-matmul"])
def test_seeds_trained_together_equal_each_seed_alone(tiny_cfg, split, two_torch_threads):
    from poh_tune.matmul import cpu_split

    # 3 members on 2 threads: with the split, 2 through bmm and 1 alone (the path 5 seeds on
    # this 2-core machine take); without it, all 3 through one bmm.
    cfg = tiny_cfg.replace(seeds=[1, 2, 3], epochs=3, threads=2)
    together = TrialRunner(cfg)
    alone = {s: TrialRunner(cfg.replace(seeds=[s])) for s in (1, 3)}
    for _ in range(3):
        with cpu_split(0 if split else None):
            per = together.run_epoch_per_seed()
        for idx, s in ((0, 1), (2, 3)):
            ref = alone[s].run_epoch_per_seed()[0]
            for k in ("train_loss", "tau", "tau_all", "best_tau", "test_tau", "herfindahl"):
                assert per[idx][k] == pytest.approx(ref[k], abs=2e-4), (s, k)
    # and the members really differ from each other
    assert per[0]["train_loss"] != per[1]["train_loss"]


def _comparable(v):
    """A record with nan (a CI below 3 seeds) spelled "nan", so that == compares it."""
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, dict):
        return {k: _comparable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_comparable(x) for x in v]
    return v


def test_same_seed_reproduces_metrics_exactly(tiny_cfg):
    a = TrialRunner(tiny_cfg)
    b = TrialRunner(tiny_cfg)
    for _ in range(2):
        ma, mb = a.run_epoch(), b.run_epoch()
        ma.pop("epoch_s"), mb.pop("epoch_s")
        assert _comparable(ma) == _comparable(mb)
    c = TrialRunner(tiny_cfg.replace(seeds=[7, 8]))
    assert c.run_epoch()["train_loss"] != TrialRunner(tiny_cfg).run_epoch()["train_loss"]


def test_loss_falls_and_tau_rises(tiny_cfg):
    cfg = tiny_cfg.replace(epochs=8, seeds=[1], train_samples=128)
    r = TrialRunner(cfg)
    hist = [r.run_epoch() for _ in range(8)]
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    assert hist[-1]["best_tau"] > hist[0]["tau"]


def test_resume_from_checkpoint_matches_uninterrupted(tiny_cfg, tmp_path):
    full = TrialRunner(tiny_cfg)
    ref = [full.run_epoch() for _ in range(3)]
    part = TrialRunner(tiny_cfg)
    part.run_epoch()
    part.save(tmp_path / "ck.pt")
    resumed = TrialRunner(tiny_cfg)
    resumed.load(tmp_path / "ck.pt")
    assert resumed.epoch == 1
    got = [resumed.run_epoch() for _ in range(2)]
    for a, b in zip(ref[1:], got, strict=True):
        a, b = dict(a), dict(b)
        a.pop("epoch_s"), b.pop("epoch_s")
        assert _comparable(a) == _comparable(b)


@pytest.mark.parametrize("kw", [
    dict(loss="listnet"), dict(loss="soft_sort"), dict(loss="combined"), dict(loss="pointer_ce"),
    dict(controller="mlp", deep_supervision="none"), dict(grad_mode="last", deep_supervision="uniform"),
    dict(model="baseline"), dict(loss_pairs="all"),
])
def test_every_variant_trains_and_reports_every_iteration(tiny_cfg, kw):
    cfg = tiny_cfg.replace(epochs=1, seeds=[1], **kw)
    m = TrialRunner(cfg).run_epoch()
    n_iter = 1 if cfg.model == "baseline" else cfg.max_inner_iters
    assert len(m["tau_iter"]) == n_iter
    assert math.isfinite(m["train_loss"]) and -1 <= m["tau"] <= 1
    assert m["tau_iter"][-1] == pytest.approx(m["tau"], abs=1e-5)
    if cfg.model == "pot":
        assert len(m["entropy_iter"]) == n_iter
        assert len(m["alpha"]) == n_iter and {len(r) for r in m["alpha"]} == {cfg.n_heads}
        assert all(sum(r) == pytest.approx(1.0, abs=1e-5) for r in m["alpha"])  # α sums to 1


def test_nan_loss_raises_with_seed_and_epoch(tiny_cfg):
    t = TrialRunner(tiny_cfg.replace(seeds=[1, 2]))
    with torch.no_grad():
        t.model.score_head.weight[1].fill_(float("nan"))  # only seed 2's member
    with pytest.raises(TrainingDiverged, match="seed 2, epoch 1"):
        t.run_epoch()


def test_aggregate_means_per_seed_and_ci():
    stats = pytest.importorskip("scipy.stats")
    per = [{"epoch": 3, "tau": v, "test_tau": v - 0.01, "epoch_s": 1.0, "controller_frozen": False,
            "tau_iter": [v / 2, v], "alpha": [[v, 1 - v]]}
           for v in (0.9, 0.94, 0.95)]
    m = aggregate(per, [1, 2, 3])
    assert m["tau"] == pytest.approx(0.93)
    assert m["tau_iter"] == pytest.approx([0.465, 0.93])  # per-iteration lists: elementwise
    assert m["alpha"] == [[pytest.approx(0.93), pytest.approx(0.07)]]
    assert [r["seed"] for r in m["per_seed"]] == [1, 2, 3]
    assert m["per_seed"][1]["tau"] == 0.94 and m["per_seed"][2]["test_tau"] == pytest.approx(0.94)
    assert math.isnan(m["per_seed"][0]["test_tau_all"])  # a value the seeds do not have
    assert m["epoch_s"] == 1.0 and m["epoch"] == 3
    lo, hi = stats.t.interval(0.95, 2, loc=0.93, scale=stats.sem([0.9, 0.94, 0.95]))
    assert m["tau_ci95"] == pytest.approx((hi - lo) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["pot", "baseline"])
def test_learns_the_spec_task_within_ten_epochs(model):
    """SPEC task (L=20, mask 0.5, 1000 samples): dev τ >= 0.90 within 10 epochs on one seed."""
    cfg = TrialConfig(model=model, seeds=(1,), epochs=10)
    r = TrialRunner(cfg)
    taus = []
    while not r.done and (not taus or max(taus) < 0.90):
        taus.append(r.run_epoch()["tau"])
    assert max(taus) >= 0.90, taus


@pytest.mark.parametrize("split", ["dev", "test"])
def test_a_collapsed_model_scores_tau_zero(tiny_cfg, split):
    """Equal scores everywhere are ties: τ is exactly 0 (SPEC), not the noise of ordering tied
    scores by position; exact-position accuracy still reads the (stable) ranks."""
    runner = TrialRunner(tiny_cfg.replace(dev_samples=200, test_samples=200), "cpu")
    with torch.no_grad():  # the score head ignores its input: every position scores 0.25
        runner.model.score_head.weight.zero_()
        runner.model.score_head.bias.fill_(0.25)
    for m in runner.evaluate(split, temperature=1.0):
        assert m["tau"] == 0.0 and m["tau_all"] == 0.0
        assert m["tau_iter"] == [0.0] * tiny_cfg.max_inner_iters
        # ranks of tied scores are the positions: right only where a position holds its own rank
        assert 0.0 < m["accuracy"] < 0.5


def test_configurations_packed_together_equal_each_alone(tiny_cfg, two_torch_threads):
    """Three configurations that differ in every key a pack may vary, trained as one ensemble:
    every member's metrics equal training its configuration alone (float tolerance)."""
    base = tiny_cfg.replace(epochs=4, threads=2)
    cfgs = [
        base.replace(seeds=[1, 2]),
        base.replace(seeds=[2, 5], temperature_init=1.5, temperature_min=0.5,
                     temperature_decay=0.8, entropy_reg=-0.01, entropy_decay_rate=0.3,
                     entropy_decay_every=1, hrm_period=3, controller_warmup_epochs=2,
                     lr_encoder=1e-3, lr_controller=5e-4, weight_decay=0.1, clip_encoder=0.05,
                     clip_controller=0.01),
        base.replace(seeds=[3], temperature_init=3.0, entropy_reg=0.05, hrm_period=1,
                     controller_warmup_epochs=0, lr_controller=1e-3),
    ]
    from poh_tune.config import PACK_SHAREABLE

    differs = {k for k in PACK_SHAREABLE if getattr(cfgs[0], k) != getattr(cfgs[1], k)}
    assert differs == set(PACK_SHAREABLE)  # the test covers every shareable key
    packed = TrialRunner(cfgs, "cpu")
    alone = [TrialRunner(c, "cpu") for c in cfgs]
    keys = ("train_loss", "train_entropy", "temperature", "entropy_weight", "tau", "tau_all",
            "best_tau", "test_tau", "herfindahl", "max_alpha", "tau_iter", "entropy_iter")
    for _ in range(4):
        per_config = packed.run_epoch_per_config()
        for c, runner in enumerate(alone):
            ref = runner.run_epoch()
            got = per_config[c]
            assert got["controller_frozen"] == ref["controller_frozen"]
            for k in keys:
                assert got[k] == pytest.approx(ref[k], abs=2e-4), (c, k)
            assert np.allclose(got["alpha"], ref["alpha"], atol=2e-4), c
            assert [r["seed"] for r in got["per_seed"]] == list(cfgs[c].seeds)
            for g, r in zip(got["per_seed"], ref["per_seed"], strict=True):
                assert g["tau"] == pytest.approx(r["tau"], abs=2e-4), (c, g["seed"])
    # the configurations really train differently
    assert per_config[0]["train_loss"] != pytest.approx(per_config[1]["train_loss"], abs=1e-3)


def test_a_pack_refuses_configurations_of_other_shapes(tiny_cfg):
    with pytest.raises(ValueError, match="differ in max_inner_iters"):
        TrialRunner([tiny_cfg, tiny_cfg.replace(max_inner_iters=3)], "cpu")


def test_bf16_trains_with_fp32_master_weights_and_optimizer_state(tiny_cfg):
    """precision=bf16: parameters, their gradients and AdamW's moments stay FP32; an epoch
    trains, τ rises, and the first epoch's loss is close to the FP32 run's."""
    cfg = tiny_cfg.replace(epochs=4, seeds=[1, 2], train_samples=128, precision="bf16")
    r = TrialRunner(cfg)
    hist = [r.run_epoch() for _ in range(4)]
    assert all(math.isfinite(h["train_loss"]) for h in hist)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["best_tau"] > hist[0]["tau"]
    assert all(p.dtype == torch.float32 for p in r.model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in r.model.parameters() if p.grad is not None)
    for opt in (r.enc_opt, r.ctrl_opt):
        moments = [t for st in opt.opt.state.values() for k, t in st.items() if k != "step"]
        assert moments and all(t.dtype == torch.float32 for t in moments + [opt.flat, opt.grad])
    fp32 = TrialRunner(cfg.replace(precision="fp32")).run_epoch()
    assert hist[0]["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.05)
