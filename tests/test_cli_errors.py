"""Bad input exits 2 with one line naming the key, the value and what is allowed, before Ray
starts, and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.cli_runs import (
    GRID,
    OPTUNA,
    WRAPPER,
    dump,
    free_port,
    with_value,
)

# (id, space file text or None, argv with {space} / {port} placeholders, what stderr must name)
BAD_INPUTS = [
    ("malformed_yaml", "name: t\nbase: {epochs: 3\n", ["grid", "{space}"],
     ["{space}", "malformed YAML", "line"]),
    ("not_a_mapping", "- just\n- a list\n", ["grid", "{space}"], ["{space}", "expected a mapping"]),
    ("unknown_base_key", dump(with_value(GRID, "base.epoch", 3)), ["grid", "{space}"],
     ["{space}", "unknown config key 'epoch'", "did you mean 'epochs'"]),
    ("unknown_top_key", dump({**GRID, "schedular": "fifo"}), ["grid", "{space}"],
     ["{space}", "'schedular'", "did you mean 'scheduler'", "allowed:"]),
    ("unknown_override_key", dump(GRID), ["grid", "{space}", "lr_encodr=0.01"],
     ["{space}", "'lr_encodr'", "did you mean 'lr_encoder'"]),
    ("wrong_type_int", dump(with_value(GRID, "base.epochs", "three")), ["grid", "{space}"],
     ["{space}", "epochs='three'", "expected an integer"]),
    ("wrong_type_bool", dump(GRID), ["grid", "{space}", "diagnostics=maybe"],
     ["{space}", "diagnostics='maybe'", "expected true or false"]),
    ("mask_rate_one", dump(GRID), ["grid", "{space}", "mask_rate=1.0"],
     ["{space}", "mask_rate=1.0", "in [0.0, 1.0)"]),
    ("mask_rate_negative", dump(with_value(GRID, "base.mask_rate", -0.1)), ["grid", "{space}"],
     ["{space}", "mask_rate=-0.1", "in [0.0, 1.0)"]),
    ("array_len_1", dump(GRID), ["grid", "{space}", "array_len=1"],
     ["{space}", "array_len=1", "in [2, 512]"]),
    ("hrm_period_0", dump(GRID), ["grid", "{space}", "hrm_period=0"],
     ["{space}", "hrm_period=0", ">= 1"]),
    ("max_inner_iters_0", dump(GRID), ["grid", "{space}", "max_inner_iters=0"],
     ["{space}", "max_inner_iters=0", ">= 1"]),
    ("n_heads_not_dividing", dump(GRID), ["grid", "{space}", "n_heads=3"],
     ["{space}", "n_heads=3", "must divide d_model=8"]),
    ("epochs_0", dump(GRID), ["grid", "{space}", "epochs=0"], ["{space}", "epochs=0", ">= 1"]),
    ("seeds_empty", dump(with_value(GRID, "base.seeds", [])), ["grid", "{space}"],
     ["{space}", "seeds=[]", "non-empty list of integers"]),
    ("seeds_duplicate", dump(GRID), ["grid", "{space}", "seeds=[1,2,1]"],
     ["{space}", "seeds=[1, 2, 1]", "distinct"]),
    ("loguniform_low_0", dump(with_value(OPTUNA, "search.entropy_reg.low", 0)),
     ["optuna", "{space}"], ["{space}", "search.entropy_reg.low=0", "must be > 0"]),
    ("loguniform_low_negative", dump(with_value(OPTUNA, "search.entropy_reg.low", -1e-3)),
     ["optuna", "{space}"], ["{space}", "search.entropy_reg.low=-0.001", "must be > 0"]),
    ("unknown_distribution", dump(with_value(OPTUNA, "search.entropy_reg.type", "gaussian")),
     ["optuna", "{space}"], ["{space}", "'gaussian'", "uniform, loguniform, int, choice"]),
    ("grid_value_wrong_type",
     dump(with_value(GRID, "experiments.lr.sweep", {"max_inner_iters": [1, "two"]})),
     ["grid", "{space}"], ["{space}", "experiments.lr.sweep.max_inner_iters",
                           "max_inner_iters='two'", "expected an integer"]),
    ("grid_value_out_of_range",
     dump(with_value(GRID, "experiments.lr.sweep", {"mask_rate": [0.5, 1.5]})),
     ["grid", "{space}"], ["{space}", "mask_rate=1.5", "in [0.0, 1.0)"]),
    ("unknown_scheduler_in_file", dump({**GRID, "scheduler": "hyperband"}), ["grid", "{space}"],
     ["{space}", "scheduler='hyperband'", "fifo, asha"]),
    ("unknown_loss", dump(GRID), ["grid", "{space}", "loss=rank_net"],
     ["{space}", "loss='rank_net'", "ranknet, listnet, soft_sort, combined, pointer_ce"]),
    ("unknown_metric_mode", dump({**GRID, "metric_mode": "maximize"}), ["grid", "{space}"],
     ["{space}", "metric_mode='maximize'", "max or min"]),
    ("temperature_min_above_init", dump(GRID), ["grid", "{space}", "temperature_min=3.0"],
     ["{space}", "temperature_min=3.0", "temperature_init=2.0"]),
    ("swept_key_overridden", dump(GRID), ["grid", "{space}", "lr_encoder=0.1"],
     ["{space}", "lr_encoder is swept"]),
    ("grid_without_experiments", dump(OPTUNA), ["grid", "{space}"],
     ["{space}", "needs an 'experiments' section"]),
    ("unknown_experiment", dump(GRID), ["grid", "{space}", "--experiment", "lrs"],
     ["{space}", "'lrs'", "did you mean 'lr'"]),
    ("missing_space_file", None, ["grid", "{tmp}/nowhere.yaml"],
     ["{tmp}/nowhere.yaml", "file not found"]),
    ("resume_nothing", None, ["grid", "--resume", "--name", "never_ran"],
     ["nothing to resume", "never_ran"]),
    ("resume_without_name", None, ["optuna", "--resume"], ["--resume needs --name"]),
    ("num_samples_0", dump(OPTUNA), ["optuna", "{space}", "--num-samples", "0"],
     ["--num-samples=0", ">= 1"]),
    ("keep_checkpoints_0", dump(GRID), ["grid", "{space}", "--keep-checkpoints", "0"],
     ["--keep-checkpoints=0", ">= 1"]),
    ("warm_start_not_a_grid", dump(OPTUNA), ["optuna", "{space}", "--warm-start", "{tmp}"],
     ["--warm-start {tmp}", "not a grid run directory"]),
    ("cpus_per_trial_0", dump(GRID), ["grid", "{space}", "--cpus-per-trial", "0"],
     ["--cpus-per-trial=0", "> 0"]),
    ("num_cpus_0", dump(GRID), ["grid", "{space}", "--num-cpus", "0"], ["--num-cpus=0", ">= 1"]),
    ("cpus_per_trial_above_embedded", dump(GRID),
     ["grid", "{space}", "--num-cpus", "2", "--cpus-per-trial", "3"],
     ["--cpus-per-trial=3.0", "has 2 CPUs", "<= 2"]),
    ("resume_damaged_record", None, ["grid", "--resume", "--name", "r"],
     ["{runs}/r/poh_experiment.yaml", "malformed YAML"]),
    ("resume_record_missing_keys", None, ["grid", "--resume", "--name", "r2"],
     ["{runs}/r2/poh_experiment.yaml", "not a poh_tune experiment record"]),
    ("resume_wrong_mode", None, ["grid", "--resume", "--name", "r3"],
     ["{runs}/r3", "is a optuna run, not grid"]),
    ("run_exists_without_resume", dump(GRID), ["grid", "{space}", "--name", "t"],
     ["{runs}/t holds a run already", "--resume --name t"]),
    ("unreachable_address", dump(GRID), ["grid", "{space}", "--address", "127.0.0.1:{port}"],
     ["127.0.0.1:{port}", "no Ray head answers at 127.0.0.1:{port}"]),
    ("address_not_host_port", dump(GRID), ["grid", "{space}", "--address", "headnode"],
     ["'headnode'", "expected HOST:PORT"]),
    ("ray_client_address", dump(GRID), ["grid", "{space}", "--address", "ray://127.0.0.1:{port}"],
     ["--address ray://127.0.0.1:{port}", "Ray Client (ray://) is not supported",
      "ray job submit"]),
    ("storage_uri_unknown_scheme", dump(GRID), ["grid", "{space}", "--storage", "nosuchfs://b/x"],
     ["--storage nosuchfs://b/x", "not a storage URI"]),
    ("dashboard_with_address", dump(GRID),
     ["grid", "{space}", "--dashboard", "--address", "127.0.0.1:{port}"],
     ["--dashboard", "--address keeps its own"]),
    # Issue 12.
    ("space_not_utf8", b"name: t\nbase: {epochs: 3}\n# caf\xe9\n", ["grid", "{space}"],
     ["{space}", "not UTF-8 text", "byte 0xe9", "expected a YAML file"]),
    ("space_unreadable", None, ["grid", "/proc/self/mem"],
     ["/proc/self/mem", "cannot be read", "Input/output error"]),
    ("space_permission_denied", dump(GRID), ["grid", "{space}"],
     ["{space}", "cannot be read", "Permission denied"]),
    ("space_is_a_directory", None, ["grid", "{runs}/spaces"],
     ["{runs}/spaces", "is a directory, expected a YAML file"]),
    ("storage_is_a_file", dump(GRID), ["grid", "{space}", "--storage", "{space}"],
     ["--storage {space}", "is a file", "expected a directory"]),
    ("storage_cannot_be_created", dump(GRID), ["grid", "{space}", "--storage", "/proc/x"],
     ["--storage /proc/x", "cannot create a directory in /proc", "No such file or directory"]),
    ("name_outside_storage", dump(GRID), ["grid", "{space}", "--name", "../../x"],
     ["--name '../../x'", "single folder name under --storage"]),
    ("name_outside_storage_on_resume", None, ["grid", "--resume", "--name", "../r"],
     ["--name '../r'", "single folder name under --storage"]),
    ("max_failures_negative", dump(GRID), ["grid", "{space}", "--max-failures", "-5"],
     ["--max-failures=-5", ">= 0"]),
    ("forgotten_equals_sign", None, ["grid", "--smoke", "epochs", "2"],
     ["'epochs'", "no such search-space file", "document_grid, optuna_refine", "epochs=2"]),
    ("unknown_bare_space_name", None, ["grid", "documnet_grid"],
     ["'documnet_grid'", "did you mean 'document_grid'", "key=value"]),
    ("train_out_is_a_file", dump(GRID), ["train", "--out", "{space}", "epochs=1"],
     ["--out {space}", "is a file", "expected a directory"]),
    ("train_config_binary", bytes(range(256)), ["train", "--config", "{space}"],
     ["{space}", "not UTF-8 text", "byte 0x80"]),
    ("report_given_results_csv", None, ["report", "{runs}/e/results.csv"],
     ["{runs}/e/results.csv", "is a file", "takes an experiment directory"]),
    ("report_given_a_trial_folder", None, ["report", "{runs}/e/train_trial_1"],
     ["{runs}/e/train_trial_1", "is a trial folder", "poh_trial.yaml", "{runs}/e"]),
]


# Files a case finds under --storage (an earlier run); they must be left byte for byte.
PRE_EXISTING = {
    "resume_damaged_record": {"r/tuner.pkl": "x", "r/poh_experiment.yaml": "mode: grid\n[1, 2\n"},
    "resume_record_missing_keys": {"r2/tuner.pkl": "x", "r2/poh_experiment.yaml": "mode: grid\n"},
    "resume_wrong_mode": {"r3/tuner.pkl": "x", "r3/poh_experiment.yaml": dump(
        {"mode": "optuna", "space_file": "o.yaml", "launch": {"overrides": {}, "smoke": False}})},
    "run_exists_without_resume": {"t/tuner.pkl": "x"},
    "space_is_a_directory": {"spaces/g.yaml": dump(GRID)},
    "report_given_results_csv": {"e/results.csv": "trial_id\n", "e/poh_experiment.yaml": "{}\n",
                                 "e/train_trial_1/poh_trial.yaml": "config: {}\n"},
    "report_given_a_trial_folder": {"e/results.csv": "trial_id\n",
                                    "e/poh_experiment.yaml": "{}\n",
                                    "e/train_trial_1/poh_trial.yaml": "config: {}\n"},
}


@pytest.mark.parametrize("case, space_text, argv, needles", BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_with_one_clear_line_and_writes_nothing(tmp_path, case, space_text,
                                                                  argv, needles):
    space = tmp_path / "space.yaml"
    if isinstance(space_text, bytes):
        space.write_bytes(space_text)
    elif space_text is not None:
        space.write_text(space_text)
    if case == "space_permission_denied":
        if os.geteuid() == 0:
            pytest.skip("root reads a file without read permission (space_unreadable covers "
                        "the read error)")
        space.chmod(0)
    storage = tmp_path / "runs"
    for rel, text in PRE_EXISTING.get(case, {}).items():
        (storage / rel).parent.mkdir(parents=True, exist_ok=True)
        (storage / rel).write_text(text)
    before = {f: f.read_bytes() for f in storage.rglob("*") if f.is_file()}
    subs = {"{space}": str(space), "{tmp}": str(tmp_path), "{port}": str(free_port()),
            "{runs}": str(storage)}

    def fill(s: str) -> str:
        for k, v in subs.items():
            s = s.replace(k, v)
        return s

    # --storage where the command takes it and the case does not choose its own.
    storage_args = ["--storage", str(storage)] if argv[0] in ("grid", "optuna") and (
        "--storage" not in argv) else []
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", WRAPPER, *map(fill, argv), *storage_args],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    elapsed = time.time() - t0
    err = p.stderr.strip()
    assert p.returncode == 2, (p.stdout, err)
    assert "Traceback" not in err + p.stdout
    assert len(err.splitlines()) == 1, err  # one message, nothing else
    assert err.startswith("error: ")
    for n in needles:
        assert fill(n) in err, (fill(n), err)
    assert "NO_RAY" in p.stdout, "Ray was imported before the input was validated"
    if case in PRE_EXISTING:  # the earlier run's files, unchanged, and nothing else
        assert {f: f.read_bytes() for f in storage.rglob("*") if f.is_file()} == before
    else:
        assert not storage.exists(), "something was written"
    expected = (["space.yaml"] if space_text else []) + (["runs"] if before else [])
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(expected)
    assert elapsed < 30


def test_bad_input_table_is_large_enough():
    assert len(BAD_INPUTS) >= 20

