import dataclasses
import math

import pytest
import torch

from poh_tune.config import TrialConfig
from poh_tune.model import HRMCarry, HRMController, ModelConfig, PoHSorter


def tiny_model_cfg(**kw) -> ModelConfig:
    return ModelConfig.from_trial(TrialConfig(**{
        **dict(array_len=8, d_model=32, n_heads=4, d_ff=64, d_ctrl=16, max_inner_iters=6,
               hrm_period=3), **kw}))


def small_model(**kw) -> PoHSorter:
    return PoHSorter.from_seeds(tiny_model_cfg(**kw), [0])


def inputs(B=5, L=8, S=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, L, generator=g), torch.rand(S, B, L, generator=g) < 0.5


def test_model_config_is_the_trial_configs_model_part():
    """ModelConfig holds no default of its own: every field is a TrialConfig key, read from it."""
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(ModelConfig))
    trial = TrialConfig(d_model=64, controller="mlp", precision="bf16")
    mc = ModelConfig.from_trial(trial)
    assert dataclasses.asdict(mc) == {k: getattr(trial, k) for k in dataclasses.asdict(mc)}
    assert "lr_encoder" not in dataclasses.asdict(mc)  # nothing about training
    assert mc.is_poh and mc.n_iters == trial.max_inner_iters
    baseline = ModelConfig.from_trial(trial.replace(model="baseline"))
    assert not baseline.is_poh and baseline.n_iters == 1


@pytest.mark.parametrize("kw", [dict(), dict(controller="mlp"), dict(model="baseline")])
def test_ensemble_member_equals_the_model_of_its_seed_alone(kw):
    cfg = tiny_model_cfg(**kw)
    ens = PoHSorter.from_seeds(cfg, [3, 4, 5])
    alone = PoHSorter.from_seeds(cfg, [4])
    x, obs = inputs(S=3)
    out_ens = ens(x, obs, 1.3).scores[:, 1]
    out_alone = alone(x[1:2], obs[1:2], 1.3).scores[:, 0]
    assert torch.allclose(out_ens, out_alone, atol=1e-5)
    other = PoHSorter.from_seeds(cfg, [6])(x[1:2], obs[1:2], 1.3).scores[:, 0]
    assert not torch.allclose(out_ens, other, atol=1e-3)  # a different seed: different model


def test_alpha_is_a_distribution_and_shapes():
    m = small_model()
    x, obs = inputs()
    out = m(x, obs, temperature=1.5, keep_hidden=True)
    assert out.scores.shape == (6, 1, 5, 8)
    assert out.hidden.shape == (6, 1, 5, 8, 32)
    assert out.alphas.shape == (6, 1, 5, 8, 4)
    assert torch.allclose(out.alphas.sum(-1), torch.ones(6, 1, 5, 8), atol=1e-6)
    assert (out.alphas > 0).all()


def test_temperature_sharpens_routing():
    m = small_model()
    x, obs = inputs()
    hot = m(x, obs, temperature=5.0).alphas
    cold = m(x, obs, temperature=0.2).alphas
    ent = lambda a: -(a * a.log()).sum(-1).mean()  # noqa: E731
    assert ent(cold) < ent(hot)


def test_z_H_changes_only_on_period_iterations_in_forward():
    m = small_model(max_inner_iters=7, hrm_period=3)
    with torch.no_grad():
        m.controller.z_H0.normal_()
    x, obs = inputs()
    z_H = m(x, obs, keep_z_H=True).z_H  # (T, S, B*L, c)
    prev = m.controller.z_H0.expand_as(z_H[0])
    for t in range(7):
        changed = (z_H[t] != prev).any(-1)  # (S, B*L): per token of every sample
        assert changed.all().item() == (t % 3 == 0), t
        assert changed.any().item() == (t % 3 == 0), t
        prev = z_H[t]


def test_hrm_cached_z_H_projections_equal_the_concatenated_inputs():
    """The controller caches z_H's share of the fast cell's gates and of the router; iterated
    over mixed per-member periods it must equal reading [u, z_H] and [z_L, z_H] afresh."""
    torch.manual_seed(0)
    periods = [3, 2, 5]
    ctrl = HRMController(3, d_model=16, d_ctrl=8, n_heads=4, period=periods)
    with torch.no_grad():
        ctrl.z_H0.normal_()
    B, L = 4, 5
    carry = ctrl.init_carry(B * L)
    z_L, z_H = carry.z_L, carry.z_H
    for it in range(7):
        x = torch.randn(3, B, L, 16)
        logits, carry = ctrl.step(carry, x, it)
        u = ctrl.inp(x).reshape(3, B * L, -1)
        z_L = ctrl.cell_L(torch.cat([u, z_H], -1), z_L)
        upd = torch.tensor([it % p == 0 for p in periods]).view(3, 1, 1)
        z_H = torch.where(upd, ctrl.cell_H(z_L, z_H), z_H)
        ref = ctrl.router(torch.cat([z_L, z_H], -1)).view(3, B, L, -1)
        assert torch.allclose(carry.z_L, z_L, atol=1e-5), it
        assert torch.allclose(carry.z_H, z_H, atol=1e-5), it
        assert torch.allclose(logits, ref, atol=1e-5), it


def test_z_H_update_is_decided_per_member():
    """Members with periods 4, 3, 1 and 2 at iterations 0-8: z_H moves exactly for the members
    whose period divides the iteration, every token of them, and z_L moves every iteration."""
    torch.manual_seed(0)
    periods = [4, 3, 1, 2]
    ctrl = HRMController(4, d_model=16, d_ctrl=8, n_heads=4, period=periods)
    B, L = 6, 5
    for t in range(9):
        carry = HRMCarry(torch.randn(4, B * L, 8), torch.randn(4, B * L, 8))
        _, new = ctrl.step(carry, torch.randn(4, B, L, 16), t)
        changed = (new.z_H != carry.z_H).any(-1)  # (S, B*L)
        for s, p in enumerate(periods):
            assert changed[s].all().item() == (t % p == 0) == changed[s].any().item(), (t, s)
        assert (new.z_L != carry.z_L).any(-1).all()  # the fast state moves every iteration


def test_members_with_their_own_periods_equal_each_alone():
    cfg = tiny_model_cfg(max_inner_iters=7)
    ens = PoHSorter.from_seeds(cfg, [3, 4, 5], hrm_periods=[2, 3, 5])
    x, obs = inputs(S=3)
    temps = torch.tensor([0.7, 1.3, 2.0])
    out = ens(x, obs, temps).scores
    for s, (seed, period) in enumerate(zip([3, 4, 5], [2, 3, 5], strict=True)):
        alone = PoHSorter.from_seeds(tiny_model_cfg(max_inner_iters=7, hrm_period=period), [seed])
        ref = alone(x[s:s + 1], obs[s:s + 1], float(temps[s])).scores[:, 0]
        torch.testing.assert_close(out[:, s], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("controller", ["hrm", "mlp"])
def test_grad_mode_last_cuts_the_first_iterations(controller):
    x, obs = inputs()
    for mode, reaches in (("full", True), ("last", False)):
        m = small_model(grad_mode=mode, controller=controller)
        seen = []  # (state, alpha) entering the block at every iteration
        m.block.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(args))
        out = m(x, obs)
        loss = out.scores[-1].pow(2).sum()  # supervise the last iteration only
        z0, a0 = seen[0][:2]
        zl, al = seen[-1][:2]
        g = torch.autograd.grad(loss, [z0, a0, al], allow_unused=True, retain_graph=True)
        assert g[2] is not None and g[2].abs().sum() > 0  # the last iteration's routing learns
        assert zl.requires_grad == reaches  # "last" feeds it a detached state
        for t in g[:2]:  # the first iteration's input and routing
            assert (t is not None and t.abs().sum() > 0) == reaches, mode
        enc = torch.autograd.grad(loss, m.encoder.ff1.weight, allow_unused=True)[0]
        assert (enc is not None and enc.abs().sum() > 0) == reaches


def test_baseline_is_one_pass_without_controller():
    m = small_model(model="baseline")
    x, obs = inputs()
    out = m(x, obs)
    assert out.scores.shape == (1, 1, 5, 8) and out.alphas is None
    assert m.controller_parameters() == []


def test_pointer_greedy_returns_permutations_and_teacher_forcing_is_finite():
    m = small_model()
    h = torch.randn(1, 7, 8, 32)
    ranks = m.pointer.greedy_ranks(h)[0]
    assert torch.equal(ranks.sort(-1).values, torch.arange(8).expand(7, 8))
    target = torch.rand(1, 7, 8).argsort(-1).argsort(-1)
    logits = m.pointer.teacher_forced(h, target)[0]
    perm = target[0].argsort(-1)
    assert torch.isfinite(logits.gather(2, perm.unsqueeze(-1))).all()
    # rank r has exactly L - r positions still free
    assert torch.equal(torch.isfinite(logits).sum(-1), (8 - torch.arange(8)).expand(7, 8))


def test_linear_init_matches_torch_default_bounds():
    m = PoHSorter(tiny_model_cfg(), 1)
    w = m.block.ff1.weight
    assert w.abs().max() <= 1 / math.sqrt(32) and w.std() > 0.5 / math.sqrt(3 * 32)


def reference_forward(m: PoHSorter, x, obs, temperature=1.0):
    """PoH forward written out without the controller's z_H cache: the fast cell reads
    [u, z_H] and the router [z_L, z_H] through their full weights, every iteration."""
    cfg, ctrl = m.cfg, m.controller
    S, B, L = x.shape
    z = m.encode(x, obs).view(S, B, L, -1)
    z_L = ctrl.z_L0.expand(S, B * L, -1)
    z_H = ctrl.z_H0.expand(S, B * L, -1)
    scores = []
    for t in range(cfg.max_inner_iters):
        if t > 0 and cfg.grad_mode == "last":
            z, z_L, z_H = z.detach(), z_L.detach(), z_H.detach()
        u = ctrl.inp(z).reshape(S, B * L, -1)
        z_L = ctrl.cell_L(torch.cat([u, z_H], -1), z_L)
        if t % cfg.hrm_period == 0:
            z_H = ctrl.cell_H(z_L, z_H)
        logits = ctrl.router(torch.cat([z_L, z_H], -1)).view(S, B, L, -1)
        z = m.block(z, torch.softmax(logits / temperature, -1))
        scores.append(m.score_head(z).squeeze(-1))
    return torch.stack(scores)


@pytest.mark.parametrize("grad_mode", ["full", "last"])
@pytest.mark.parametrize("t_loss", [1, 2, 5])  # iterations that do not update z_H (period 3)
def test_hrm_cache_gives_the_uncached_gradients(grad_mode, t_loss):
    """A loss on one non-period iteration: the router's and fast cell's z_H weights and biases
    get the gradient of the plain formulas (grad_mode=last once starved them: the cache was
    detached with the state)."""
    m = small_model(grad_mode=grad_mode)
    x, obs = inputs()
    ctrl = m.controller
    params = {"router.weight": ctrl.router.weight, "router.bias": ctrl.router.bias,
              "cell_L.ih.weight": ctrl.cell_L.ih.weight, "cell_L.ih.bias": ctrl.cell_L.ih.bias,
              "cell_H.ih.weight": ctrl.cell_H.ih.weight}
    got = torch.autograd.grad(m(x, obs).scores[t_loss].pow(2).sum(), list(params.values()),
                              allow_unused=True)
    ref = torch.autograd.grad(reference_forward(m, x, obs)[t_loss].pow(2).sum(),
                              list(params.values()), allow_unused=True)
    for (name, p), g, r in zip(params.items(), got, ref, strict=True):
        g = torch.zeros_like(p) if g is None else g
        r = torch.zeros_like(p) if r is None else r
        # cell_H does not reach a non-period iteration's loss under grad_mode=last
        reaches = not (name.startswith("cell_H") and grad_mode == "last")
        assert (r.abs().sum() > 0) == reaches, name
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)
