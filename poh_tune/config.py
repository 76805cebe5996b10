"""TrialConfig: every knob of one trial, with its default, loaded from YAML and key=value overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from poh_tune.io import atomic_write_text


class ConfigError(ValueError):
    """A user mistake in a configuration: the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class TrialConfig:
    # Task (SPEC "The task"): L distinct integers from [-100, 100), a share of them hidden.
    array_len: int = 20
    mask_rate: float = 0.5
    train_samples: int = 1000
    dev_samples: int = 300
    test_samples: int = 300
    # Schedule.
    epochs: int = 100
    batch_size: int = 32
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)  # a trial is one configuration on all of these
    # Model (SPEC "Model").
    model: str = "pot"  # "baseline": encoder + readouts, one pass; "pot": + iterated PoH block
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 256
    max_inner_iters: int = 12
    hrm_period: int = 4  # z_H updates on iterations where t % hrm_period == 0
    controller: str = "hrm"  # "hrm": two-timescale recurrent router; "mlp": stateless router
    d_ctrl: int = 64  # controller width; as wide as the model would double an iteration's cost
    grad_mode: str = "full"  # "full": backprop through all iterations; "last": detach between them
    # "bf16": matmuls and attention in bfloat16 (the bf16 matrix units: AMX, tensor cores), master
    # weights, optimizer state, losses, softmax and norms in FP32. Not packable: shapes numerics.
    precision: str = "fp32"
    # Training (SPEC "Training").
    loss: str = "ranknet"
    loss_pairs: str = "observed"  # "all" also trains on hidden positions (their ranks are known)
    deep_supervision: str = "linear"  # weights of the per-iteration losses; "none" = last only
    temperature_init: float = 2.0
    temperature_min: float = 0.8
    temperature_decay: float = 0.95
    entropy_reg: float = 1e-3  # w0; negative turns the penalty into a bonus
    entropy_decay_rate: float = 0.5
    entropy_decay_every: int = 5
    lr_encoder: float = 3e-4
    lr_controller: float = 1e-4
    weight_decay: float = 0.01
    clip_encoder: float = 1.0
    clip_controller: float = 0.5
    controller_warmup_epochs: int = 5  # the controller's optimizer does not step before this epoch
    diagnostics: bool = True  # per-iteration τ / entropy / α statistics at every evaluation
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    cuda_graphs: str = "auto"  # "auto": whole steps as CUDA graphs on a GPU (eager elsewhere); "off"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        return d

    def replace(self, **changes: Any) -> TrialConfig:
        return from_dict({**self.to_dict(), **changes})

    def model_part(self) -> dict[str, Any]:
        """The fields the model itself depends on (nothing about training)."""
        keys = ("array_len", "model", "d_model", "n_heads", "d_ff", "max_inner_iters",
                "hrm_period", "controller", "d_ctrl", "grad_mode", "precision")
        return {k: getattr(self, k) for k in keys}


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


CHOICES: dict[str, tuple[str, ...]] = {
    "model": ("baseline", "pot"),
    "controller": ("hrm", "mlp"),
    "grad_mode": ("full", "last"),
    "loss": ("ranknet", "listnet", "soft_sort", "combined", "pointer_ce"),
    "loss_pairs": ("observed", "all"),
    "deep_supervision": ("none", "uniform", "linear"),
    "cuda_graphs": ("auto", "off"),
    "precision": ("fp32", "bf16"),
}

# (low, high, low_inclusive, high_inclusive); None = unbounded.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "array_len": (2, 512, True, True),
    "mask_rate": (0.0, 1.0, True, False),
    "train_samples": (1, None, True, True),
    "dev_samples": (1, None, True, True),
    "test_samples": (1, None, True, True),
    "epochs": (1, None, True, True),
    "batch_size": (1, None, True, True),
    "d_model": (1, None, True, True),
    "n_heads": (1, None, True, True),
    "d_ff": (1, None, True, True),
    "max_inner_iters": (1, None, True, True),
    "hrm_period": (1, None, True, True),
    "d_ctrl": (1, None, True, True),
    "temperature_init": (0.0, None, False, True),
    "temperature_min": (0.0, None, False, True),
    "temperature_decay": (0.0, 1.0, False, True),
    "entropy_decay_rate": (0.0, None, True, True),
    "entropy_decay_every": (1, None, True, True),
    "lr_encoder": (0.0, None, False, True),
    "lr_controller": (0.0, None, False, True),
    "weight_decay": (0.0, None, True, True),
    "clip_encoder": (0.0, None, False, True),
    "clip_controller": (0.0, None, False, True),
    "controller_warmup_epochs": (0, None, True, True),
    "threads": (0, None, True, True),
}

FIELD_TYPES: dict[str, type] = {
    f.name: (tuple if f.name == "seeds" else type(f.default)) for f in fields(TrialConfig)
}


def _allowed_range(lo, hi, lo_inc, hi_inc) -> str:
    if hi is None:
        return f"{'>=' if lo_inc else '>'} {lo}"
    return f"in {'[' if lo_inc else '('}{lo}, {hi}{']' if hi_inc else ')'}"


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
        if key in RANGES:
            lo, hi, lo_inc, hi_inc = RANGES[key]
            ok = ((lo is None or (value >= lo if lo_inc else value > lo))
                  and (hi is None or (value <= hi if hi_inc else value < hi)))
            if not ok:
                raise ConfigError(f"{key}={value!r}: must be {_allowed_range(lo, hi, lo_inc, hi_inc)}")
        out[key] = value
    cfg = TrialConfig(**out)
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


__all__ = ["ConfigError", "TrialConfig", "from_dict", "load_config", "pack_key",
           "parse_overrides", "read_yaml", "save_config", "CHOICES", "PACK_SHAREABLE", "RANGES"]
