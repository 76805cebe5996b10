"""Numbers for people: 4 significant digits, and the one rule for a CI over few seeds.

Everything a person reads (the console, report.md, plot legends) goes through here; the data
files (results.csv, summary.csv, metrics.jsonl) keep full precision. Imports nothing heavy, so
the CLI and the report can use it without torch.
"""

from __future__ import annotations

import math
from typing import Any

SIG_DIGITS = 4
# Below this many seeds no CI is given: Student's t(0.975) is 12.7 at n=2, so the interval of
# two seeds of τ spans most of [-1, 1] and says nothing (and one value has no spread at all).
MIN_CI_SEEDS = 3
TAU_RANGE = (-1.0, 1.0)  # Kendall τ, mask-aware or all pairs
RATE_RANGE = (0.0, 1.0)  # accuracy, perfect-sort rate


def sig(v: Any, digits: int = SIG_DIGITS, sign: bool = False) -> str:
    """A number to `digits` significant digits ("n/a" for None or nan); other values as text."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:+d}" if sign else str(v)
    return f"{v:{'+' if sign else ''}.{digits}g}"


def distinct_digits(values: list[float], digits: int = SIG_DIGITS) -> dict[float, int]:
    """Significant digits per value: `digits`, more only for a value that would otherwise read
    the same as another one of `values`."""
    out = {}
    uniq = set(values)
    for v in uniq:
        d = digits
        while d < 17 and any(sig(w, d) == sig(v, d) for w in uniq if w != v):
            d += 1
        out[v] = d
    return out


def ci_shown(n: int) -> bool:
    """The small-n rule: a CI is shown (and written to results.csv) from MIN_CI_SEEDS seeds on."""
    return n >= MIN_CI_SEEDS


def ci_text(mean: float, half_width: float, n: int,
            bounds: tuple[float, float] | None = TAU_RANGE, sign: bool = False) -> str:
    """Mean with its 95 % CI for a person: "0.9812 ± 0.002134".

    Below MIN_CI_SEEDS seeds the CI reads "n/a" with the n; an interval that would run past the
    metric's `bounds` is written clipped, as "[low, high]", never as a ± that leaves the range.

    Args:
        mean: the mean over seeds.
        half_width: the 95 % half-width (nan when unknown).
        n: the number of seeds behind the mean.
        bounds: the metric's range; None for an unbounded metric.
        sign: write the mean's sign also when it is positive (a difference).
    """
    if math.isnan(mean):
        return "n/a"
    if not ci_shown(n) or math.isnan(half_width):
        return f"{sig(mean, sign=sign)} (n={n}: CI n/a)"
    lo, hi = mean - half_width, mean + half_width
    if bounds is not None and (lo < bounds[0] or hi > bounds[1]):
        return (f"{sig(mean, sign=sign)} [{sig(max(lo, bounds[0]))}, "
                f"{sig(min(hi, bounds[1]))}]")
    return f"{sig(mean, sign=sign)} ± {sig(half_width)}"


def config_label(config: dict[str, Any], base: dict[str, Any]) -> str:
    """The keys of `config` whose value differs from `base`, as "key=value ..." (floats to 4
    significant digits, more where the base's value would otherwise read the same)."""
    parts = []
    for k, v in config.items():
        b = base.get(k)
        if _same(v, b):
            continue
        if isinstance(v, float) and isinstance(b, float):
            text = sig(v, distinct_digits([v, b])[v])
        elif isinstance(v, (list, tuple)):
            text = ",".join(sig(x) for x in v)
        else:
            text = sig(v)
        parts.append(f"{k}={text}")
    return " ".join(parts) or "the base configuration"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
