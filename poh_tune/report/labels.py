"""Short names of configurations: what sets each apart, for the tables and the plots' legends."""

from __future__ import annotations

from typing import Any

from poh_tune.report.load import POH_ONLY_KEYS, Trial

LABEL_DIGITS = 4  # significant digits of a float in a configuration's label


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def varying_keys(trials: list[Trial]) -> list[str]:
    """Config keys whose value differs between trials, in config order."""
    keys: list[str] = []
    for t in trials:
        for k in t.config:
            if k not in keys:
                keys.append(k)
    return [k for k in keys
            if len({_hashable(t.config.get(k)) for t in trials}) > 1 and k != "seeds"]


def short_value(v: Any, digits: int = LABEL_DIGITS) -> str:
    """A config value for a label: floats to `digits` significant digits."""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def sort_key(v: Any) -> tuple:
    """Numbers in numeric order, then everything else by its text (None last)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1 if v is not None else 2, 0.0, str(v))


def label_digits(trials: list[Trial], keys: list[str]) -> dict[str, dict[float, int]]:
    """Significant digits of each float value per key: LABEL_DIGITS, more only for a value that
    would otherwise look equal to another one of the same key."""
    out: dict[str, dict[float, int]] = {}
    for k in keys:
        vals = {v for t in trials if isinstance(v := t.config.get(k), float)}
        out[k] = {}
        for v in vals:
            d = LABEL_DIGITS
            while d < 17 and any(short_value(w, d) == short_value(v, d) for w in vals if w != v):
                d += 1
            out[k][v] = d
    return out


def trial_label(trial: Trial, keys: list[str],
                digits: dict[str, dict[float, int]] | None = None) -> str:
    """What sets this configuration apart: the varying keys, rounded (the model where it varies)."""
    digits = digits or {}

    def value(k: str) -> str:
        v = trial.config.get(k)
        return short_value(v, digits.get(k, {}).get(v, LABEL_DIGITS) if isinstance(v, float)
                           else LABEL_DIGITS)

    parts = [str(trial.config.get("model"))] if "model" in keys else []
    parts += [f"{k}={value(k)}" for k in keys
              if k != "model" and (trial.is_poh or k not in POH_ONLY_KEYS)]
    return " ".join(parts) or str(trial.config.get("model"))


def config_labels(trials: list[Trial]) -> dict[str, str]:
    """trial_id -> trial_label, for the tables (beside the trial id) and the plots' legends."""
    keys = varying_keys(trials)
    digits = label_digits(trials, keys)
    return {t.trial_id: trial_label(t, keys, digits) for t in trials}


def swept_keys(info: dict[str, Any] | None) -> list[str]:
    """The keys an experiment of poh_experiment.yaml sweeps: its "swept" entry is one key, a
    list of keys (a cross product) or None (the base alone: then the model sets trials apart)."""
    swept = (info or {}).get("swept")
    if isinstance(swept, list) and swept:
        return [str(k) for k in swept]
    return [str(swept)] if swept else ["model"]


def swept_label(trial: Trial, keys: list[str]) -> str:
    """`key=value` of each swept key, e.g. "model=pot array_len=50"."""
    return " ".join(f"{k}={short_value(trial.config.get(k))}" for k in keys)


def named(trial_id: str, label: str) -> str:
    """A legend entry or table cell that carries the trial id the tables share."""
    return f"{trial_id}: {label}"
