"""Deeply supervised PoH training of one configuration on all of its seeds at once; runs without Ray."""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from typing import Any

import torch

from poh_tune import losses
from poh_tune.config import PACK_SHAREABLE, TrialConfig, pack_key
from poh_tune.data import SortData, make_splits
from poh_tune.graphs import GraphedFunction
from poh_tune.metrics import (
    kendall_tau,
    mean_ci95,
    ranks_from_scores,
    routing_entropy,
    routing_healthy,
    routing_stats,
    sort_accuracy,
)
from poh_tune.model import ModelConfig, PoHSorter
from poh_tune.optim import MemberAdamW

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


def stack_seeds(cfg: TrialConfig, seeds: Sequence[int], device: torch.device
                ) -> dict[str, SortData]:
    """Every member's splits (its seed's), stacked on a leading member dimension: (S, N, L).

    Only the seed varies between members: the task's keys are shared by a pack (pack_key)."""
    per_seed = [make_splits(cfg.array_len, cfg.mask_rate, s, cfg.train_samples, cfg.dev_samples,
                            cfg.test_samples) for s in seeds]
    return {split: SortData(*(torch.stack([getattr(d[split], f) for d in per_seed]).to(device)
                              for f in ("values", "obs_mask", "perm", "ranks")))
            for split in ("train", "dev", "test")}


class TrialRunner:
    """One configuration, or a pack of configurations, trained on all their seeds together.

    Each (configuration, seed) pair is one member of an ensemble model: its own initialisation,
    data, data order, schedules (temperature, entropy weight, controller warm-up), HRM period,
    learning rates, clipping and optimizer state. The members run as one batched computation,
    and each member's results equal those of training its configuration and seed alone, up to
    float rounding. Configurations of a pack must agree on everything else (config.pack_key).
    """

    def __init__(self, cfg: TrialConfig | Sequence[TrialConfig],
                 device: str | torch.device | None = None):
        cfgs = [cfg] if isinstance(cfg, TrialConfig) else list(cfg)
        if not cfgs:
            raise ValueError("a TrialRunner needs at least one configuration")
        for i, c in enumerate(cfgs[1:], 1):
            if pack_key(c) != pack_key(cfgs[0]):
                diff = [k for (k, v), (_, v0) in zip(pack_key(c), pack_key(cfgs[0]), strict=True)
                        if v != v0]
                raise ValueError(f"configuration {i} cannot train with configuration 0: they "
                                 f"differ in {', '.join(diff)} (only {', '.join(PACK_SHAREABLE)} "
                                 "may differ)")
        self.cfgs, self.cfg = cfgs, cfgs[0]
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # Members: every configuration's seeds, in order; member_cfg[s] is member s's config.
        self.members = [(i, seed) for i, c in enumerate(cfgs) for seed in c.seeds]
        self.member_cfg = [cfgs[i] for i, _ in self.members]
        self.seeds = [seed for _, seed in self.members]
        self.data = stack_seeds(self.cfg, self.seeds, self.device)
        self.model = PoHSorter.from_seeds(model_config(self.cfg), self.seeds,
                                          [c.hrm_period for c in self.member_cfg]
                                          ).to(self.device)
        mc = self.member_cfg
        self.enc_params = self.model.encoder_parameters()
        self.ctrl_params = self.model.controller_parameters()
        graphs = self.cfg.cuda_graphs == "auto" and self.device.type == "cuda"
        self.enc_opt = MemberAdamW(self.enc_params, [c.lr_encoder for c in mc],
                                   [c.weight_decay for c in mc], [c.clip_encoder for c in mc],
                                   capturable=graphs)
        self.ctrl_opt = (MemberAdamW(self.ctrl_params, [c.lr_controller for c in mc],
                                     [c.weight_decay for c in mc],
                                     [c.clip_controller for c in mc], capturable=graphs)
                         if self.ctrl_params else None)
        self._member_rows = torch.arange(len(self.members), device=self.device).unsqueeze(1)
        self._x_all, self._obs_all = self.data["train"].inputs()
        self._active: tuple[bool, ...] = ()
        self._eval_diagnostics = True
        # Whole steps and evaluation chunks as CUDA graphs (graphs.py); eager elsewhere.
        self._graphed_step = GraphedFunction(self._train_step, self.device, graphs, "training step")
        self._graphed_eval = GraphedFunction(self._eval_chunk, self.device, graphs,
                                             "evaluation")
        self.ds_weights = torch.tensor(
            losses.supervision_weights(self.cfg.deep_supervision, self.model.cfg.n_iters),
            device=self.device)
        self._ds_weights_per_sample: dict[int, torch.Tensor] = {}
        self.epoch = 0  # epochs completed
        self.best: list[dict[str, float]] = [{"best_tau": -math.inf, "best_epoch": 0}
                                             for _ in self.members]
        self.diverged: dict[int, str] = {}  # configuration index -> why (packs only)

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    def schedules(self, epoch: int) -> tuple[list[float], list[float], list[bool]]:
        """Per member at `epoch` (0-based): temperature, entropy weight, controller frozen."""
        return ([temperature_at(c, epoch) for c in self.member_cfg],
                [entropy_weight_at(c, epoch) for c in self.member_cfg],
                [epoch < c.controller_warmup_epochs for c in self.member_cfg])

    def _member_tensor(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=self.device, dtype=torch.float32)  # (S,)

    # --- training -----------------------------------------------------------------------------
    def _loss(self, out, batch: SortData, entropy_w: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member losses (S,) and their parts (3, S): total, ranking, routing entropy.

        entropy_w: (S,) each member's entropy weight."""
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
        else:  # every iteration's scores (T, S, B, L) against the same targets (S, B, L)
            per = losses.SCORE_LOSSES[cfg.loss](out.scores, batch.ranks, mask)  # (T, S, B)
        # Deep supervision: iteration t's mean loss over the batch weighted by ds_weights[t];
        # the weights / B are made once per batch size (a division by a number is several
        # aten calls, forward and backward, every step).
        if B not in self._ds_weights_per_sample:
            self._ds_weights_per_sample[B] = (self.ds_weights / B).view(T, 1, 1)
        rank_loss = (per.view(T, S, B) * self._ds_weights_per_sample[B]).sum((0, 2))  # (S,)
        if out.alphas is None:
            return rank_loss, torch.stack([rank_loss, rank_loss, torch.zeros_like(rank_loss)]
                                          ).detach()
        # Mean routing entropy over tokens and iterations, per member, kept in the graph.
        ent = routing_entropy(out.alphas).mean((0, 2, 3))  # (S,)
        loss = torch.addcmul(rank_loss, entropy_w, ent)
        return loss, torch.stack([loss, rank_loss, ent]).detach()

    def train_pass(self) -> list[dict[str, Any]]:
        """One optimisation pass over every member's training split; per-member loss records."""
        steps = self.train_steps()
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def train_steps(self) -> Generator[None, None, list[dict[str, Any]]]:
        """`train_pass` one optimizer step at a time: yields after every step and returns the
        per-member records (the bench interleaves the steps of several runners with this)."""
        cfg, e = self.cfg, self.epoch
        temps, ent_ws, frozen = self.schedules(e)
        temp_S, ent_w_S = self._member_tensor(temps), self._member_tensor(ent_ws)
        self._active = tuple(not f for f in frozen)
        for p in self.ctrl_params:
            p.requires_grad_(any(self._active))  # all frozen: no gradient is even computed for it
        self.model.train()
        S, N, _ = self.data["train"].values.shape
        # Data order per (seed, epoch): the same whether a seed trains alone or with others.
        order = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(
            s * 1_000_003 + e)) for s in self.seeds]).to(self.device)  # (S, N)
        sums = torch.zeros(3, S, device=self.device)
        n_batches = 0
        for i in range(0, N, cfg.batch_size):
            idx = order[:, i: i + cfg.batch_size]  # (S, B) per-member samples
            sums += self._graphed_step((idx.shape[1], self._active), idx, temp_S, ent_w_S)
            n_batches += 1
            yield
        means = (sums / n_batches).T.tolist()  # S rows of (total, rank, entropy)
        for (c, seed), (total, _, _) in zip(self.members, means, strict=True):
            if not math.isfinite(total) and c not in self.diverged:
                msg = f"seed {seed}, epoch {e + 1}: training loss is {total}"
                if len(self.cfgs) == 1:
                    raise TrainingDiverged(msg)
                self.diverged[c] = msg  # the pack's other configurations train on
        self.epoch += 1
        return [{"epoch": self.epoch, "train_loss": total, "train_loss_rank": rank,
                 "train_entropy": ent, "temperature": t, "entropy_weight": w,
                 "controller_frozen": f}
                for (total, rank, ent), t, w, f in zip(means, temps, ent_ws, frozen, strict=True)]

    def _train_step(self, idx: torch.Tensor, temp_S: torch.Tensor, ent_w_S: torch.Tensor
                    ) -> torch.Tensor:
        """One optimizer step of every member on its samples idx (S, B); returns the step's
        loss parts (3, S). Everything that varies between steps is in the tensor arguments and
        everything else is fixed for the epoch, so a CUDA graph can replay it."""
        train = self.data["train"]
        sel = self._member_rows, idx
        pointer = self.cfg.loss == "pointer_ce"
        obs = self._obs_all[sel]
        # The losses read ranks and the mask; only the pointer loss reads the permutation.
        batch = SortData(None, obs, train.perm[sel] if pointer else None, train.ranks[sel])
        out = self.model(self._x_all[sel], obs, temp_S, keep_hidden=pointer)
        loss, parts = self._loss(out, batch, ent_w_S)
        self.enc_opt.zero_grad()
        if self.ctrl_opt is not None:
            self.ctrl_opt.zero_grad()
        loss.sum().backward()  # members share no parameter: each gets its own gradient
        self.enc_opt.clip()
        self.enc_opt.step()
        if self.ctrl_opt is not None and any(self._active):
            self.ctrl_opt.clip()
            self.ctrl_opt.step(self._active)
        return parts

    def run_epoch_per_seed(self) -> list[dict[str, Any]]:
        """Train one epoch, evaluate on dev (and on test for the members whose dev τ improved);
        one record per member."""
        t0 = time.perf_counter()
        per = self.train_pass()
        temps = [m["temperature"] for m in per]
        dev = self.evaluate("dev", temps, diagnostics=self.cfg.diagnostics)
        improved = [d["tau"] > b["best_tau"] for d, b in zip(dev, self.best, strict=True)]
        if any(improved):
            test = self.evaluate("test", temps, diagnostics=False)
            for s in range(len(self.members)):
                if improved[s]:
                    self.best[s] = {"best_tau": dev[s]["tau"], "best_epoch": self.epoch,
                                    **{f"test_{k}": v for k, v in test[s].items()}}
        elapsed = time.perf_counter() - t0
        for m, d, b in zip(per, dev, self.best, strict=True):
            m.update(d)
            m.update(b)
            m["epoch_s"] = elapsed
        return per

    def run_epoch_per_config(self) -> list[dict[str, Any]]:
        """One epoch; each configuration's record, aggregated over its seeds (as run_epoch)."""
        per = self.run_epoch_per_seed()
        return [aggregate([m for (c, _), m in zip(self.members, per, strict=True) if c == i],
                          list(cfg.seeds)) for i, cfg in enumerate(self.cfgs)]

    def run_epoch(self) -> dict[str, Any]:
        if len(self.cfgs) != 1:
            raise ValueError("a pack of configurations: use run_epoch_per_config")
        return aggregate(self.run_epoch_per_seed(), self.seeds)

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str, temperature: float | Sequence[float],
                 diagnostics: bool = True) -> list[dict[str, Any]]:
        """Per member: τ (mask-aware and all pairs), accuracy and, with diagnostics,
        per-iteration τ, routing entropy, Herfindahl index, mean max α and mean α per
        (iteration, head). temperature: one for all members, or one per member."""
        S, N, L = self.data[split].values.shape
        temps = [float(temperature)] * S if isinstance(temperature, (int, float)) else temperature
        temp_S = self._member_tensor(list(temps))
        self.model.eval()
        data = self.data[split]
        x, obs = data.inputs()
        self._eval_diagnostics = diagnostics
        sums: dict[str, torch.Tensor] = {}
        chunk = max(1, EVAL_TOKENS // (S * L))
        for i in range(0, N, chunk):
            sl = slice(i, i + chunk)
            key = (x[:, sl].shape[1], diagnostics)
            part = self._graphed_eval(key, x[:, sl], obs[:, sl], data.ranks[:, sl],
                                      data.obs_mask[:, sl], temp_S)
            for k, v in part.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
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

    @torch.no_grad()
    def _eval_chunk(self, x: torch.Tensor, obs: torch.Tensor, ranks: torch.Tensor,
                    mask: torch.Tensor, temp_S: torch.Tensor) -> dict[str, torch.Tensor]:
        """The metrics of one chunk of samples, summed over its samples: each (S,), or (T, S)
        and (T, H, S) per iteration. x, obs, ranks, mask: (S, n, L); temp_S: (S,)."""
        S, n, L = x.shape
        pointer = self.cfg.loss == "pointer_ce"
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
        add("tau", kendall_tau(last.reshape(-1, L), ranks.reshape(-1, L),
                               mask.reshape(-1, L)).view(S, n))
        add("tau_all", kendall_tau(last.reshape(-1, L), ranks.reshape(-1, L)).view(S, n))
        add("accuracy", acc)
        add("perfect_sort", perfect)
        if self._eval_diagnostics:
            ranks_T = ranks.expand(T, S, n, L).reshape(-1, L)
            mask_T = mask.expand(T, S, n, L).reshape(-1, L)
            add("tau_iter", kendall_tau(order.reshape(-1, L), ranks_T, mask_T).view(T, S, n))
            if out.alphas is not None:
                st = routing_stats(out.alphas)  # each (T, S, n, L)
                add("entropy_iter", st["entropy"].mean(-1))  # (T, S)
                add("herfindahl", st["herfindahl"].mean((0, 3)))  # (S,)
                add("max_alpha", st["max_alpha"].mean((0, 3)))
                add("alpha_mean", out.alphas.mean(3).permute(0, 3, 1, 2))  # (T, H, S)
        return sums

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"configs": [c.to_dict() for c in self.cfgs], "seeds": list(self.seeds),
                "epoch": self.epoch, "best": [dict(b) for b in self.best],
                "diverged": dict(self.diverged), "model": self.model.state_dict(),
                "enc_opt": self.enc_opt.state_dict(),
                "ctrl_opt": self.ctrl_opt.state_dict() if self.ctrl_opt is not None else {}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if list(sd["seeds"]) != self.seeds:
            raise ValueError(f"checkpoint is for seeds {sd['seeds']}, not {self.seeds}")
        if "configs" not in sd:
            raise ValueError("checkpoint from an older poh_tune (one optimizer state per "
                             "parameter); start the trial afresh")
        self.epoch = int(sd["epoch"])
        self.diverged = {int(k): v for k, v in sd.get("diverged", {}).items()}
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
