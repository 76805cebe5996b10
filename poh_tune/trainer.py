"""Deeply supervised PoH training of one configuration on all of its seeds at once; runs without Ray."""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from typing import Any

import torch

from poh_tune import losses
from poh_tune.config import TrialConfig
from poh_tune.data import SortData, make_splits
from poh_tune.metrics import (
    kendall_tau,
    mean_ci95,
    ranks_from_scores,
    routing_healthy,
    routing_stats,
    sort_accuracy,
)
from poh_tune.model import ModelConfig, PoHSorter

# Tokens per evaluation chunk, over all members: a chunk's activations stay in cache, so five
# members evaluate in chunks of a fifth as many samples (measured: about 6 % faster at 5 members).
EVAL_TOKENS = 16384


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the seed and the epoch."""


def temperature_at(cfg: TrialConfig, epoch: int) -> float:
    """T_e = max(T_min, T0 * decay**e), e counted from 0."""
    return max(cfg.temperature_min, cfg.temperature_init * cfg.temperature_decay**epoch)


def entropy_weight_at(cfg: TrialConfig, epoch: int) -> float:
    """w_e = w0 * rate**(e // every), e counted from 0."""
    return cfg.entropy_reg * cfg.entropy_decay_rate ** (epoch // cfg.entropy_decay_every)


def model_config(cfg: TrialConfig) -> ModelConfig:
    return ModelConfig(**cfg.model_part())


def stack_seeds(cfg: TrialConfig, device: torch.device) -> dict[str, SortData]:
    """Every seed's own splits, stacked on a leading member dimension: (S, N, L) tensors."""
    per_seed = [make_splits(cfg.array_len, cfg.mask_rate, s, cfg.train_samples, cfg.dev_samples,
                            cfg.test_samples) for s in cfg.seeds]
    return {split: SortData(*(torch.stack([getattr(d[split], f) for d in per_seed]).to(device)
                              for f in ("values", "obs_mask", "perm", "ranks")))
            for split in ("train", "dev", "test")}


@torch.no_grad()
def clip_per_member(params: list[torch.Tensor], max_norm: float) -> None:
    """clip_grad_norm_ for every ensemble member on its own (dim 0 of each parameter)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    sq = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0)  # (S,)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # the formula of clip_grad_norm_
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


class TrialRunner:
    """A trial: one configuration trained on all of its seeds together, one epoch at a time.

    Each seed is one member of an ensemble model (its own initialisation, data, data order,
    optimizer state and gradient clipping), so the seeds run as one batched computation and
    each member's results equal those of training that seed alone, up to float rounding.
    """

    def __init__(self, cfg: TrialConfig, device: str | torch.device | None = None):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg, self.device = cfg, torch.device(device)
        self.seeds = list(cfg.seeds)
        self.data = stack_seeds(cfg, self.device)
        self.model = PoHSorter.from_seeds(model_config(cfg), self.seeds).to(self.device)
        # AdamW is elementwise, so one optimizer over stacked members equals one per seed.
        opt_kw: dict[str, Any] = dict(betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        if self.device.type in ("cpu", "cuda"):
            opt_kw["fused"] = True
        self.enc_params = self.model.encoder_parameters()
        self.ctrl_params = self.model.controller_parameters()
        self.enc_opt = torch.optim.AdamW(self.enc_params, lr=cfg.lr_encoder, **opt_kw)
        self.ctrl_opt = (torch.optim.AdamW(self.ctrl_params, lr=cfg.lr_controller, **opt_kw)
                         if self.ctrl_params else None)
        self.ds_weights = torch.tensor(
            losses.supervision_weights(cfg.deep_supervision, self.model.cfg.n_iters),
            device=self.device)
        self.epoch = 0  # epochs completed
        self.best: list[dict[str, float]] = [{"best_tau": -math.inf, "best_epoch": 0}
                                             for _ in self.seeds]

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    # --- training -----------------------------------------------------------------------------
    def _loss(self, out, batch: SortData, entropy_w: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member losses (S,) and their parts (3, S): total, ranking, routing entropy."""
        cfg = self.cfg
        T, S, B, L = out.scores.shape
        mask = batch.obs_mask if cfg.loss_pairs == "observed" else torch.ones_like(batch.obs_mask)
        if cfg.loss == "pointer_ce":
            h = out.hidden.transpose(0, 1).reshape(S, T * B, L, -1)  # members first
            ranks_S = batch.ranks.expand(T, S, B, L).transpose(0, 1).reshape(S, T * B, L)
            logits = self.model.pointer.teacher_forced(h, ranks_S)  # (S, T*B, R, P)
            perm = batch.perm.expand(T, S, B, L).transpose(0, 1).reshape(-1, L)
            mask_S = mask.expand(T, S, B, L).transpose(0, 1).reshape(-1, L)
            per = losses.pointer_ce_per_sample(logits.reshape(-1, L, L), perm, mask_S)
            per = per.view(S, T, B).transpose(0, 1)  # back to (T, S, B)
        else:
            ranks = batch.ranks.expand(T, S, B, L).reshape(-1, L)
            mask_T = mask.expand(T, S, B, L).reshape(-1, L)
            per = losses.SCORE_LOSSES[cfg.loss](out.scores.reshape(-1, L), ranks, mask_T)
        rank_loss = torch.einsum("ts,t->s", per.reshape(T, S, B).mean(2), self.ds_weights)  # (S,)
        loss = rank_loss
        ent = torch.zeros_like(rank_loss)
        if out.alphas is not None:
            # Mean routing entropy over tokens and iterations, per member, kept in the graph.
            ent = routing_stats(out.alphas)["entropy"].mean((0, 2, 3))
            if entropy_w != 0.0:
                loss = loss + entropy_w * ent
        return loss, torch.stack([loss, rank_loss, ent]).detach()

    def train_pass(self) -> list[dict[str, Any]]:
        """One optimisation pass over every member's training split; per-seed loss records."""
        steps = self.train_steps()
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def train_steps(self) -> Generator[None, None, list[dict[str, Any]]]:
        """`train_pass` one optimizer step at a time: yields after every step and returns the
        per-seed records (the bench interleaves the steps of several runners with this)."""
        cfg, e = self.cfg, self.epoch
        temp, ent_w = temperature_at(cfg, e), entropy_weight_at(cfg, e)
        frozen = e < cfg.controller_warmup_epochs
        for p in self.ctrl_params:
            p.requires_grad_(not frozen)  # frozen: no gradient is even computed for it
        self.model.train()
        train = self.data["train"]
        S, N, _ = train.values.shape
        # Data order per (seed, epoch): the same whether a seed trains alone or with others.
        order = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(
            s * 1_000_003 + e)) for s in self.seeds]).to(self.device)  # (S, N)
        rows = torch.arange(S, device=self.device).unsqueeze(1)
        x_all, obs_all = train.inputs()
        sums = torch.zeros(3, S, device=self.device)
        n_batches = 0
        pointer = cfg.loss == "pointer_ce"
        for i in range(0, N, cfg.batch_size):
            idx = rows, order[:, i: i + cfg.batch_size]  # (S, B) per-member samples
            batch = SortData(train.values[idx], train.obs_mask[idx], train.perm[idx], train.ranks[idx])
            out = self.model(x_all[idx], obs_all[idx], temp, keep_hidden=pointer)
            loss, parts = self._loss(out, batch, ent_w)
            self.enc_opt.zero_grad(set_to_none=True)
            if self.ctrl_opt is not None:
                self.ctrl_opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # members share no parameter: each gets its own gradient
            clip_per_member(self.enc_params, cfg.clip_encoder)
            self.enc_opt.step()
            if self.ctrl_opt is not None and not frozen:
                clip_per_member(self.ctrl_params, cfg.clip_controller)
                self.ctrl_opt.step()
            sums += parts
            n_batches += 1
            yield
        means = (sums / n_batches).T.tolist()  # S rows of (total, rank, entropy)
        for seed, (total, _, _) in zip(self.seeds, means, strict=True):
            if not math.isfinite(total):
                raise TrainingDiverged(f"seed {seed}, epoch {e + 1}: training loss is {total}")
        self.epoch += 1
        return [{"epoch": self.epoch, "train_loss": total, "train_loss_rank": rank,
                 "train_entropy": ent, "temperature": temp, "entropy_weight": ent_w,
                 "controller_frozen": frozen} for total, rank, ent in means]

    def run_epoch_per_seed(self) -> list[dict[str, Any]]:
        """Train one epoch, evaluate on dev (and on test for the seeds whose dev τ improved)."""
        t0 = time.perf_counter()
        per = self.train_pass()
        temp = per[0]["temperature"]
        dev = self.evaluate("dev", temp, diagnostics=self.cfg.diagnostics)
        improved = [d["tau"] > b["best_tau"] for d, b in zip(dev, self.best, strict=True)]
        if any(improved):
            test = self.evaluate("test", temp, diagnostics=False)
            for s in range(len(self.seeds)):
                if improved[s]:
                    self.best[s] = {"best_tau": dev[s]["tau"], "best_epoch": self.epoch,
                                    **{f"test_{k}": v for k, v in test[s].items()}}
        elapsed = time.perf_counter() - t0
        for m, d, b in zip(per, dev, self.best, strict=True):
            m.update(d)
            m.update(b)
            m["epoch_s"] = elapsed
        return per

    def run_epoch(self) -> dict[str, Any]:
        return aggregate(self.run_epoch_per_seed(), self.seeds)

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str, temperature: float, diagnostics: bool = True
                 ) -> list[dict[str, Any]]:
        """Per seed: τ (mask-aware and all pairs), accuracy and, with diagnostics, per-iteration
        τ, routing entropy, Herfindahl index, mean max α and mean α per (iteration, head)."""
        self.model.eval()
        data = self.data[split]
        x, obs = data.inputs()
        S, N, L = data.values.shape
        pointer = self.cfg.loss == "pointer_ce"
        sums: dict[str, torch.Tensor] = {}

        def add(key: str, per_sample: torch.Tensor) -> None:  # (..., S, n) -> summed over n
            v = per_sample.sum(-1)
            sums[key] = sums[key] + v if key in sums else v

        chunk = max(1, EVAL_TOKENS // (S * L))
        for i in range(0, N, chunk):
            sl = slice(i, i + chunk)
            ranks, mask = data.ranks[:, sl], data.obs_mask[:, sl]
            out = self.model(x[:, sl], obs[:, sl], temperature, keep_hidden=pointer)
            T, _, n, _ = out.scores.shape
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
            add("tau", kendall_tau(last.reshape(-1, L), ranks.reshape(-1, L),
                                   mask.reshape(-1, L)).view(S, n))
            add("tau_all", kendall_tau(last.reshape(-1, L), ranks.reshape(-1, L)).view(S, n))
            add("accuracy", acc)
            add("perfect_sort", perfect)
            if diagnostics:
                ranks_T = ranks.expand(T, S, n, L).reshape(-1, L)
                mask_T = mask.expand(T, S, n, L).reshape(-1, L)
                add("tau_iter", kendall_tau(order.reshape(-1, L), ranks_T, mask_T).view(T, S, n))
                if out.alphas is not None:
                    st = routing_stats(out.alphas)  # each (T, S, n, L)
                    add("entropy_iter", st["entropy"].mean(-1))  # (T, S)
                    add("herfindahl", st["herfindahl"].mean((0, 3)))  # (S,)
                    add("max_alpha", st["max_alpha"].mean((0, 3)))
                    add("alpha_mean", out.alphas.mean(3).permute(0, 3, 1, 2))  # (T, H, S)
        res: list[dict[str, Any]] = [{} for _ in range(S)]
        for key, total in sums.items():
            v = (total / N).cpu()
            for s in range(S):
                if key in ("tau_iter", "entropy_iter"):
                    res[s].update({f"{key}_{t}": val for t, val in enumerate(v[:, s].tolist())})
                elif key == "alpha_mean":  # for the report's (iteration x head) heatmap
                    res[s].update({f"alpha_iter_{t}_head_{h}": val
                                   for t, row in enumerate(v[:, :, s].tolist())
                                   for h, val in enumerate(row)})
                else:
                    res[s][key] = v[s].item()
        for r in res:
            if "herfindahl" in r:
                r["routing_healthy"] = routing_healthy([r["herfindahl"]], [r["max_alpha"]])
        return res

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "seeds": list(self.seeds), "epoch": self.epoch,
                "best": [dict(b) for b in self.best], "model": self.model.state_dict(),
                "enc_opt": self.enc_opt.state_dict(),
                "ctrl_opt": self.ctrl_opt.state_dict() if self.ctrl_opt is not None else {}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if list(sd["seeds"]) != self.seeds:
            raise ValueError(f"checkpoint is for seeds {sd['seeds']}, not {self.seeds}")
        self.epoch = int(sd["epoch"])
        self.best = [dict(b) for b in sd["best"]]
        self.model.load_state_dict(sd["model"])
        self.enc_opt.load_state_dict(sd["enc_opt"])
        if self.ctrl_opt is not None:
            self.ctrl_opt.load_state_dict(sd["ctrl_opt"])

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))


def aggregate(per_seed: list[dict[str, Any]], seeds: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """Means over seeds of every metric, plus per-seed τ and 95 % CI half-widths of τ."""
    out: dict[str, Any] = {}
    for k, v0 in per_seed[0].items():
        vals = [m[k] for m in per_seed]
        if k == "routing_healthy":  # metrics.routing_healthy over the seeds: every seed in band
            out[k] = routing_healthy([m["herfindahl"] for m in per_seed],
                                     [m["max_alpha"] for m in per_seed])
        elif isinstance(v0, bool):
            out[k] = all(vals)
        elif isinstance(v0, (int, float)):
            out[k] = sum(vals) / len(vals)
    out["epoch"] = per_seed[0]["epoch"]
    out["epoch_s"] = max(m["epoch_s"] for m in per_seed)  # seeds train together
    for s, m in zip(seeds, per_seed, strict=True):
        out[f"tau_seed_{s}"] = m["tau"]
        out[f"test_tau_seed_{s}"] = m.get("test_tau", float("nan"))
        # Per-seed values the report needs for its confidence intervals.
        out[f"tau_all_seed_{s}"] = m.get("tau_all", float("nan"))
        out[f"test_tau_all_seed_{s}"] = m.get("test_tau_all", float("nan"))
        out[f"test_perfect_sort_seed_{s}"] = m.get("test_perfect_sort", float("nan"))
    for k in ("tau", "test_tau", "tau_all", "test_tau_all"):
        if k in per_seed[0]:
            out[f"{k}_ci95"] = mean_ci95([m[k] for m in per_seed])[1]
    return out
