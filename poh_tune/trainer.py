"""Deeply supervised PoH training of one configuration on each of its seeds; runs without Ray."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from poh_tune import losses
from poh_tune.config import TrialConfig
from poh_tune.data import SortData, make_splits
from poh_tune.metrics import kendall_tau, mean_ci95, ranks_from_scores, routing_stats, sort_accuracy
from poh_tune.model import ModelConfig, PoHSorter

# Routing health band of the document: flag (never fail) a trial whose routing leaves it.
HERFINDAHL_MAX = 0.5
MAX_ALPHA_BAND = (0.3, 0.6)
EVAL_BATCH = 1024


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


def routing_healthy(herfindahl: float, max_alpha: float) -> bool:
    return herfindahl < HERFINDAHL_MAX and MAX_ALPHA_BAND[0] <= max_alpha <= MAX_ALPHA_BAND[1]


class SeedTrainer:
    """One seed of one configuration: its data, model, two optimizers and best-dev bookkeeping."""

    def __init__(self, cfg: TrialConfig, seed: int, device: str | torch.device = "cpu"):
        self.cfg, self.seed, self.device = cfg, seed, torch.device(device)
        self.data = {k: v.to(self.device) for k, v in make_splits(
            cfg.array_len, cfg.mask_rate, seed, cfg.train_samples, cfg.dev_samples,
            cfg.test_samples).items()}
        torch.manual_seed(seed)  # the initialisation is a function of the seed alone
        self.model = PoHSorter(model_config(cfg)).to(self.device)
        opt_kw = dict(betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
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
        self.best: dict[str, float] = {"best_tau": -math.inf, "best_epoch": 0}

    # --- training -----------------------------------------------------------------------------
    def _loss(self, out, batch: SortData, entropy_w: float) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        T, B, L = out.scores.shape
        mask = batch.obs_mask if cfg.loss_pairs == "observed" else torch.ones_like(batch.obs_mask)
        ranks = batch.ranks.expand(T, B, L).reshape(T * B, L)
        mask_T = mask.expand(T, B, L).reshape(T * B, L)
        if cfg.loss == "pointer_ce":
            h = out.hidden.reshape(T * B, L, -1)
            logits = self.model.pointer.teacher_forced(h, ranks)
            per = losses.pointer_ce_per_sample(logits, batch.perm.expand(T, B, L).reshape(T * B, L),
                                               mask_T)
        else:
            per = losses.SCORE_LOSSES[cfg.loss](out.scores.reshape(T * B, L), ranks, mask_T)
        per_iter = per.view(T, B).mean(1)  # (T,)
        rank_loss = (per_iter * self.ds_weights).sum()
        loss = rank_loss
        ent = torch.zeros((), device=self.device)
        if out.alphas is not None:
            # Mean routing entropy over tokens and iterations, kept in the graph.
            ent = routing_stats(out.alphas)["entropy"].mean()
            if entropy_w != 0.0:
                loss = loss + entropy_w * ent
        return loss, {"rank": rank_loss.detach(), "entropy": ent.detach()}

    def train_pass(self) -> dict[str, Any]:
        """One optimisation pass over the training split at the current epoch's schedule."""
        cfg, e = self.cfg, self.epoch
        temp, ent_w = temperature_at(cfg, e), entropy_weight_at(cfg, e)
        frozen = e < cfg.controller_warmup_epochs
        for p in self.ctrl_params:
            p.requires_grad_(not frozen)  # frozen: no gradient is even computed for it
        self.model.train()
        train = self.data["train"]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)  # data order per (seed, epoch)
        order = torch.randperm(len(train), generator=g).to(self.device)
        x_all, obs_all = train.inputs()
        sums = torch.zeros(3, device=self.device)
        n_batches = 0
        pointer = cfg.loss == "pointer_ce"
        for i in range(0, len(train), cfg.batch_size):
            idx = order[i: i + cfg.batch_size]
            batch = SortData(train.values[idx], train.obs_mask[idx], train.perm[idx], train.ranks[idx])
            out = self.model(x_all[idx], obs_all[idx], temp, keep_hidden=pointer)
            loss, parts = self._loss(out, batch, ent_w)
            self.enc_opt.zero_grad(set_to_none=True)
            if self.ctrl_opt is not None:
                self.ctrl_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.enc_params, cfg.clip_encoder, foreach=True)
            self.enc_opt.step()
            if self.ctrl_opt is not None and not frozen:
                torch.nn.utils.clip_grad_norm_(self.ctrl_params, cfg.clip_controller, foreach=True)
                self.ctrl_opt.step()
            sums += torch.stack([loss.detach(), parts["rank"], parts["entropy"]])
            n_batches += 1
        train_loss, rank_loss, ent = (sums / n_batches).tolist()
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"seed {self.seed}, epoch {e + 1}: training loss is {train_loss}")
        self.epoch += 1
        return {"epoch": self.epoch, "train_loss": train_loss, "train_loss_rank": rank_loss,
                "train_entropy": ent, "temperature": temp, "entropy_weight": ent_w,
                "controller_frozen": frozen}

    def train_epoch(self) -> dict[str, Any]:
        """Train one epoch, evaluate on dev (and on test when dev improves); return its metrics."""
        t0 = time.perf_counter()
        m = self.train_pass()
        dev = self.evaluate("dev", m["temperature"], diagnostics=self.cfg.diagnostics)
        m.update(dev)
        if dev["tau"] > self.best["best_tau"]:
            test = self.evaluate("test", m["temperature"], diagnostics=False)
            self.best = {"best_tau": dev["tau"], "best_epoch": self.epoch,
                         **{f"test_{k}": v for k, v in test.items()}}
        m.update(self.best)
        m["epoch_s"] = time.perf_counter() - t0
        return m

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str, temperature: float, diagnostics: bool = True) -> dict[str, float]:
        """τ (mask-aware and all pairs), accuracy and, with diagnostics, per-iteration statistics."""
        self.model.eval()
        data = self.data[split]
        x, obs = data.inputs()
        pointer = self.cfg.loss == "pointer_ce"
        acc: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(data), EVAL_BATCH):
            sl = slice(i, i + EVAL_BATCH)
            out = self.model(x[sl], obs[sl], temperature, keep_hidden=pointer)
            T, B, L = out.scores.shape
            if pointer:  # greedy decoding of every iteration in one batched loop over ranks
                pred = self.model.pointer.greedy_ranks(out.hidden.reshape(T * B, L, -1)).view(T, B, L)
            else:
                pred = ranks_from_scores(out.scores)
            last = pred[-1]
            a, p = sort_accuracy(last, data.ranks[sl])
            parts = {"tau": kendall_tau(last, data.ranks[sl], data.obs_mask[sl]),
                     "tau_all": kendall_tau(last, data.ranks[sl]),
                     "accuracy": a, "perfect_sort": p}
            if diagnostics:
                ranks_T = data.ranks[sl].expand(T, B, L).reshape(T * B, L)
                obs_T = data.obs_mask[sl].expand(T, B, L).reshape(T * B, L)
                parts["tau_iter"] = kendall_tau(pred.reshape(T * B, L), ranks_T, obs_T).view(T, B).T
                if out.alphas is not None:
                    st = routing_stats(out.alphas)  # each (T, B, L)
                    parts["entropy_iter"] = st["entropy"].mean(-1).T  # (B, T)
                    parts["herfindahl"] = st["herfindahl"].mean((0, 2))
                    parts["max_alpha"] = st["max_alpha"].mean((0, 2))
                    parts["alpha_mean"] = out.alphas.sum(2).transpose(0, 1)  # (B, T, H)
            for k, v in parts.items():
                acc.setdefault(k, []).append(v)
        res: dict[str, Any] = {}
        n = len(data)
        for k, vs in acc.items():
            v = torch.cat(vs)
            if k == "tau_iter" or k == "entropy_iter":
                for t, val in enumerate(v.mean(0).tolist()):
                    res[f"{k}_{t}"] = val
            elif k == "alpha_mean":
                # Mean α per (iteration, head), over tokens and samples: for the report's heatmap.
                am = (v.sum(0) / (n * self.cfg.array_len)).tolist()
                for t, row in enumerate(am):
                    for h, val in enumerate(row):
                        res[f"alpha_iter_{t}_head_{h}"] = val
            else:
                res[k] = v.mean().item()
        if "herfindahl" in res:
            res["routing_healthy"] = routing_healthy(res["herfindahl"], res["max_alpha"])
        return res

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "best": dict(self.best),
                "model": self.model.state_dict(), "enc_opt": self.enc_opt.state_dict(),
                "ctrl_opt": self.ctrl_opt.state_dict() if self.ctrl_opt is not None else {}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["seed"] != self.seed:
            raise ValueError(f"checkpoint is for seed {sd['seed']}, not {self.seed}")
        self.epoch = int(sd["epoch"])
        self.best = dict(sd["best"])
        self.model.load_state_dict(sd["model"])
        self.enc_opt.load_state_dict(sd["enc_opt"])
        if self.ctrl_opt is not None:
            self.ctrl_opt.load_state_dict(sd["ctrl_opt"])


def aggregate(per_seed: list[dict[str, Any]], seeds: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """Means over seeds of every metric, plus per-seed τ and 95 % CI half-widths of τ."""
    out: dict[str, Any] = {}
    for k, v0 in per_seed[0].items():
        vals = [m[k] for m in per_seed]
        if isinstance(v0, bool):
            out[k] = all(vals)
        elif isinstance(v0, (int, float)):
            out[k] = sum(vals) / len(vals)
    out["epoch"] = per_seed[0]["epoch"]
    out["epoch_s"] = sum(m["epoch_s"] for m in per_seed)
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


class TrialRunner:
    """A trial: one configuration trained on each of its seeds, one epoch at a time."""

    def __init__(self, cfg: TrialConfig, device: str | torch.device | None = None):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.seeds = [SeedTrainer(cfg, s, device) for s in cfg.seeds]

    @property
    def epoch(self) -> int:
        return self.seeds[0].epoch

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    def run_epoch(self) -> dict[str, Any]:
        return aggregate([t.train_epoch() for t in self.seeds], self.cfg.seeds)

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "seeds": [t.state_dict() for t in self.seeds]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for t, s in zip(self.seeds, sd["seeds"], strict=True):
            t.load_state_dict(s)

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.seeds[0].device, weights_only=True))
