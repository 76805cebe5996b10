"""Dev and test metrics of every member of an ensemble, and a configuration's record over its seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from poh_tune.data import SortData
from poh_tune.graphs import GraphedFunction
from poh_tune.metrics import (
    kendall_tau,
    mean_ci95,
    ranks_from_scores,
    routing_healthy,
    routing_stats,
    sort_accuracy,
)
from poh_tune.model import PoHSorter
from poh_tune.record import ALPHA, PER_ITERATION, PER_SEED, SEED_KEYS

# Tokens per evaluation chunk, over all members: a chunk's activations stay in cache, so five
# members evaluate in chunks of a fifth as many samples (measured: about 6 % faster at 5 members).
EVAL_TOKENS = 16384


class Evaluator:
    """Evaluates an ensemble model on its members' dev or test splits, chunk by chunk; on a GPU
    every chunk is a replayed CUDA graph (graphs.py).

    Args:
        model: the ensemble.
        data: split name -> every member's samples, (S, N, L) each.
        pointer: read the predictions off the pointer decoder (loss pointer_ce), not the scores.
        device: where the model runs.
        graphs: capture the chunks as CUDA graphs (CUDA only).
    """

    def __init__(self, model: PoHSorter, data: dict[str, SortData], pointer: bool,
                 device: torch.device, graphs: bool):
        self.model, self.data, self.pointer, self.device = model, data, pointer, device
        self.diagnostics = True  # of the evaluation running: a graph's key, not its argument
        self.graphed = GraphedFunction(self.chunk, device, graphs, "evaluation")

    @torch.no_grad()
    def __call__(self, split: str, temperature: float | Sequence[float],
                 diagnostics: bool = True) -> list[dict[str, Any]]:
        """Per member: τ (mask-aware and all pairs), accuracy and, with diagnostics,
        per-iteration τ, routing entropy, Herfindahl index, mean max α and mean α per
        (iteration, head). temperature: one for all members, or one per member."""
        S, N, L = self.data[split].values.shape
        temps = [float(temperature)] * S if isinstance(temperature, (int, float)) else temperature
        temp_S = torch.tensor(list(temps), device=self.device, dtype=torch.float32)  # (S,)
        self.model.eval()
        data = self.data[split]
        x, obs = data.inputs()
        self.diagnostics = diagnostics
        sums: dict[str, torch.Tensor] = {}
        chunk = max(1, EVAL_TOKENS // (S * L))
        for i in range(0, N, chunk):
            sl = slice(i, i + chunk)
            key = (x[:, sl].shape[1], diagnostics)
            part = self.graphed(key, x[:, sl], obs[:, sl], data.ranks[:, sl],
                                data.values[:, sl], data.obs_mask[:, sl], temp_S)
            for k, v in part.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
        res: list[dict[str, Any]] = [{} for _ in range(S)]
        for key, total in sums.items():
            v = (total / N).cpu()
            for s in range(S):
                if key in PER_ITERATION:
                    res[s][key] = v[:, s].tolist()  # (T,)
                elif key == "alpha_mean":  # for the report's (iteration x head) heatmap
                    res[s][ALPHA] = v[:, :, s].tolist()  # (T, H)
                else:
                    res[s][key] = v[s].item()
        for r in res:
            if "herfindahl" in r:
                r["routing_healthy"] = routing_healthy([r["herfindahl"]], [r["max_alpha"]])
        return res

    @torch.no_grad()
    def chunk(self, x: torch.Tensor, obs: torch.Tensor, ranks: torch.Tensor,
              values: torch.Tensor, mask: torch.Tensor, temp_S: torch.Tensor
              ) -> dict[str, torch.Tensor]:
        """The metrics of one chunk of samples, summed over its samples: each (S,), or (T, S)
        and (T, H, S) per iteration. x, obs, ranks, values, mask: (S, n, L); temp_S: (S,).

        τ reads the values, so a pair of equal values is a pair tied in the target and is not
        counted (SPEC "Metrics"); accuracy and perfect sorts read the stable-sort ranks."""
        S, n, L = x.shape
        pointer = self.pointer
        sums: dict[str, torch.Tensor] = {}

        def add(key: str, per_sample: torch.Tensor) -> None:  # (..., S, n) -> summed over n
            sums[key] = per_sample.sum(-1)

        out = self.model(x, obs, temp_S, keep_hidden=pointer)
        T = out.scores.shape[0]
        if pointer:  # greedy decoding of every iteration in one batched loop over ranks
            h = out.hidden.transpose(0, 1).reshape(S, T * n, L, -1)  # members first
            pred = self.model.pointer.greedy_ranks(h).view(S, T, n, L).transpose(0, 1)
            order = pred  # the decoder's output is a permutation: it has no ties
        else:
            pred = ranks_from_scores(out.scores)  # (T, S, n, L)
            # τ reads the scores themselves, so tied scores are ties (SPEC), not ordered by
            # position as the stable argsort of `pred` would order them.
            order = out.scores
        last = order[-1]
        acc, perfect = sort_accuracy(pred[-1], ranks)
        add("tau", kendall_tau(last.reshape(-1, L), values.reshape(-1, L),
                               mask.reshape(-1, L)).view(S, n))
        add("tau_all", kendall_tau(last.reshape(-1, L), values.reshape(-1, L)).view(S, n))
        add("accuracy", acc)
        add("perfect_sort", perfect)
        if self.diagnostics:
            values_T = values.expand(T, S, n, L).reshape(-1, L)
            mask_T = mask.expand(T, S, n, L).reshape(-1, L)
            add("tau_iter", kendall_tau(order.reshape(-1, L), values_T, mask_T).view(T, S, n))
            if out.alphas is not None:
                st = routing_stats(out.alphas)  # each (T, S, n, L)
                add("entropy_iter", st["entropy"].mean(-1))  # (T, S)
                add("herfindahl", st["herfindahl"].mean((0, 3)))  # (S,)
                add("max_alpha", st["max_alpha"].mean((0, 3)))
                add("alpha_mean", out.alphas.mean(3).permute(0, 3, 1, 2))  # (T, H, S)
        return sums


def _mean(vals: list[Any]) -> Any:
    """The mean of numbers, or the elementwise mean of equally shaped (nested) lists."""
    if isinstance(vals[0], list):
        return [_mean(list(col)) for col in zip(*vals, strict=True)]
    return sum(vals) / len(vals)


def aggregate(per_seed: list[dict[str, Any]], seeds: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """A configuration's record from its seeds' records: means over seeds of every metric
    (per-iteration lists elementwise), each seed's own τ values (record.PER_SEED) and 95 % CI
    half-widths of τ (nan below fmt.MIN_CI_SEEDS seeds, metrics.mean_ci95)."""
    out: dict[str, Any] = {}
    for k, v0 in per_seed[0].items():
        vals = [m[k] for m in per_seed]
        if k == "routing_healthy":  # metrics.routing_healthy over the seeds: every seed in band
            out[k] = routing_healthy([m["herfindahl"] for m in per_seed],
                                     [m["max_alpha"] for m in per_seed])
        elif isinstance(v0, bool):
            out[k] = all(vals)
        elif isinstance(v0, (int, float, list)):
            out[k] = _mean(vals)
    out["epoch"] = per_seed[0]["epoch"]
    out["epoch_s"] = max(m["epoch_s"] for m in per_seed)  # seeds train together
    # NaN where a seed has no test metrics yet: its dev τ never improved (it is NaN).
    out[PER_SEED] = [{"seed": s, **{k: m.get(k, float("nan")) for k in SEED_KEYS}}
                     for s, m in zip(seeds, per_seed, strict=True)]
    for k in ("tau", "test_tau", "tau_all", "test_tau_all"):
        if k in per_seed[0]:
            out[f"{k}_ci95"] = mean_ci95([m[k] for m in per_seed])[1]
    return out
