"""An epoch's record: scalars, per-iteration lists and per-seed values, nested; flat for Tune."""

from __future__ import annotations

from typing import Any

# Per inner iteration, (T,) lists: τ of the iteration's scores and the routing entropy.
PER_ITERATION = ("tau_iter", "entropy_iter")
ALPHA = "alpha"  # (T, H) mean routing weight per inner iteration and head
PER_SEED = "per_seed"  # [{"seed": s, "tau": ..., ...}]: one record per seed, in seed order
# The per-seed values a configuration's record keeps: the report's confidence intervals and
# paired tests read them (test_* at that seed's best dev epoch).
SEED_KEYS = ("tau", "test_tau", "tau_all", "test_tau_all", "test_perfect_sort")


def flat(record: dict[str, Any]) -> dict[str, Any]:
    """The record as flat scalar keys, for Tune (its schedulers, loggers and result.json).

    tau_iter [a, b] -> tau_iter_0, tau_iter_1; alpha [[a, b]] -> alpha_iter_0_head_0,
    alpha_iter_0_head_1; per_seed [{"seed": 3, "tau": a}] -> tau_seed_3. Nothing reads these
    names back: the record itself is what metrics.jsonl holds.
    """
    out: dict[str, Any] = {}
    for k, v in record.items():
        if k in PER_ITERATION:
            out.update({f"{k}_{t}": x for t, x in enumerate(v)})
        elif k == ALPHA:
            out.update({f"alpha_iter_{t}_head_{h}": x
                        for t, row in enumerate(v) for h, x in enumerate(row)})
        elif k == PER_SEED:
            for m in v:
                out.update({f"{name}_seed_{m['seed']}": x for name, x in m.items()
                            if name != "seed"})
        else:
            out[k] = v
    return out


def seed_value(record: dict[str, Any], stat: str, seed: int) -> Any:
    """One seed's value of `stat` in a configuration's record; None where it has none."""
    for m in record.get(PER_SEED) or ():
        if m.get("seed") == seed:
            return m.get(stat)
    return None
