"""CUDA graphs of whole training steps: the fallback logic everywhere, the graphs where CUDA is."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


# The graph cases the GPU path must cover (issue: smaller last batch, packs partly frozen, with
# different learning rates and mixed hrm_period, bf16, grad_mode=last, the mlp controller, the
# pointer decoder, the baseline). Each is (configurations, what it covers); 72 training samples
# at batch 16 end every epoch with a batch of 8.
def _cases(tiny):
    t = tiny.replace(train_samples=72, epochs=4)
    return {
        "hrm": [t],
        "pointer_ce": [t.replace(loss="pointer_ce")],
        "baseline": [t.replace(model="baseline")],
        "mlp": [t.replace(controller="mlp")],
        "grad_last": [t.replace(grad_mode="last")],
        "bf16": [t.replace(precision="bf16")],
        "pack_partly_frozen": [t, t.replace(controller_warmup_epochs=2, seeds=(3,))],
        "pack_lrs": [t, t.replace(lr_encoder=2e-3, lr_controller=3e-4, seeds=(3,))],
        "pack_hrm_periods": [t, t.replace(hrm_period=1, seeds=(3,))],
    }


CASES = ["hrm", "pointer_ce", "baseline", "mlp", "grad_last", "bf16", "pack_partly_frozen",
         "pack_lrs", "pack_hrm_periods"]


def _copy_into(dst, src):
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    else:
        for d, s in zip(dst, src, strict=True):
            _copy_into(d, s)


def emulated_capture(fn, static, pool):
    """A CPU stand-in for a CUDA capture with the same contract: the outputs are static buffers
    that every replay overwrites, and the inputs are read only from the static buffers. A CUDA
    capture records the step and the replay right after it runs it; here the capture runs it
    and that first replay does nothing, so each call is still exactly one step."""
    out = fn(*static)

    class Graph:
        first = True

        def replay(self):
            if self.first:
                self.first = False
                return
            _copy_into(out, fn(*static))

    return Graph(), out


def _graphed(runner, capture):
    runner.graphed_step = GraphedFunction(runner._train_step, runner.device, True,
                                          "training step", capture=capture)
    runner.evaluator.graphed = GraphedFunction(runner.evaluator.chunk, runner.device, True,
                                               "evaluation", capture=capture)
    return runner


def _expected_graphs(cfgs, improved_epochs: int, eval_chunk: int) -> tuple[int, int]:
    """How many variants reach their capture (the call after WARMUP_CALLS eager ones), worked
    out from the schedule: a training step's variant is its batch size and, with a controller,
    which members' controllers train; an evaluation chunk's is its size and whether it computes
    diagnostics. The test split is evaluated in the epochs where some member's dev τ improved."""
    from collections import Counter

    from poh_tune.graphs import WARMUP_CALLS

    c0 = cfgs[0]
    members = [c for c in cfgs for _ in c.seeds]
    batches = [min(c0.batch_size, c0.train_samples - i)
               for i in range(0, c0.train_samples, c0.batch_size)]
    train = Counter()
    for e in range(c0.epochs):
        active = () if c0.model == "baseline" else tuple(
            e >= c.controller_warmup_epochs for c in members)
        for b in batches:
            train[(b, active)] += 1
    chunks = [min(eval_chunk, c0.dev_samples - i) for i in range(0, c0.dev_samples, eval_chunk)]
    evals = Counter()
    for _ in range(c0.epochs):
        for n in chunks:
            evals[(n, c0.diagnostics)] += 1
    tchunks = [min(eval_chunk, c0.test_samples - i)
               for i in range(0, c0.test_samples, eval_chunk)]
    for _ in range(improved_epochs):
        for n in tchunks:
            evals[(n, False)] += 1
    return (sum(v > WARMUP_CALLS for v in train.values()),
            sum(v > WARMUP_CALLS for v in evals.values()))


def _run_epochs(runner, n: int) -> tuple[list[list[dict]], int]:
    """n epochs of per-seed records, and in how many of them some member's dev τ improved."""
    recs, improved, best = [], 0, None
    for _ in range(n):
        per = runner.run_epoch_per_seed()
        now = [m["best_tau"] for m in per]
        improved += best is None or any(a > b for a, b in zip(now, best, strict=True))
        best = now
        recs.append(per)
    return recs, improved


KEYS = ("train_loss", "tau", "tau_all", "best_tau", "test_tau")


def _check_graphed_equals_eager(cfgs, device, capture, monkeypatch, tol):
    import warnings

    from poh_tune import evaluate

    S, L = sum(len(c.seeds) for c in cfgs), cfgs[0].array_len
    monkeypatch.setattr(evaluate, "EVAL_TOKENS", 12 * S * L)  # dev and test: chunks 12, 12, 8
    graphed = TrialRunner(cfgs, device)
    if capture is not None:
        _graphed(graphed, capture)
    eager = TrialRunner([c.replace(cuda_graphs="off") for c in cfgs], device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, improved = _run_epochs(graphed, cfgs[0].epochs)
    ref, _ = _run_epochs(eager, cfgs[0].epochs)
    assert not [w for w in caught if "capture" in str(w.message)]
    for g_epoch, r_epoch in zip(got, ref, strict=True):
        for g, r in zip(g_epoch, r_epoch, strict=True):
            for k in KEYS:
                assert g[k] == pytest.approx(r[k], abs=tol), k
    want = _expected_graphs(cfgs, improved, 12)
    assert (graphed.graphed_step.n_graphs, graphed.evaluator.graphed.n_graphs) == want
    assert graphed.graphed_step.failure is None and graphed.evaluator.graphed.failure is None
    return graphed


@pytest.mark.parametrize("case", CASES)
def test_graph_variants_and_static_buffers_on_cpu(tiny_cfg, case, monkeypatch):
    """The graph logic with a CPU stand-in for the capture: every case trains and measures what
    eager steps do, with exactly the variants the schedule implies (the baseline one per batch
    size, whatever its warm-up says) and no warning."""
    _check_graphed_equals_eager(_cases(tiny_cfg)[case], "cpu", emulated_capture, monkeypatch,
                                1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("case", CASES)
def test_every_case_graphed_equals_eager_on_cuda(tiny_cfg, case, monkeypatch):
    """Real CUDA graphs: the same cases, exact graph counts, no capture warning."""
    _check_graphed_equals_eager(_cases(tiny_cfg)[case], "cuda", None, monkeypatch, 2e-4)


def _resume_across_a_capture(tiny_cfg, device, capture, tol):
    """A state loaded into a runner that has captured (its graphs are dropped, and it goes on as
    an eager twin with the same history does), and into a fresh runner (as an eager one does)."""
    cfg = tiny_cfg.replace(train_samples=72, epochs=6)
    first = TrialRunner(cfg, device)
    twin = TrialRunner(cfg.replace(cuda_graphs="off"), device)  # the same history, eager
    if capture is not None:
        _graphed(first, capture)
    for _ in range(4):  # past every capture of the warm-up and the trained schedule
        first.run_epoch()
        twin.run_epoch()
    assert first.graphed_step.n_graphs > 0
    # Deep copies: a state dict holds the live tensors, which torch's load would share.
    sd = copy.deepcopy(first.state_dict())
    first.load_state_dict(copy.deepcopy(sd))  # loading replaces the moments the graphs read: they are dropped
    twin.load_state_dict(copy.deepcopy(twin.state_dict()))
    assert first.graphed_step.n_graphs == 0 and first.evaluator.graphed.n_graphs == 0
    resumed = TrialRunner(cfg, device)
    if capture is not None:
        _graphed(resumed, capture)
    resumed.load_state_dict(copy.deepcopy(sd))
    eager = TrialRunner(cfg.replace(cuda_graphs="off"), device)
    eager.load_state_dict(copy.deepcopy(sd))
    for _ in range(2):
        a, a_ref = first.run_epoch(), twin.run_epoch()
        b, b_ref = resumed.run_epoch(), eager.run_epoch()
        for k in KEYS:
            assert a[k] == pytest.approx(a_ref[k], abs=tol), k
            assert b[k] == pytest.approx(b_ref[k], abs=tol), k
    assert first.graphed_step.n_graphs > 0  # captured again after the load


def test_a_resume_across_a_capture_on_cpu(tiny_cfg):
    _resume_across_a_capture(tiny_cfg, "cpu", emulated_capture, 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_resume_across_a_capture_on_cuda(tiny_cfg):
    _resume_across_a_capture(tiny_cfg, "cuda", None, 2e-4)


def _capturable_checkpoint(sd):
    """What a graphed CUDA run saves, loaded on a CPU: every AdamW group capturable, not fused."""
    def forge(opt_sd):
        return {**opt_sd, "param_groups": [{**g, "capturable": True, "fused": None}
                                           for g in opt_sd["param_groups"]]}
    return {**sd, "enc_opt": forge(sd["enc_opt"]), "ctrl_opt": forge(sd["ctrl_opt"])}


def test_a_capturable_checkpoint_resumes_in_a_cpu_runner_and_trains(tiny_cfg):
    """torch's AdamW takes capturable/fused from the state dict; a CPU runner must keep its own
    (before the fix: AssertionError 'If capturable=True, params and state_steps must be on
    supported devices' at the first step)."""
    cfg = tiny_cfg.replace(epochs=4)
    src = TrialRunner(cfg, "cpu")
    src.run_epoch()
    src.run_epoch()
    sd = src.state_dict()
    plain, forged = TrialRunner(cfg, "cpu"), TrialRunner(cfg, "cpu")
    plain.load_state_dict(copy.deepcopy(sd))
    forged.load_state_dict(copy.deepcopy(_capturable_checkpoint(sd)))
    for g in forged.enc_opt.opt.param_groups + forged.ctrl_opt.opt.param_groups:
        assert not g["capturable"] and g["fused"]
    for _ in range(2):
        a, b = plain.run_epoch(), forged.run_epoch()
        for k in KEYS:
            assert a[k] == b[k], k


def test_greedy_ranks_match_a_python_loop():
    """The tensor-only greedy decoder against the plain loop: rank r goes to the best position
    not taken yet by ranks 0..r-1."""
    from poh_tune.model import PointerDecoder

    torch.manual_seed(0)
    dec = PointerDecoder(2, 16, 7)
    h = torch.randn(2, 5, 7, 16)
    got = dec.greedy_ranks(h)
    logits = dec.logits(h)  # (S, N, L, L): rank x position
    for s in range(2):
        for n in range(5):
            free, want = list(range(7)), [None] * 7
            for r in range(7):
                p = max(free, key=lambda q: logits[s, n, r, q].item())
                free.remove(p)
                want[p] = r
            assert got[s, n].tolist() == want


class _OpRecorder(TorchDispatchMode):
    """Every aten operation run under it, by name."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# A tensor made from a Python value (torch.tensor, an item set from a Python number) is lifted:
# on CUDA that is a host-to-device copy, and reading a value back (.item(), a Python branch on a
# tensor) a device-to-host one; neither may happen while a stream is capturing.
HOST_OPS = ("aten.lift_fresh", "aten.lift_fresh_copy", "aten._local_scalar_dense")


@pytest.mark.parametrize("kw", [dict(loss="ranknet"), dict(loss="listnet"),
                                dict(loss="soft_sort"), dict(loss="combined"),
                                dict(loss="pointer_ce"), dict(controller="mlp"),
                                dict(model="baseline")])
def test_a_warmed_up_step_and_evaluation_chunk_make_no_tensor_from_a_python_value(tiny_cfg, kw):
    runner = TrialRunner(tiny_cfg.replace(**kw), "cpu")
    runner.run_epoch()  # warmed up: lazily made optimizer state and buffers exist
    S = len(runner.members)
    idx = torch.arange(tiny_cfg.batch_size).expand(S, -1).contiguous()
    temp, ent = torch.full((S,), 1.5), torch.full((S,), 1e-3)
    runner._train_step(idx, temp, ent)
    with _OpRecorder() as step:
        runner._train_step(idx, temp, ent)
    dev = runner.data["dev"]
    x, obs = dev.inputs()
    args = (x[:, :8], obs[:, :8], dev.ranks[:, :8], dev.values[:, :8], dev.obs_mask[:, :8], temp)
    with torch.no_grad():
        runner.evaluator.chunk(*args)
        with _OpRecorder() as chunk:
            runner.evaluator.chunk(*args)
    assert len(step.ops) > 100 and len(chunk.ops) > 20  # the recorder saw the work
    for name, rec in (("training step", step), ("evaluation chunk", chunk)):
        bad = sorted({op for op in rec.ops if op.rsplit(".", 1)[0] in HOST_OPS})
        assert not bad, f"{name}: {bad}"
