"""Pointer-over-Heads sorter: encoder, iterated PoH block with an HRM or MLP router, shared readouts.

Every module holds an ensemble of S independent members (one per seed) in a leading parameter
dimension, so a trial's seeds train as one batched computation; S = 1 is the plain model. All
activations carry the member dimension first: (S, B, L, d).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from poh_tune.config import TrialConfig
from poh_tune.ensemble import EGRUCell, ELayerNorm, ELinear, RoutedAttention, ebaddmm
from poh_tune.matmul import matmul_precision


@dataclass
class ModelConfig:
    """The model's part of a TrialConfig, nothing about training: these fields of it, whose
    defaults and meaning are in config.py (one place for every default)."""

    array_len: int
    model: str  # "pot": the PoH transformer; "baseline": encoder + readouts, one pass
    d_model: int
    n_heads: int
    d_ff: int
    max_inner_iters: int
    hrm_period: int
    controller: str
    d_ctrl: int
    grad_mode: str
    precision: str

    @classmethod
    def from_trial(cls, cfg: TrialConfig) -> ModelConfig:
        """The model's fields of a trial's configuration."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @property
    def is_poh(self) -> bool:
        """The PoH transformer (model "pot"), not the one-pass baseline."""
        return self.model == "pot"

    @property
    def n_iters(self) -> int:
        """Readouts per forward pass: one per inner iteration, one for the baseline."""
        return self.max_inner_iters if self.is_poh else 1


class Block(nn.Module):
    """Post-LN transformer layer (as nn.TransformerEncoderLayer), with optional head routing."""

    def __init__(self, S: int, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.attn = RoutedAttention(S, d_model, n_heads)
        self.ln1 = ELayerNorm(S, d_model)
        self.ff1 = ELinear(S, d_model, d_ff)
        self.ff2 = ELinear(S, d_ff, d_model)
        self.ln2 = ELayerNorm(S, d_model)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | None = None,
                L: int | None = None) -> torch.Tensor:
        """x (S, B, L, D), alpha (S, B, L, H) or None -> (S, B, L, D); or x as token rows
        (S, B*L, D), alpha (S, B*L, H), with L given -> (S, B*L, D)."""
        if L is None:
            S, B, L, D = x.shape
            return self.forward(x.view(S, B * L, D), alpha, L).view(S, B, L, D)
        # rows: 3-D all through, no reshapes in the layers inside
        x = self.ln1(x + self.attn(x, alpha, L))
        return self.ln2(x + self.ff2(self.ff1(x, relu=True)))


@dataclass
class HRMCarry:
    """Recurrent controller state, per token (tokens flattened to B*L rows)."""

    z_L: torch.Tensor  # (S, B*L, d_ctrl) fast state, updated every iteration
    z_H: torch.Tensor  # (S, B*L, d_ctrl) slow state, updated on period iterations only
    # z_H's share of the fast cell's input gates and of the router logits (biases included),
    # (S, B*L or 1, 3*d_ctrl) and (S, B*L or 1, H): recomputed only when z_H changes.
    z_H_proj: tuple[torch.Tensor, torch.Tensor] | None = None
    # The z_L / u and z_H halves of the fast cell's input weight and of the router's weight,
    # sliced once per forward pass (one slice and one gradient accumulation each, not one per
    # iteration). Parameters, not state: never detached.
    weights: HRMWeights | None = None

    def detach(self) -> HRMCarry:
        # The cache is dropped, not detached: z_H_proj holds the router's and the fast cell's
        # z_H weights and biases, which must still learn from the next iteration's loss. The
        # next step recomputes it from the detached z_H.
        return HRMCarry(self.z_L.detach(), self.z_H.detach(), None, self.weights)


@dataclass
class HRMWeights:
    # The fast cell's input gates from the token state x: gi = x @ inp.W @ ih_u + ..., inp and
    # the token half of ih composed once per forward (no nonlinearity between them), so every
    # iteration runs one matmul instead of two.
    x_gates: torch.Tensor  # (S, d_model, 3*d_ctrl) = inp.weight @ ih.weight[:, :d_ctrl]
    gate_bias: torch.Tensor  # (S, 1, 3*d_ctrl) = inp.bias @ ih.weight[:, :d_ctrl] + ih.bias
    # z_H's halves of the fast cell's input weight and of the router, side by side: z_H is
    # projected through both in one matmul, [ih_z | router_z / T], with [ih.bias | router.bias / T].
    z_H_w: torch.Tensor  # (S, d_ctrl, 3*d_ctrl + H)
    z_H_b: torch.Tensor  # (S, 1, 3*d_ctrl + H)
    # The router's weights and bias divided by the routing temperature once per forward, so
    # its logits come out divided (no division per iteration).
    router_L: torch.Tensor  # (S, d_ctrl, H) router, z_L half, / T


class HRMController(nn.Module):
    """Two-timescale router (after HRM): z_L every iteration, z_H every `period`; α from both.

    Each member has its own period (configurations with different hrm_period train together as
    members of one ensemble), so the slow-state update is a per-member mask.
    """

    def __init__(self, S: int, d_model: int, d_ctrl: int, n_heads: int,
                 period: int | Sequence[int]):
        super().__init__()
        self.periods = [period] * S if isinstance(period, int) else [int(p) for p in period]
        if len(self.periods) != S:
            raise ValueError(f"{len(self.periods)} periods for {S} members")
        self._masks: dict[tuple[bool, ...], torch.Tensor] = {}
        self.inp = ELinear(S, d_model, d_ctrl)
        self.cell_L = EGRUCell(S, 2 * d_ctrl, d_ctrl)  # input: [token features, z_H]
        self.cell_H = EGRUCell(S, d_ctrl, d_ctrl)  # input: z_L
        self.router = ELinear(S, 2 * d_ctrl, n_heads)  # reads z_L conditioned on z_H
        self.z_L0 = nn.Parameter(torch.zeros(S, 1, d_ctrl))
        self.z_H0 = nn.Parameter(torch.zeros(S, 1, d_ctrl))

    # step() returns logits already divided by the temperature given to init_carry.
    scales_by_temperature = True

    def init_carry(self, n_tokens: int, temperature: float | torch.Tensor = 1.0) -> HRMCarry:
        """temperature: a float or (S,), one per member."""
        S, _, c = self.z_L0.shape
        w = self.weights(temperature)
        # Every token starts from the same z_H: project it once, broadcast over tokens.
        return HRMCarry(self.z_L0.expand(S, n_tokens, c), self.z_H0.expand(S, n_tokens, c),
                        self.project_z_H(self.z_H0, w), w)

    def weights(self, temperature: float | torch.Tensor = 1.0) -> HRMWeights:
        S, _, c = self.z_L0.shape
        ih, r, rb = self.cell_L.ih.weight, self.router.weight, self.router.bias
        if isinstance(temperature, torch.Tensor):
            inv = temperature.reciprocal().view(S, 1, 1)
            r, rb = r * inv, rb * inv
        elif temperature != 1.0:
            r, rb = r / temperature, rb / temperature
        ih_u = ih[:, :c]
        gate_bias = torch.baddbmm(self.cell_L.ih.bias, self.inp.bias, ih_u)
        return HRMWeights(torch.bmm(self.inp.weight, ih_u), gate_bias,
                          torch.cat([ih[:, c:], r[:, c:]], -1), torch.cat([gate_bias, rb], -1),
                          r[:, :c])

    def project_z_H(self, z_H: torch.Tensor, w: HRMWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """z_H's terms of the fast cell's input gates and of the router, biases included.

        The fast cell reads [u, z_H] and the router [z_L, z_H]; both are linear in the
        concatenation, so each splits into a z_H part that changes only with z_H.
        """
        return ebaddmm(w.z_H_b, z_H, w.z_H_w).split(
            [w.gate_bias.shape[-1], w.router_L.shape[-1]], -1)  # gates, logits

    def update_mask(self, t: int, device: torch.device) -> torch.Tensor | None:
        """(S, 1, 1) bool: the members whose z_H updates at iteration t; None when all do.

        Decided on the host from the periods (no device sync); the mask tensor of each pattern
        is made once and reused, so a captured CUDA graph never copies from the host.
        """
        upd = tuple(t % p == 0 for p in self.periods)
        if all(upd):
            return None
        key = (*upd, str(device))
        if key not in self._masks:
            self._masks[key] = torch.tensor(upd, device=device).view(-1, 1, 1)
        return self._masks[key]

    def step(self, carry: HRMCarry, x: torch.Tensor, t: int) -> tuple[torch.Tensor, HRMCarry]:
        """One iteration t (0-based). x: token rows (S, B*L, d_model), or (S, B, L, d_model).

        Returns router logits divided by the temperature, shaped as x's tokens ((S, B*L, H) or
        (S, B, L, H)), and the new carry. z_H updates for the members whose period divides t
        (t % period == 0), masked per member, never for the whole ensemble.
        """
        rows = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        w = carry.weights or self.weights()
        proj = carry.z_H_proj if carry.z_H_proj is not None else self.project_z_H(carry.z_H, w)
        gi = ebaddmm(proj[0], rows, w.x_gates)  # (S, B*L, 3*d_ctrl)
        z_L = self.cell_L.from_gates(gi, carry.z_L)  # input [u, z_H]
        z_H = carry.z_H
        if any(t % p == 0 for p in self.periods):
            new = self.cell_H(z_L, z_H)
            mask = self.update_mask(t, rows.device)
            if mask is not None:
                new = torch.where(mask, new, z_H)
            z_H, proj = new, self.project_z_H(new, w)
        logits = ebaddmm(proj[1], z_L, w.router_L)
        if x.dim() != 3:
            logits = logits.view(*x.shape[:-1], -1)
        return logits, HRMCarry(z_L, z_H, proj, w)


class MLPController(nn.Module):
    """The document's stateless router: α from the current token state alone."""

    def __init__(self, S: int, d_model: int, d_ctrl: int, n_heads: int):
        super().__init__()
        self.hidden = ELinear(S, d_model, d_ctrl)
        self.head = ELinear(S, d_ctrl, n_heads)

    scales_by_temperature = False

    def init_carry(self, n_tokens: int, temperature: float | torch.Tensor = 1.0) -> None:
        return None

    def step(self, carry, x: torch.Tensor, t: int):
        return self.head(F.gelu(self.hidden(x))), None


class PointerDecoder(nn.Module):
    """Rank queries over positions with a coverage mask (the document's pointer decoder).

    The query of rank r does not depend on earlier picks (the coverage mask carries them), so
    teacher forcing computes every rank at once; greedy decoding at eval loops over ranks.
    """

    def __init__(self, S: int, d_model: int, max_len: int):
        super().__init__()
        self.rank_emb = nn.Parameter(torch.randn(S, max_len, d_model))
        self.q = ELinear(S, d_model, d_model)
        self.k = ELinear(S, d_model, d_model)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: (S, N, L, d) -> (S, N, R=L, P=L) rank-by-position logits, no coverage applied."""
        S, N, L, D = h.shape
        q = self.q(self.rank_emb[:, None, :L] + h.mean(2, keepdim=True))  # (S, N, R, d)
        return q @ self.k(h).transpose(-1, -2) / math.sqrt(D)  # (S, N, R, P)

    def teacher_forced(self, h: torch.Tensor, target_ranks: torch.Tensor) -> torch.Tensor:
        """(S, N, R, P) logits with every position used by a lower target rank masked out."""
        L = h.shape[2]
        r = torch.arange(L, device=h.device).view(L, 1)
        covered = target_ranks.unsqueeze(-2) < r  # (S, N, R, P)
        return self.logits(h).masked_fill(covered, float("-inf"))

    @torch.no_grad()
    def greedy_ranks(self, h: torch.Tensor) -> torch.Tensor:
        """(S, N, L, d) -> (S, N, L) predicted rank of every position, best free position per rank.

        Tensor operations only (no item set from a Python value, which on CUDA is a host-to-device
        copy and cannot be captured in a CUDA graph)."""
        S, N, L, _ = h.shape
        logits = self.logits(h).reshape(S * N, L, L)
        chosen = torch.zeros(S * N, L, dtype=torch.bool, device=h.device)
        picks = []
        for r in range(L):
            p = logits[:, r].masked_fill(chosen, float("-inf")).argmax(-1, keepdim=True)  # (S*N, 1)
            chosen = chosen.scatter(1, p, True)
            picks.append(p)
        order = torch.cat(picks, 1)  # (S*N, L) the position chosen at each rank
        rank_of = torch.arange(L, device=h.device).expand(S * N, L)
        ranks = torch.empty_like(order).scatter_(1, order, rank_of)  # inverse permutation
        return ranks.view(S, N, L)


@dataclass
class ForwardOut:
    scores: torch.Tensor  # (T, S, B, L) per-iteration scores (ascending score = ascending value)
    hidden: torch.Tensor | None  # (T, S, B, L, d) per-iteration states, when requested
    alphas: torch.Tensor | None  # (T, S, B, L, H) routing weights; None for the baseline
    z_H: torch.Tensor | None  # (T, S, B*L, d_ctrl) slow state after each iteration, on request


class PoHSorter(nn.Module):
    """S ensemble members of the PoH sorter (or of the baseline)."""

    def __init__(self, cfg: ModelConfig, n_members: int = 1,
                 hrm_periods: Sequence[int] | None = None):
        super().__init__()
        self.cfg = cfg
        S, d = n_members, cfg.d_model
        self.n_members = S
        self.value_proj = ELinear(S, 1, d)
        self.obs_emb = nn.Parameter(torch.randn(S, 2, d))  # observed / hidden flag, no sentinel
        self.pos_emb = nn.Parameter(torch.randn(S, cfg.array_len, d))
        self.encoder = Block(S, d, cfg.n_heads, cfg.d_ff)
        self.controller: nn.Module | None = None
        if cfg.is_poh:
            self.block = Block(S, d, cfg.n_heads, cfg.d_ff)  # one block, iterated
            if cfg.controller == "hrm":
                self.controller = HRMController(S, d, cfg.d_ctrl, cfg.n_heads,
                                                hrm_periods or cfg.hrm_period)
            else:
                self.controller = MLPController(S, d, cfg.d_ctrl, cfg.n_heads)
        self.score_head = ELinear(S, d, 1)
        self.pointer = PointerDecoder(S, d, cfg.array_len)

    @classmethod
    def from_seeds(cls, cfg: ModelConfig, seeds: Sequence[int],
                   hrm_periods: Sequence[int] | None = None) -> PoHSorter:
        """One member per seed, each initialised exactly as a one-member model under that seed.

        `hrm_periods` gives each member its own HRM period (default: cfg.hrm_period for all);
        the period holds no parameter, so it does not change the initialisation.
        """
        ens = cls(cfg, len(seeds), hrm_periods)
        with torch.no_grad():
            for s, seed in enumerate(seeds):
                torch.manual_seed(seed)
                single = cls(cfg, 1)
                for p_ens, p_one in zip(ens.parameters(), single.parameters(), strict=True):
                    p_ens[s].copy_(p_one[0])
        return ens

    def controller_parameters(self) -> list[nn.Parameter]:
        return list(self.controller.parameters()) if self.controller is not None else []

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Everything but the controller: encoder, PoH block and readouts."""
        ctrl = {id(p) for p in self.controller_parameters()}
        return [p for p in self.parameters() if id(p) not in ctrl]

    def encode(self, x: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """x: (S, B, L) scaled values (0 where hidden); obs: (S, B, L) bool -> token rows
        (S, B*L, d)."""
        S, B, L = x.shape
        d = self.pos_emb.shape[-1]
        flag = torch.where(obs.unsqueeze(-1), self.obs_emb[:, None, None, 1],
                           self.obs_emb[:, None, None, 0])  # (S, B, L, d)
        base = flag + (self.pos_emb[:, :L] + self.value_proj.bias).unsqueeze(1)
        # value_proj reads one number per token: its "matmul" is an elementwise product.
        h = torch.addcmul(base, x.unsqueeze(-1), self.value_proj.weight.view(S, 1, 1, d))
        return self.encoder(h.view(S, B * L, d), None, L)

    def forward(self, x: torch.Tensor, obs: torch.Tensor,
                temperature: float | torch.Tensor = 1.0, keep_hidden: bool = False,
                keep_z_H: bool = False) -> ForwardOut:
        """x: (S, B, L) scaled values; obs: (S, B, L) bool; temperature: a float or (S,), one
        per member (configurations with different schedules train together)."""
        # precision=bf16: bf16 operands in every matmul (matmul.matmul_precision); parameters,
        # gradients and outputs FP32.
        with matmul_precision(self.cfg.precision, x.device):
            return self._forward(x, obs, temperature, keep_hidden, keep_z_H)

    def _forward(self, x: torch.Tensor, obs: torch.Tensor, temperature: float | torch.Tensor,
                 keep_hidden: bool, keep_z_H: bool) -> ForwardOut:
        S, B, L = x.shape
        z = self.encode(x, obs)  # (S, B*L, d) token rows through the loop
        d = z.shape[-1]
        if not self.cfg.is_poh:
            scores = self.score_head(z).view(1, S, B, L)
            return ForwardOut(scores, z.view(1, S, B, L, d) if keep_hidden else None, None, None)

        T = self.cfg.max_inner_iters
        carry = self.controller.init_carry(B * L, temperature)
        divide = not self.controller.scales_by_temperature
        if divide and isinstance(temperature, torch.Tensor):
            temperature = temperature.view(S, 1, 1)
        states, alphas, z_Hs = [], [], []
        for t in range(T):
            if t > 0 and self.cfg.grad_mode == "last":
                # Truncated gradient: each iteration's loss reaches only that iteration.
                z = z.detach()
                carry = carry.detach() if carry is not None else None
            logits, carry = self.controller.step(carry, z, t)  # (S, B*L, H)
            # torch.softmax would be two aten calls (softmax, _softmax) every iteration
            alpha = torch._softmax(logits / temperature if divide else logits, -1, False)
            z = self.block(z, alpha, L)
            states.append(z)
            alphas.append(alpha)
            if keep_z_H and carry is not None:
                z_Hs.append(carry.z_H)
        # The readout is shared by every iteration: one matmul over all of them.
        hs = torch.stack(states, 1)  # (S, T, B*L, d)
        scores = self.score_head(hs).view(S, T, B, L).transpose(0, 1)  # (T, S, B, L)
        return ForwardOut(
            scores,
            hs.view(S, T, B, L, d).transpose(0, 1) if keep_hidden else None,
            torch.stack(alphas).view(T, S, B, L, -1),
            torch.stack(z_Hs) if z_Hs else None,
        )

