"""The epoch loop: one configuration (or a pack) trained on all its seeds at once; runs without Ray."""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from typing import Any

import torch

from poh_tune.config import TrialConfig, check_pack
from poh_tune.data import SortData, stack_seeds
from poh_tune.evaluate import Evaluator, aggregate
from poh_tune.graphs import GraphedFunction
from poh_tune.losses import TrialLoss
from poh_tune.matmul import matmul_precision
from poh_tune.model import ModelConfig, PoHSorter
from poh_tune.optim import MemberAdamW

__all__ = ["TrainingDiverged", "TrialRunner", "aggregate", "entropy_weight_at", "temperature_at"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the seed and the epoch."""


def temperature_at(cfg: TrialConfig, epoch: int) -> float:
    """T_e = max(T_min, T0 * decay**e), e counted from 0."""
    return max(cfg.temperature_min, cfg.temperature_init * cfg.temperature_decay**epoch)


def entropy_weight_at(cfg: TrialConfig, epoch: int) -> float:
    """w_e = w0 * rate**(e // every), e counted from 0."""
    return cfg.entropy_reg * cfg.entropy_decay_rate ** (epoch // cfg.entropy_decay_every)


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
        check_pack(cfgs)
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
        self.model = PoHSorter.from_seeds(ModelConfig.from_trial(self.cfg), self.seeds,
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
        # Whole steps and evaluation chunks as CUDA graphs (graphs.py); eager elsewhere.
        self.graphed_step = GraphedFunction(self._train_step, self.device, graphs, "training step")
        self.evaluator = Evaluator(self.model, self.data, self.cfg.loss == "pointer_ce",
                                   self.device, graphs)
        self.loss_fn = TrialLoss(self.cfg, self.model.cfg.n_iters, self.model.pointer, self.device)
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
        # What picks the step's kernels besides the batch size: which controllers train. The
        # baseline has none, so its steps are one variant whatever the warm-up schedule says.
        variant = self._active if self.ctrl_opt is not None else ()
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
            sums += self.graphed_step((idx.shape[1], variant), idx, temp_S, ent_w_S)
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
        loss, parts = self.loss_fn(out, batch, ent_w_S)
        self.enc_opt.zero_grad()
        if self.ctrl_opt is not None:
            self.ctrl_opt.zero_grad()
        with matmul_precision(self.cfg.precision, self.device):  # as the forward's (model.py)
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

    def evaluate(self, split: str, temperature: float | Sequence[float],
                 diagnostics: bool = True) -> list[dict[str, Any]]:
        """Per member: the metrics of `split` (evaluate.Evaluator)."""
        return self.evaluator(split, temperature, diagnostics)

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
        self.diverged = {int(k): v for k, v in sd["diverged"].items()}
        self.best = [dict(b) for b in sd["best"]]
        self.model.load_state_dict(sd["model"])
        self.enc_opt.load_state_dict(sd["enc_opt"])
        # Loading replaced the optimizers' moments with new tensors: no graph may read the old.
        self.graphed_step.reset()
        self.evaluator.graphed.reset()
        if self.ctrl_opt is not None:
            self.ctrl_opt.load_state_dict(sd["ctrl_opt"])

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
