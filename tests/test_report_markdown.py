"""report.markdown: the sections of report.md, its cells and its plain statements."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from synthetic_experiment import build_and_report, ci_halfwidth, trial_config, write_trial

from poh_tune.report import write_report
from poh_tune.report.markdown import format_stat
from poh_tune.report.oracle import oracle_all_pairs_tau
from poh_tune.report.plots import PLOT_FILES
from poh_tune.report.stats import Stat


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_and_report(tmp_path_factory.mktemp("exp"))


def test_report_markdown_content(built):
    _, trials, path, summary = built
    text = path.read_text()
    for section in ("## Per configuration", "## Sweeps", "### iterations", "## A/B",
                    "success bands", "## Routing health"):
        assert section in text
    # Sweep table ordered by the swept parameter: 2 iterations before 3.
    sweep = text.split("### iterations")[1].split("##")[0]
    assert sweep.index("| 2 |") < sweep.index("| 3 |")
    mean, hw = np.mean(trials["p1"]["final"]["test_tau"]), ci_halfwidth(
        trials["p1"]["final"]["test_tau"])
    assert f"{mean:.4g} ± {hw:.4g}" in text  # 4 significant digits
    assert "FLAGGED" in text  # p2's routing leaves the band
    assert f"{oracle_all_pairs_tau(20, 0.5):.4g}" in text
    assert "stopped early" in text and "errored" in text
    assert "RuntimeError: boom \\| at epoch 1" in text  # the error, its pipe escaped
    assert "| lost | (no trial directory) | errored |" in text
    assert "\N{WHITE HEAVY CHECK MARK}" not in text
    flagged = summary.set_index("trial_id")["routing_healthy"]
    assert not flagged["p2"] and flagged["p1"]
    for name in PLOT_FILES:
        assert f"]({name})" in text


def test_small_n_rule_in_cells():
    """Below 3 seeds no CI; n shown below 5; an interval past the range is written clipped."""
    assert format_stat(Stat(0.5, float("nan"), [0.5])) == "0.5 (n=1: CI n/a)"
    assert format_stat(Stat(0.349, float("nan"), [0.1, 0.598])) == "0.349 (n=2: CI n/a)"
    assert format_stat(Stat(0.51234, 0.1, [0.5] * 3)) == "0.5123 ± 0.1 (n=3)"
    assert format_stat(Stat(0.5, 0.1, [0.5] * 5)) == "0.5 ± 0.1"
    assert format_stat(Stat(0.97, 0.05, [0.97] * 5)) == "0.97 [0.92, 1]"  # never past τ's 1
    assert format_stat(Stat(0.02, 0.05, [0.02] * 5), (0.0, 1.0)) == "0.02 [0, 0.07]"
    assert format_stat(Stat(0.02, 0.05, [0.02] * 5), (-1.0, 1.0)) == "0.02 ± 0.05"
    assert format_stat(Stat(0.7, float("nan"), [])) == "0.7 (no per-seed values)"


def _few_seed_experiment(tmp_path, seeds, with_baseline):
    """A synthetic experiment whose trials have `seeds` seeds (written by write_trial)."""
    import synthetic_experiment as se

    rng = np.random.default_rng(0)
    (tmp_path / "poh_experiment.yaml").write_text(yaml.safe_dump({"mode": "optuna"}))
    old = se.SEEDS
    se.SEEDS = seeds
    try:
        def fin(mu):
            return {"test_tau": list(mu + rng.normal(0, 0.3, len(seeds))),
                    "test_tau_all": list(mu / 2 + rng.normal(0, 0.3, len(seeds))),
                    "test_perfect_sort": list(rng.uniform(0, 0.1, len(seeds)))}
        cfg = {**trial_config(), "seeds": seeds}
        if with_baseline:
            write_trial(tmp_path, "b", {**cfg, "model": "baseline"}, [], fin(0.3), 2, rng)
        for i in range(3):
            write_trial(tmp_path, f"p{i}", {**cfg, "entropy_reg": 0.001 * (i + 1)}, [],
                        fin(0.35), 2, rng)
    finally:
        se.SEEDS = old
    return write_report(tmp_path).read_text()


def _cells(text, section):
    return [c.strip() for line in text.split(section)[1].split("\n## ")[0].splitlines()
            if line.startswith("|") for c in line.strip("|").split("|")]


def test_two_seed_report_shows_no_interval(tmp_path):
    """Two seeds of a noisy τ: a t interval would be 12.7 standard errors wide, past [-1, 1]."""
    text = _few_seed_experiment(tmp_path, [1, 2], with_baseline=True)
    assert "±" not in text and "n=2: CI n/a" in text
    assert "below 3 seeds a CI reads n/a" in text  # the rule is stated


def test_optuna_report_without_baseline_says_so_in_one_line(tmp_path):
    text = _few_seed_experiment(tmp_path, [1, 2, 3, 4, 5], with_baseline=False)
    ab = text.split("## A/B")[1].split("\n## ")[0]
    assert "No baseline in this experiment: none of its 3 PoH configurations" in ab
    assert "|" not in ab.split("###")[0] and "n/a" not in ab.split("###")[0]  # no table


def test_no_interval_past_tau_range(tmp_path):
    """Every `m ± h` cell of a noisy 3-seed report stays inside [-1, 1] (others are clipped)."""
    text = _few_seed_experiment(tmp_path, [1, 2, 3], with_baseline=True)
    import re
    pm = re.findall(r"(-?[0-9.e+-]+) ± ([0-9.e+-]+)", text)
    clipped = re.findall(r"\[(-?[0-9.e+-]+), (-?[0-9.e+-]+)\]", text)
    assert pm and clipped  # this noise leaves τ's range on some cells, not on others
    for m, h in pm:
        assert -1 <= float(m) - float(h) and float(m) + float(h) <= 1
    for lo, hi in clipped:
        assert -1 <= float(lo) <= float(hi) <= 1


def test_report_says_plainly_when_poh_configurations_do_not_differ(tmp_path):
    """Ten PoH configurations drawn from one distribution, one baseline far below."""
    rng = np.random.default_rng(3)
    (tmp_path / "poh_experiment.yaml").write_text(yaml.safe_dump({"mode": "grid"}))

    def fin(mu):
        return {"test_tau": list(mu + rng.normal(0, 0.002, 5)),
                "test_tau_all": list(mu / 2 + rng.normal(0, 0.002, 5)),
                "test_perfect_sort": list(rng.uniform(0, 0.1, 5))}

    write_trial(tmp_path, "b", trial_config(model="baseline"), [], fin(0.979), 2, rng)
    for i in range(10):
        write_trial(tmp_path, f"p{i}", trial_config(entropy_reg=0.001 * (i + 1)), [], fin(0.988),
                    2, rng)
    text = write_report(tmp_path).read_text()
    assert "No two PoH configurations differ significantly" in text
    assert "45 pairs compared" in text
    assert "10 of 10 PoH configurations differ from their baseline" in text
    assert "paired p, Holm" in text
