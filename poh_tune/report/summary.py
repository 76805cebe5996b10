"""summary.csv: one row per configuration with its statistics, ceiling, routing health and A/B."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from poh_tune.report.labels import config_labels, varying_keys
from poh_tune.report.load import TASK_KEYS, Experiment
from poh_tune.report.oracle import oracle_all_pairs_tau
from poh_tune.report.stats import STAT_KEYS, ab_compare, match_baseline, routing_row, trial_stat


def summary_frame(exp: Experiment) -> pd.DataFrame:
    """One row per configuration: status, its varying settings, statistics, ceiling, routing, A/B.

    Args:
        exp: the loaded experiment.
    Returns:
        The summary table written to summary.csv.
    """
    keys = varying_keys(exp.trials)
    labels = config_labels(exp.trials)
    baselines = [t for t in exp.trials if not t.is_poh]
    rows = []
    for t in exp.trials:
        r: dict[str, Any] = {"trial_id": t.trial_id, "label": labels[t.trial_id],
                             "status": t.status, "epochs_done": t.epochs_done,
                             "epochs": t.config.get("epochs"), "n_seeds": len(t.seeds),
                             "experiments": ";".join(t.experiments)}
        for k in dict.fromkeys(["model", *TASK_KEYS, *keys]):
            v = t.config.get(k)
            r[k] = json.dumps(v) if isinstance(v, list) else v
        for stat in STAT_KEYS:
            s = trial_stat(t, stat)
            r[f"{stat}_mean"], r[f"{stat}_ci95"], r[f"{stat}_n"] = s.mean, s.ci95, len(s.values)
        r["oracle_tau_all"] = oracle_all_pairs_tau(t.setting("array_len"), t.setting("mask_rate"),
                                                   value_levels=t.setting("value_levels"))
        # All-pairs τ on one scale across tasks: the share of this task's ceiling it reaches.
        r["test_tau_all_share_of_ceiling"] = (r["test_tau_all_mean"] / r["oracle_tau_all"]
                                              if r["oracle_tau_all"] > 0 else math.nan)
        rr = routing_row(t)
        r["herfindahl"] = rr["herfindahl"] if rr else math.nan
        r["max_alpha"] = rr["max_alpha"] if rr else math.nan
        r["routing_healthy"] = rr["healthy"] if rr else None
        base = match_baseline(t, baselines) if t.is_poh else None
        r["baseline_trial_id"] = base.trial_id if base else None
        for stat in ("test_tau", "test_tau_all"):
            ab = ab_compare(t, base, stat) if base else None
            r[f"delta_{stat}"] = ab.delta if ab else math.nan
            r[f"rel_delta_{stat}"] = ab.rel if ab else math.nan
            r[f"p_{stat}"] = ab.p if ab else math.nan
            r[f"p_paired_{stat}"] = ab.p_paired if ab else math.nan
        rows.append(r)
    return pd.DataFrame(rows)
