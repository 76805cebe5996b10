"""poh_tune.fmt: 4 significant digits, the small-n CI rule, a configuration's label."""

from __future__ import annotations

import math

from scipy import stats

from poh_tune.config import TrialConfig
from poh_tune.fmt import MIN_CI_SEEDS, ci_shown, ci_text, config_label, distinct_digits, sig
from poh_tune.metrics import mean_ci95


def test_sig_gives_four_significant_digits():
    assert sig(0.6354166865348816) == "0.6354"
    assert sig(12345.678) == "1.235e+04" and sig(0.000123456) == "0.0001235"
    assert sig(0.012, sign=True) == "+0.012" and sig(-0.5, sign=True) == "-0.5"
    assert sig(12) == "12" and sig(True) == "True" and sig("pot") == "pot"
    assert sig(float("nan")) == "n/a" and sig(None) == "n/a"
    # Four significant digits: the text rounds back to the value within half a unit of the 4th.
    for v in (0.98123456, 3.14159, 1234.5678, 7.7e-5):
        assert abs(float(sig(v)) - v) <= 0.5 * 10 ** (math.floor(math.log10(abs(v))) - 3)


def test_distinct_digits_adds_digits_only_where_values_would_read_the_same():
    d = distinct_digits([0.1234501, 0.1234509, 0.5])
    assert d[0.5] == 4
    assert sig(0.1234501, d[0.1234501]) != sig(0.1234509, d[0.1234509])
    assert d[0.1234501] == d[0.1234509] == 6  # 0.12345 both at 5 digits; 0.12345 / 0.123451


def test_ci_below_three_seeds_is_not_shown():
    assert MIN_CI_SEEDS == 3 and not ci_shown(2) and ci_shown(3)
    two = [0.1, 0.598]
    m, hw = mean_ci95(two)
    assert ci_text(m, hw, 2) == f"{sig(m)} (n=2: CI n/a)"
    # Even given the t half-width of two values (12.7 standard errors), nothing is written.
    t_hw = stats.t.ppf(0.975, 1) * stats.sem(two)
    assert ci_text(m, t_hw, 2) == ci_text(m, float("nan"), 2)
    assert ci_text(0.5, 0.0, 1) == "0.5 (n=1: CI n/a)"


def test_ci_from_three_seeds_inside_the_range_and_clipped_outside():
    vals = [0.90, 0.96, 0.99]
    m, hw = mean_ci95(vals)
    lo, hi = stats.t.interval(0.95, 2, loc=m, scale=stats.sem(vals))
    assert hi > 1  # this interval runs past τ's range
    assert ci_text(m, hw, 3) == f"{sig(m)} [{sig(lo)}, 1]"
    assert ci_text(m, hw, 3, bounds=None) == f"{sig(m)} ± {sig((hi - lo) / 2)}"
    vals = [0.50, 0.52, 0.51, 0.49, 0.50]
    m, hw = mean_ci95(vals)
    assert ci_text(m, hw, 5) == f"{sig(m)} ± {sig(hw)}"
    assert ci_text(0.02, 0.05, 5, bounds=(0.0, 1.0)) == "0.02 [0, 0.07]"  # a rate is >= 0
    assert ci_text(float("nan"), 0.1, 5) == "n/a"


def test_config_label_names_only_the_keys_that_differ():
    base = TrialConfig().to_dict()
    cfg = {**base, "max_inner_iters": 8, "entropy_reg": 0.0011700001, "seeds": [1, 2]}
    assert config_label(cfg, base) == "seeds=1,2 max_inner_iters=8 entropy_reg=0.00117"
    assert config_label(base, base) == "the base configuration"
    # A float that reads like the base's at 4 digits gets the digits that tell them apart.
    near = {**base, "lr_encoder": base["lr_encoder"] * (1 + 1e-5)}
    (part,) = config_label(near, base).split()
    assert float(part.split("=")[1]) != base["lr_encoder"]
