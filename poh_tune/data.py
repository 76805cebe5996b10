"""Partial-observability sorting: L integers (distinct, or from few levels), some hidden; target = the stable sort of all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from poh_tune.config import TrialConfig

VALUE_LOW, VALUE_HIGH = -100, 100  # values are drawn from [VALUE_LOW, VALUE_HIGH)
VALUE_SCALE = 100.0  # observed values enter the model as value / VALUE_SCALE, about [-1, 1]
SPLIT_OFFSETS = {"train": 0, "dev": 1000, "test": 2000}  # independent streams per split


@dataclass
class SortData:
    values: torch.Tensor  # (N, L) long, distinct per row unless drawn from value levels
    obs_mask: torch.Tensor  # (N, L) bool, True where observed
    perm: torch.Tensor  # (N, L) long, perm[r] = position holding the r-th smallest value
    ranks: torch.Tensor  # (N, L) long, ranks[p] = rank of position p (inverse of perm)

    def __len__(self) -> int:
        return self.values.shape[0]

    def to(self, device) -> SortData:
        return SortData(*(t.to(device) for t in (self.values, self.obs_mask, self.perm, self.ranks)))

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs: scaled values (0 where hidden) and the observed flag."""
        x = torch.where(self.obs_mask, self.values.float() / VALUE_SCALE, 0.0)
        return x, self.obs_mask


def n_visible(array_len: int, mask_rate: float) -> int:
    return max(2, int(array_len * (1 - mask_rate)))


def levels(value_levels: int) -> torch.Tensor:
    """(K,) long: K integer levels spread evenly over [VALUE_LOW, VALUE_HIGH)."""
    span = VALUE_HIGH - VALUE_LOW
    return VALUE_LOW + torch.arange(value_levels) * span // value_levels


def make_split(n: int, array_len: int, mask_rate: float, seed: int, value_levels: int = 0
               ) -> SortData:
    """n samples drawn from a generator seeded by `seed` alone (deterministic, device independent).

    value_levels: 0 draws distinct values; K >= 2 draws each value with replacement from
    `levels(K)` (duplicates; the target stays the stable argsort: equal values keep their
    positions' order)."""
    g = torch.Generator().manual_seed(seed)
    span = VALUE_HIGH - VALUE_LOW
    if value_levels:
        if value_levels < 2 or value_levels > span:
            raise ValueError(f"value_levels={value_levels}: expected 0 or 2-{span}")
        values = levels(value_levels)[torch.randint(value_levels, (n, array_len), generator=g)]
    else:
        if array_len > span:
            raise ValueError(f"array_len={array_len}: at most {span} distinct values exist")
        # Without replacement: the first L entries of a random permutation of the value range.
        values = torch.rand(n, span, generator=g).argsort(dim=1)[:, :array_len] + VALUE_LOW
    k = n_visible(array_len, mask_rate)
    visible_pos = torch.rand(n, array_len, generator=g).argsort(dim=1)[:, :k]
    obs_mask = torch.zeros(n, array_len, dtype=torch.bool).scatter_(1, visible_pos, True)
    perm = values.argsort(dim=1, stable=True)
    ranks = perm.argsort(dim=1)
    return SortData(values, obs_mask, perm, ranks)


def make_splits(array_len: int, mask_rate: float, seed: int, train: int, dev: int, test: int,
                value_levels: int = 0) -> dict[str, SortData]:
    sizes = {"train": train, "dev": dev, "test": test}
    return {name: make_split(sizes[name], array_len, mask_rate, seed + SPLIT_OFFSETS[name],
                             value_levels)
            for name in sizes}


def stack_seeds(cfg: TrialConfig, seeds: Sequence[int], device: torch.device
                ) -> dict[str, SortData]:
    """Every member's splits (its seed's), stacked on a leading member dimension: (S, N, L).

    Only the seed varies between members: the task's keys are shared by a pack (pack_key)."""
    per_seed = [make_splits(cfg.array_len, cfg.mask_rate, s, cfg.train_samples, cfg.dev_samples,
                            cfg.test_samples, cfg.value_levels) for s in seeds]
    return {split: SortData(*(torch.stack([getattr(d[split], f) for d in per_seed]).to(device)
                              for f in ("values", "obs_mask", "perm", "ranks")))
            for split in ("train", "dev", "test")}
