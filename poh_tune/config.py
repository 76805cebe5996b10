"""TrialConfig: every knob of one trial, with its default, loaded from YAML and key=value overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from poh_tune.io import atomic_write_text


class ConfigError(ValueError):
    """A user mistake in a configuration: the message names the key, the value and what is allowed."""


class Range(NamedTuple):
    """The values a numeric key allows; None = unbounded above."""

    low: float
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def __contains__(self, value: float) -> bool:
        lo, hi = self.low, self.high
        return ((value >= lo if self.low_inclusive else value > lo)
                and (hi is None or (value <= hi if self.high_inclusive else value < hi)))

    def __str__(self) -> str:
        lo, hi = self.low, self.high
        if hi is None:
            return f"{'>=' if self.low_inclusive else '>'} {lo}"
        return (f"in {'[' if self.low_inclusive else '('}{lo}, {hi}"
                f"{']' if self.high_inclusive else ')'}")


AT_LEAST_1 = Range(1)
POSITIVE = Range(0.0, low_inclusive=False)


def knob(default: Any, allowed: Range | None = None, *,
         choices: tuple[str, ...] | None = None) -> Any:
    """A TrialConfig field: its default and, where restricted, its choices or its range."""
    meta: dict[str, Any] = {}
    if choices is not None:
        meta["choices"] = choices
    if allowed is not None:
        meta["range"] = allowed
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrialConfig:
    # Task (SPEC "The task"): L distinct integers from [-100, 100), a share of them hidden.
    array_len: int = knob(20, Range(2, 512))
    mask_rate: float = knob(0.5, Range(0.0, 1.0, high_inclusive=False))
    train_samples: int = knob(1000, AT_LEAST_1)
    dev_samples: int = knob(300, AT_LEAST_1)
    test_samples: int = knob(300, AT_LEAST_1)
    # Duplicate values (SPEC "Regimes"): 0 draws L distinct values; K >= 2 draws every value with
    # replacement from K integer levels spread over [-100, 100) (fewer levels, more duplicates).
    value_levels: int = knob(0, Range(0, 200))
    # Schedule.
    epochs: int = knob(100, AT_LEAST_1)
    batch_size: int = knob(32, AT_LEAST_1)
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)  # a trial is one configuration on all of these
    # Model (SPEC "Model"): the model reads these keys and no others (model.ModelConfig).
    # "pot" is the PoH transformer (the user's own word: --model pot): encoder + readouts +
    # the iterated PoH block; "baseline": encoder + readouts, one pass.
    model: str = knob("pot", choices=("baseline", "pot"))
    d_model: int = knob(128, AT_LEAST_1)
    n_heads: int = knob(4, AT_LEAST_1)
    d_ff: int = knob(256, AT_LEAST_1)
    max_inner_iters: int = knob(12, AT_LEAST_1)
    hrm_period: int = knob(4, AT_LEAST_1)  # z_H updates on iterations where t % hrm_period == 0
    # "hrm": two-timescale recurrent router; "mlp": stateless router
    controller: str = knob("hrm", choices=("hrm", "mlp"))
    # controller width; as wide as the model would double an iteration's cost
    d_ctrl: int = knob(64, AT_LEAST_1)
    # "full": backprop through all iterations; "last": detach between them
    grad_mode: str = knob("full", choices=("full", "last"))
    # "bf16": matmuls and attention in bfloat16 (the bf16 matrix units: AMX, tensor cores), master
    # weights, optimizer state, losses, softmax and norms in FP32. Not packable: shapes numerics.
    precision: str = knob("fp32", choices=("fp32", "bf16"))
    # Training (SPEC "Training").
    loss: str = knob("ranknet",
                     choices=("ranknet", "listnet", "soft_sort", "combined", "pointer_ce"))
    # "all" also trains on hidden positions (their ranks are known)
    loss_pairs: str = knob("observed", choices=("observed", "all"))
    # weights of the per-iteration losses; "none" = last only
    deep_supervision: str = knob("linear", choices=("none", "uniform", "linear"))
    temperature_init: float = knob(2.0, POSITIVE)
    temperature_min: float = knob(0.8, POSITIVE)
    temperature_decay: float = knob(0.95, Range(0.0, 1.0, low_inclusive=False))
    entropy_reg: float = 1e-3  # w0; negative turns the penalty into a bonus
    entropy_decay_rate: float = knob(0.5, Range(0.0))
    entropy_decay_every: int = knob(5, AT_LEAST_1)
    lr_encoder: float = knob(3e-4, POSITIVE)
    lr_controller: float = knob(1e-4, POSITIVE)
    weight_decay: float = knob(0.01, Range(0.0))
    clip_encoder: float = knob(1.0, POSITIVE)
    clip_controller: float = knob(0.5, POSITIVE)
    # the controller's optimizer does not step before this epoch
    controller_warmup_epochs: int = knob(5, Range(0))
    diagnostics: bool = True  # per-iteration τ / entropy / α statistics at every evaluation
    threads: int = knob(0, Range(0))  # torch intra-op threads; 0 leaves torch's default
    # "auto": whole steps as CUDA graphs on a GPU (eager elsewhere); "off"
    cuda_graphs: str = knob("auto", choices=("auto", "off"))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        return d

    def replace(self, **changes: Any) -> TrialConfig:
        return from_dict({**self.to_dict(), **changes})


# Keys that may differ between configurations trained together as members of one ensemble
# (packing): each member gets its own value. Every other key shapes tensors, data or the
# schedule of steps, and must be equal (pack_key).
PACK_SHAREABLE = ("seeds", "temperature_init", "temperature_min", "temperature_decay",
                  "entropy_reg", "entropy_decay_rate", "entropy_decay_every", "hrm_period",
                  "controller_warmup_epochs", "lr_encoder", "lr_controller", "weight_decay",
                  "clip_encoder", "clip_controller")


def pack_key(cfg: TrialConfig) -> tuple:
    """Configurations with equal keys can train together as one ensemble."""
    return tuple((k, v) for k, v in cfg.to_dict().items()
                 if k not in PACK_SHAREABLE and not isinstance(v, list))


def check_pack(cfgs: Sequence[TrialConfig]) -> None:
    """Raise ValueError, naming the keys, where a configuration cannot train with the first."""
    for i, c in enumerate(cfgs[1:], 1):
        if pack_key(c) != pack_key(cfgs[0]):
            diff = [k for (k, v), (_, v0) in zip(pack_key(c), pack_key(cfgs[0]), strict=True)
                    if v != v0]
            raise ValueError(f"configuration {i} cannot train with configuration 0: they "
                             f"differ in {', '.join(diff)} (only {', '.join(PACK_SHAREABLE)} "
                             "may differ)")


# Views of TrialConfig's fields, by key: the values each allows and its type.
CHOICES: dict[str, tuple[str, ...]] = {
    f.name: f.metadata["choices"] for f in fields(TrialConfig) if "choices" in f.metadata}
RANGES: dict[str, Range] = {
    f.name: f.metadata["range"] for f in fields(TrialConfig) if "range" in f.metadata}
FIELD_TYPES: dict[str, type] = {f.name: type(f.default) for f in fields(TrialConfig)}


def suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value: Any) -> Any:
    want = FIELD_TYPES[key]
    if want is tuple:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key}={value!r}: expected a non-empty list of integers, e.g. [1, 2, 3]")
        for v in value:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{key}={value!r}: every seed must be an integer >= 0, got {v!r}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{key}={value!r}: seeds must be distinct")
        return tuple(value)
    if want is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if want is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" (no dot) as a string
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return float(value)
    if want is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(CHOICES[key])}")
        return value
    raise AssertionError(f"unhandled field type for {key}")


def from_dict(d: dict[str, Any]) -> TrialConfig:
    """Validate a plain mapping and build the frozen config; raises ConfigError on any mistake."""
    if not isinstance(d, dict):
        raise ConfigError(f"expected a mapping of config keys to values, got {type(d).__name__}")
    valid = list(FIELD_TYPES)
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key not in FIELD_TYPES:
            raise ConfigError(f"unknown config key {key!r}{suggest(str(key), valid)}; "
                              f"valid keys: {', '.join(valid)}")
        value = _coerce(key, value)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(CHOICES[key])}")
        if key in RANGES and value not in RANGES[key]:
            raise ConfigError(f"{key}={value!r}: must be {RANGES[key]}")
        out[key] = value
    cfg = TrialConfig(**out)
    if cfg.value_levels == 1:
        raise ConfigError("value_levels=1: every value would be equal (nothing to sort); use 0 "
                          "(distinct values) or 2-200 levels")
    if cfg.value_levels == 0 and cfg.array_len > 200:
        raise ConfigError(f"array_len={cfg.array_len}: at most 200 distinct values exist in "
                          f"[-100, 100); use array_len <= 200 or value_levels >= 2 (duplicates)")
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"n_heads={cfg.n_heads}: must divide d_model={cfg.d_model}")
    if cfg.temperature_min > cfg.temperature_init:
        raise ConfigError(f"temperature_min={cfg.temperature_min}: must be <= "
                          f"temperature_init={cfg.temperature_init}")
    if cfg.model == "pot" and cfg.grad_mode == "last" and cfg.deep_supervision == "none":
        # Under "last" the encoder's output enters only iteration 0, and "none" gives that
        # iteration's loss weight 0: the encoder and embeddings would never learn.
        raise ConfigError("grad_mode='last' with deep_supervision='none': the encoder would get "
                          "no gradient (its output reaches only iteration 0, which 'none' does "
                          "not supervise); use deep_supervision=uniform or linear, or "
                          "grad_mode=full")
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `key=value` strings; values are YAML scalars or flow lists (`seeds=[1,2,3]`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. epochs=10")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e.problem})") from None
    return out


def read_yaml(path: str | Path) -> Any:
    """safe_load a YAML file; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); expected a YAML file") from None
    except OSError as e:  # permissions, I/O errors
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrialConfig:
    """Defaults -> YAML file -> key=value overrides -> one validated, frozen TrialConfig."""
    d: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys to values")
        try:
            from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        d.update(data)
    if overrides:
        d.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return from_dict(d)


def save_config(cfg: TrialConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a kill never leaves half a file)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = ["ConfigError", "TrialConfig", "check_pack", "from_dict", "load_config", "pack_key",
           "parse_overrides", "read_yaml", "save_config", "CHOICES", "PACK_SHAREABLE", "RANGES",
           "Range"]
