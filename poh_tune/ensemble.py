"""Member-batched layers: S independent copies of each layer, evaluated as one computation.

Every parameter has a leading member dimension S and every activation is (S, N, ·) or
(S, B, L, ·). The forward and backward passes are hand-written autograd Functions: the eager
path pays a few microseconds for every aten call (the CPU always, the GPU on its first, uncaptured
step), and autograd's generic formulas spend several calls per op on views, broadcasts and
conjugation checks. Here each layer is a handful of fused calls, and parameters may be strided
views into a larger flat buffer: gradients are returned in the parameters' shapes. How their
matmuls run (members split over CPU threads, bf16 operands) is poh_tune.matmul's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from poh_tune.matmul import cast_weight, member_bmm, operand_dtype, split_point

LN_EPS = 1e-5  # nn.LayerNorm's default


def _strided(t: torch.Tensor, size: tuple[int, ...], stride: tuple[int, ...],
             offset: int = 0) -> torch.Tensor:
    """A view of t's storage from t's own offset + `offset`: one aten call, where select, slice
    and transpose cost two (each dispatches to as_strided)."""
    return t.as_strided(size, stride, t.storage_offset() + offset)


def _mT(t: torch.Tensor) -> torch.Tensor:
    """(S, a, b) -> (S, b, a) transposed view."""
    S, a, b = t.shape
    s0, s1, s2 = t.stride()
    return _strided(t, (S, b, a), (s0, s2, s1))


def _cols(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """t[..., a:b] of a 3-D tensor."""
    return _strided(t, (*t.shape[:2], b - a), t.stride(), a * t.stride(2))


def _empty(t: torch.Tensor, *size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(size, dtype=dtype or t.dtype, device=t.device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(S, ..., d) -> (S, N, d); a view where one exists."""
    if t.dim() == 3:
        return t
    return t.view(t.shape[0], -1, t.shape[-1]) if t.is_contiguous() else t.flatten(1, -2)


class _EnsembleLinear(torch.autograd.Function):
    """y[s] = b[s] + x[s] @ W[s] for every member s, then ReLU if `relu`: x (S, ..., K),
    W (S, K, M), b (S, 1, M) or (S, N, M) with N the rows of x. The forward and both backward
    matmuls are split as `matmul.split_point` says (n members through bmm, the rest one matmul
    each), into preallocated outputs (no cat). Leading dims are flattened here, not by autograd
    views."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, n: int,
                relu: bool) -> torch.Tensor:
        x3 = _rows(x)
        dt = ctx.dt = operand_dtype()
        if dt is None:
            # bmm then add_ is 4 aten calls; baddbmm with a broadcast bias is 6 (expand, copy).
            y = member_bmm(x3, w, n).add_(b)
        else:
            x3, w = x3.to(dt), cast_weight(w, dt)
            y = torch.add(member_bmm(x3, w, n), b)  # bf16 + FP32 bias -> FP32 by type promotion
        if relu:
            y.clamp_min_(0)  # relu_ is two calls (relu_, clamp_min_)
        ctx.save_for_backward(x3, w, y if relu else None)
        ctx.n, ctx.broadcast_b, ctx.x_shape = n, b.shape[1] == 1 and y.shape[1] != 1, x.shape
        return y if x.dim() == 3 else y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, w, y = ctx.saved_tensors
        n = ctx.n
        gy = _rows(gy)
        if y is not None:
            gy = torch.ops.aten.threshold_backward(gy, y, 0)
        gx = gw = gb = None
        dt = ctx.dt
        gy_mm = gy if dt is None else gy.to(dt)
        if ctx.needs_input_grad[0]:
            gx = member_bmm(gy_mm, _mT(w), n)
            if dt is not None:
                gx = gx.float()
            if len(ctx.x_shape) != 3:
                gx = gx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = member_bmm(_mT(x), gy_mm, n)
            if dt is not None:
                gw = gw.float()
        if ctx.needs_input_grad[2]:
            gb = gy.sum(1, keepdim=True) if ctx.broadcast_b else gy
        return gx, gw, gb, None, None


def ebaddmm(base: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """base + x @ w for every member: x (S, N, K), w (S, K, M), base (S, 1, M) or (S, N, M)."""
    S, N, K = x.shape
    return _EnsembleLinear.apply(x, w, base, split_point(S, x.device, N, K, w.shape[-1]), False)


class ELinear(nn.Module):
    """S independent linear layers applied in one batched matmul; init as nn.Linear."""

    def __init__(self, S: int, d_in: int, d_out: int, init_bound: float | None = None):
        super().__init__()
        bound = init_bound if init_bound is not None else 1 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(S, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(S, 1, d_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """(S, ..., d_in) -> (S, ..., d_out); `relu` fuses a ReLU after the bias."""
        S, d_in, d_out = self.weight.shape
        n = split_point(S, x.device, x.numel() // (S * d_in), d_in, d_out)
        return _EnsembleLinear.apply(x, self.weight, self.bias, n, relu)


class _EnsembleLayerNorm(torch.autograd.Function):
    """LayerNorm over the last dim with a per-member affine: x (S, ..., d), w and b (S, d)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (d,)
        xhat, mean, rstd = torch.native_layer_norm(x, (d,), None, None, LN_EPS)
        w_, b_ = w.view(shape), b.view(shape)
        ctx.save_for_backward(x, xhat, mean, rstd, w_)
        return torch.addcmul(b_, xhat, w_)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, xhat, mean, rstd, w_ = ctx.saved_tensors
        mid = tuple(range(1, x.dim() - 1))  # the dims every member's affine is shared over
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.native_layer_norm_backward(gy * w_, x, x.shape[-1:], mean, rstd,
                                                          None, None, (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            gw = (gy * xhat).sum(mid)
        if ctx.needs_input_grad[2]:
            gb = gy.sum(mid)
        return gx, gw, gb


class ELayerNorm(nn.Module):
    def __init__(self, S: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(S, d))
        self.bias = nn.Parameter(torch.zeros(S, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _EnsembleLayerNorm.apply(x, self.weight, self.bias)


class _GRUGates(torch.autograd.Function):
    """torch.nn.GRUCell's gate arithmetic given both gate projections gi, gh (S, N, 3c) and the
    state h (S, N, c): r, z = σ(gi + gh) on the first 2c columns, n = tanh(gi_n + r * gh_n),
    h' = (1 - z) * n + z * h."""

    @staticmethod
    def forward(ctx, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        c = h.shape[-1]
        rz = torch.add(_cols(gi, 0, 2 * c), _cols(gh, 0, 2 * c)).sigmoid_()  # (S, N, 2c)
        gh_n = _cols(gh, 2 * c, 3 * c)
        n = torch.addcmul(_cols(gi, 2 * c, 3 * c), _cols(rz, 0, c), gh_n).tanh_()
        ctx.save_for_backward(rz, n, gh_n, h)
        return torch.lerp(n, h, _cols(rz, c, 2 * c))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        rz, n, gh_n, h = ctx.saved_tensors
        S, N, c = n.shape
        r, z = _cols(rz, 0, c), _cols(rz, c, 2 * c)
        gi = _empty(n, S, N, 3 * c)  # the pre-activation gradients, as the gates are laid out
        gh = _empty(n, S, N, 3 * c)
        g_h = torch.mul(g, z)
        g_pre_n = _cols(gi, 2 * c, 3 * c)
        torch.ops.aten.tanh_backward.grad_input(torch.sub(g, g_h), n, grad_input=g_pre_n)
        g_rz = _empty(n, S, N, 2 * c)  # dL/dr, dL/dz
        torch.mul(g_pre_n, gh_n, out=_cols(g_rz, 0, c))
        torch.sub(h, n, out=_cols(g_rz, c, 2 * c)).mul_(g)
        g_pre_rz = _cols(gi, 0, 2 * c)
        torch.ops.aten.sigmoid_backward.grad_input(g_rz, rz, grad_input=g_pre_rz)
        _cols(gh, 0, 2 * c).copy_(g_pre_rz)
        torch.mul(g_pre_n, r, out=_cols(gh, 2 * c, 3 * c))
        return gi, gh, g_h


class EGRUCell(nn.Module):
    """S independent GRU cells (torch.nn.GRUCell's equations and init) on (S, N, ·) inputs."""

    def __init__(self, S: int, d_in: int, d_hidden: int):
        super().__init__()
        bound = 1 / math.sqrt(d_hidden)
        self.ih = ELinear(S, d_in, 3 * d_hidden, bound)
        self.hh = ELinear(S, d_hidden, 3 * d_hidden, bound)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.from_gates(self.ih(x), h)

    def from_gates(self, gi: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The cell given its input gates gi = ih(x), (S, N, 3 * d_hidden)."""
        return _GRUGates.apply(gi, self.hh(h), h)


class _RoutedAttentionCore(torch.autograd.Function):
    """Softmax self-attention of every head, head h's output scaled by its routing weight α_h,
    heads merged: qkv (S, B, L, 3D) or its rows (S, B*L, 3D), laid out [q | k | v], each
    head-major; alpha (S, B, L, H) or (S, B*L, H) or None -> (S, ..., D). Explicit bmm, softmax,
    bmm: at L = 20 and head size 32 the fused attention kernels win nothing, and their backward
    is many more aten calls."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, alpha: torch.Tensor | None, L: int, H: int
                ) -> torch.Tensor:
        D = qkv.shape[-1] // 3
        SB, hs = qkv.numel() // (3 * D * L), D // H
        G = SB * H  # every (member, sample, head)
        if not qkv.is_contiguous():
            qkv = qkv.contiguous()
        dt = ctx.dt = operand_dtype()
        # q, k, v with (member, sample, head) as the batch dim; in bf16 the copy is the cast
        t = _empty(qkv, 3, G, L, hs, dtype=dt)
        t.view(3, SB, H, L, hs).copy_(_by_head(qkv, SB, L, H))
        q, k, v = _heads(t)
        # baddbmm with beta=0 ignores its input and scales in the matmul (a scalar mul_ is
        # five aten calls: the scalar becomes a tensor first).
        s = torch.baddbmm(_empty(t, G, L, L), q, _mT(k), beta=0, alpha=1 / math.sqrt(hs))
        if dt is None:
            p = torch._softmax(s, -1, False)  # (G, L, L)
            o = torch.bmm(p, v)  # (G, L, hs)
        else:
            # the softmax in FP32 (CPU has no bf16 -> FP32 softmax kernel: cast first)
            p = torch._softmax(s.float(), -1, False)
            o = torch.bmm(p.to(dt), v)  # (G, L, hs) bf16; y below is FP32
        y = _empty(qkv, *qkv.shape[:-1], D)
        if alpha is None:
            y.view(SB, L, H, hs).copy_(_merged(o, SB, H))
        else:
            torch.mul(_merged(o, SB, H), alpha.view(SB, L, H, 1), out=y.view(SB, L, H, hs))
        ctx.save_for_backward(t, p, o, alpha)
        ctx.H, ctx.qkv_shape = H, qkv.shape
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        t, p, o, alpha = ctx.saved_tensors
        H = ctx.H
        _, G, L, hs = t.shape
        SB = G // H
        if not gy.is_contiguous():
            gy = gy.contiguous()
        gy_h = gy.view(SB, L, H, hs)
        g_alpha = None
        dt = ctx.dt
        go = _empty(gy, G, L, hs, dtype=dt)  # in bf16 the copy / product below is the cast
        if alpha is None:
            _merged(go, SB, H).copy_(gy_h)
        else:
            if ctx.needs_input_grad[1]:
                g_alpha = (gy_h * _merged(o, SB, H)).sum(-1).view(alpha.shape)
            torch.mul(gy_h, alpha.view(SB, L, H, 1), out=_merged(go, SB, H))
        q, k, v = _heads(t)
        gt = _empty(gy, 3, G, L, hs, dtype=dt)
        gq, gk, gv = _heads(gt)
        if dt is None:
            torch.bmm(_mT(p), go, out=gv)
            gs = torch._softmax_backward_data(torch.bmm(go, _mT(v)), p, -1, p.dtype)
        else:
            torch.bmm(_mT(p.to(dt)), go, out=gv)
            gs = torch._softmax_backward_data(torch.bmm(go, _mT(v)).float(), p, -1, p.dtype
                                              ).to(dt)
        scale = 1 / math.sqrt(hs)
        torch.baddbmm(gq, gs, k, beta=0, alpha=scale, out=gq)
        torch.baddbmm(gk, _mT(gs), q, beta=0, alpha=scale, out=gk)
        g_qkv = _empty(gy, *ctx.qkv_shape)
        _by_head(g_qkv, SB, L, H).copy_(gt.view(3, SB, H, L, hs))
        return g_qkv, g_alpha, None, None


def _by_head(qkv: torch.Tensor, SB: int, L: int, H: int) -> torch.Tensor:
    """Contiguous (..., 3D) projections seen as (3, SB, H, L, hs): q/k/v, (member, sample), head,
    position. One as_strided where view + permute would be three aten calls."""
    hs = qkv.shape[-1] // (3 * H)
    D = H * hs
    return _strided(qkv, (3, SB, H, L, hs), (D, L * 3 * D, hs, 3 * D, 1))


def _heads(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(3, G, L, hs) -> its three (G, L, hs) parts: q, k, v."""
    _, G, L, hs = t.shape
    return tuple(_strided(t, (G, L, hs), (L * hs, hs, 1), i * G * L * hs) for i in range(3))


def _merged(o: torch.Tensor, SB: int, H: int) -> torch.Tensor:
    """Heads' outputs (G = SB*H, L, hs) seen as (SB, L, H, hs): merged heads, a view."""
    _, L, hs = o.shape
    return _strided(o, (SB, L, H, hs), (H * L * hs, hs, L * hs, 1))


def routed_attention_core(qkv: torch.Tensor, alpha: torch.Tensor | None, L: int, n_heads: int
                          ) -> torch.Tensor:
    """qkv (S, B, L, 3D) or (S, B*L, 3D), alpha of the same leading shape with H last, or None
    -> heads' outputs, α-scaled, merged: (S, ..., D)."""
    return _RoutedAttentionCore.apply(qkv, alpha, L, n_heads)


class RoutedAttention(nn.Module):
    """Multi-head self-attention, all heads in one batched call; head outputs optionally scaled by α."""

    def __init__(self, S: int, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = ELinear(S, d_model, 3 * d_model)
        self.out = ELinear(S, d_model, d_model)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | None = None,
                L: int | None = None) -> torch.Tensor:
        """x (S, B, L, D), alpha (S, B, L, H) or None -> (S, B, L, D); or x as rows
        (S, B*L, D) with L given."""
        L = x.shape[2] if L is None else L
        return self.out(routed_attention_core(self.qkv(x), alpha, L, self.n_heads))
