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
    assert f"{mean:.3f} ± {hw:.3f}" in text
    assert "FLAGGED" in text  # p2's routing leaves the band
    assert f"{oracle_all_pairs_tau(20, 0.5):.3f}" in text
    assert "stopped early" in text and "errored" in text
    assert "RuntimeError: boom \\| at epoch 1" in text  # the error, its pipe escaped
    assert "| lost | (no trial directory) | errored |" in text
    assert "\N{WHITE HEAVY CHECK MARK}" not in text
    flagged = summary.set_index("trial_id")["routing_healthy"]
    assert not flagged["p2"] and flagged["p1"]
    for name in PLOT_FILES:
        assert f"]({name})" in text


def test_one_seed_has_no_ci():
    assert format_stat(Stat(0.5, 0.0, [0.5])) == "0.500 (1 seed: CI n/a)"
    assert format_stat(Stat(0.5, 1.2, [0.4, 0.6])) == "0.500 ± 1.200 (n=2)"
    assert format_stat(Stat(0.5, 0.1, [0.5] * 5)) == "0.500 ± 0.100"


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
