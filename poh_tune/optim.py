"""AdamW over ensemble parameters, member by member: flat buffers, per-member hyperparameters.

Every parameter of an ensemble holds its members in dim 0. The parameters of one optimizer group
are laid out in one flat (S, P) buffer (each module parameter becomes a view into it, and so does
its gradient), so clipping is a handful of operations instead of five per parameter, and a
CUDA graph can capture the whole update over a few static buffers. The optimizer itself is
torch's AdamW over one row per member, so each member keeps its own step count and can be
frozen on its own, and members with different learning rates or weight decay sit in different
param groups.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

# A parameter that is a view into a member-major (S, P) buffer is strided, not dense, and
# autograd warns that its gradient (the same view into the gradient buffer) breaks the layout
# it prefers; accumulating into it in place is exactly what is wanted here.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout")


def _row(flat: torch.Tensor, s: int) -> torch.Tensor:
    """A leaf tensor that aliases row s of `flat` (the optimizer needs leaves, not views)."""
    P = flat.shape[1]
    row = torch.empty(0, device=flat.device, dtype=flat.dtype)
    row.set_(flat.untyped_storage(), flat.storage_offset() + s * P, (P,), (1,))
    return row.requires_grad_(True)


class MemberAdamW:
    """AdamW for S ensemble members over one group of parameters (leading dim S each).

    Args:
        params: the group's parameters; each becomes a view into one flat (S, P) buffer, its
            gradient a view into the flat gradient buffer (autograd accumulates into it).
        lrs, weight_decays, max_norms: one value per member.
        betas, eps: AdamW's, shared.
        capturable: torch AdamW's capturable mode (state on the device, for CUDA graphs).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], lrs: Sequence[float],
                 weight_decays: Sequence[float], max_norms: Sequence[float],
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8,
                 capturable: bool = False):
        self.params = list(params)
        S = self.params[0].shape[0]
        if not (len(lrs) == len(weight_decays) == len(max_norms) == S):
            raise ValueError(f"{S} members, but {len(lrs)} lrs, {len(weight_decays)} weight "
                             f"decays and {len(max_norms)} clip norms")
        dev, dtype = self.params[0].device, self.params[0].dtype
        sizes = [p[0].numel() for p in self.params]
        self.flat = torch.empty(S, sum(sizes), device=dev, dtype=dtype)  # (S, P)
        self.grad = torch.zeros_like(self.flat)
        off = 0
        with torch.no_grad():
            for p, n in zip(self.params, sizes, strict=True):
                self.flat[:, off:off + n].copy_(p.reshape(S, n))
                p.data = self.flat[:, off:off + n].view(p.shape)
                p.grad = self.grad[:, off:off + n].view(p.shape)
                off += n
        self.rows = [_row(self.flat, s) for s in range(S)]
        for s, r in enumerate(self.rows):
            r.grad = self.grad[s]
        self.max_norm = torch.tensor(list(max_norms), device=dev, dtype=dtype).view(S, 1)
        groups: dict[tuple[float, float], list[torch.Tensor]] = {}
        for s in range(S):
            groups.setdefault((float(lrs[s]), float(weight_decays[s])), []).append(self.rows[s])
        kw: dict[str, Any] = dict(betas=betas, eps=eps)
        if capturable:
            kw["capturable"] = True
        elif dev.type in ("cpu", "cuda"):
            kw["fused"] = True  # one kernel over every row of a group
        self.opt = torch.optim.AdamW([{"params": rows, "lr": lr, "weight_decay": wd}
                                      for (lr, wd), rows in groups.items()], **kw)

    def zero_grad(self) -> None:
        self.grad.zero_()

    @torch.no_grad()
    def clip(self) -> None:
        """clip_grad_norm_ of every member on its own, each with its own max norm."""
        norm = self.grad.pow(2).sum(1, keepdim=True).sqrt()  # (S, 1)
        self.grad.mul_((self.max_norm / (norm + 1e-6)).clamp(max=1.0))  # clip_grad_norm_'s formula

    def step(self, active: Sequence[bool] | None = None) -> None:
        """One AdamW step of the active members (all by default); the others do not move at all:
        parameters, moments and step count stay as they were."""
        frozen = [s for s, a in enumerate(active or []) if not a]
        for s in frozen:
            self.rows[s].grad = None  # AdamW skips a parameter without a gradient
        try:
            self.opt.step()
        finally:
            for s in frozen:
                self.rows[s].grad = self.grad[s]

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """The moments and step counts of `sd`, under this optimizer's own capturable and fused
        modes: torch's AdamW takes both from the state dict, so a checkpoint of a graphed CUDA
        run (capturable) would fail its first step on a CPU, and one of a CPU run (fused) would
        break the capture of a graphed one. A trial retried elsewhere meets either."""
        mine = {k: self.opt.param_groups[0].get(k) for k in ("capturable", "fused")}
        groups = [{**g, **mine} for g in sd["param_groups"]]
        self.opt.load_state_dict({**sd, "param_groups": groups})
