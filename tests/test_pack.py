"""Packing grid configurations into one trial: grouping, refusals, and equal results."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from poh_tune.config import pack_key
from poh_tune.spaces import (
    SPACES_DIR,
    grid_variants,
    load_space,
    pack_variants,
    plan_packs,
)
from tests.cli_runs import TINY_BASE, WRAPPER, kill_session


def test_packs_hold_only_equal_shapes_at_most_n_in_first_seen_order(tiny_cfg):
    base = tiny_cfg
    # shapes: max_inner_iters differs (not shareable); entropy_reg / lr_encoder / hrm_period
    # are per-member values, so those configurations can share a pack.
    variants = [{"max_inner_iters": 4, "entropy_reg": 1e-3},   # 0: shape A
                {"max_inner_iters": 2, "entropy_reg": 1e-3},   # 1: shape B
                {"max_inner_iters": 4, "entropy_reg": 2e-3},   # 2: A
                {"max_inner_iters": 4, "lr_encoder": 1e-3},    # 3: A
                {"max_inner_iters": 2, "hrm_period": 1},       # 4: B
                {"max_inner_iters": 4, "hrm_period": 1},       # 5: A
                {"max_inner_iters": 3}]                        # 6: shape C
    assert pack_variants(base, variants, 1) == [[0], [1], [2], [3], [4], [5], [6]]
    assert pack_variants(base, variants, 2) == [[0, 2], [1, 4], [3, 5], [6]]
    assert pack_variants(base, variants, 3) == [[0, 2, 3], [1, 4], [5], [6]]
    assert pack_variants(base, variants, 100) == [[0, 2, 3, 5], [1, 4], [6]]
    with pytest.raises(ValueError):
        pack_variants(base, variants, 0)


def test_document_grid_packs():
    space = load_space(SPACES_DIR / "document_grid.yaml", smoke=True)
    variants, _ = grid_variants(space)
    assert len(variants) == 11
    packs = pack_variants(space.base, variants, 11)
    assert sorted(i for p in packs for i in p) == list(range(11))  # each configuration once
    # baseline; the 12-iteration PoH with its hrm_period / entropy / temperature variants;
    # 6, 8 and 16 iterations each alone (another shape).
    shapes = [{(variants[i]["model"], variants[i]["max_inner_iters"]) for i in p} for p in packs]
    assert [len(p) for p in packs] == [1, 7, 1, 1, 1]
    assert all(len(s) == 1 for s in shapes)
    assert len({next(iter(s)) for s in shapes}) == 5
    assert [len(p) for p in pack_variants(space.base, variants, 3)] == [1, 3, 1, 1, 1, 3, 1]


@pytest.mark.parametrize("slots", [0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 16, 100])
def test_pack_plan_fills_the_gpu_slots_by_splitting_the_largest_pack(slots):
    space = load_space(SPACES_DIR / "document_grid.yaml", smoke=True)
    variants, _ = grid_variants(space)
    full = pack_variants(space.base, variants, len(variants))
    plan = plan_packs(space.base, variants, slots)
    # Every configuration exactly once, each pack within one shape.
    assert sorted(i for p in plan for i in p) == list(range(len(variants)))
    assert all(len({pack_key(space.base.replace(**variants[i])) for i in p}) == 1 for p in plan)
    # Packed fully when the slots are fewer than the full packs; else one trial per slot, until
    # every configuration is alone.
    assert len(plan) == max(len(full), min(slots, len(variants)))
    # Only the pack of 7 is ever split: the configurations alone in `full` stay alone, and the
    # parts of the 7 differ in size by at most one part-halving (largest first).
    big = max(full, key=len)
    parts = [p for p in plan if set(p) <= set(big)]
    assert [p for p in plan if p not in parts] == [p for p in full if p is not big]
    assert max(map(len, parts)) <= 2 * min(map(len, parts))
    assert plan == sorted(plan, key=lambda p: p[0])


def test_pack_plan_of_one_slot_and_of_many_shapes():
    space = load_space(SPACES_DIR / "document_grid.yaml", smoke=True)
    variants, _ = grid_variants(space)
    assert plan_packs(space.base, variants, 1) == pack_variants(space.base, variants, 11)
    assert plan_packs(space.base, variants, 8) != plan_packs(space.base, variants, 7)
    assert plan_packs(space.base, variants, 64) == [[i] for i in range(11)]
    assert plan_packs(space.base, [], 4) == []


TINY_GRID = {"name": "t", "base": TINY_BASE,
             "experiments": {"lr": {"sweep": {"lr_encoder": [0.001, 0.002]}}}}
TINY_OPTUNA = {"name": "o", "base": TINY_BASE, "num_samples": 2,
               "search": {"entropy_reg": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}


@pytest.mark.parametrize("argv, needles", [
    (["grid", "{grid}", "--scheduler", "asha", "--pack", "4"],
     ["--pack 4", "--scheduler asha", "per configuration", "--pack off"]),
    (["optuna", "{optuna}", "--pack", "2"], ["--pack 2", "launch optuna", "per configuration"]),
    (["grid", "{grid}", "--pack", "0"], ["--pack='0'", "auto, off or an integer >= 1"]),
    (["grid", "{grid}", "--pack", "many"], ["--pack='many'", "auto, off or an integer >= 1"]),
], ids=["asha", "optuna", "zero", "word"])
def test_pack_refused_exits_2_one_line_before_ray(tmp_path, argv, needles):
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(TINY_GRID))
    (tmp_path / "o.yaml").write_text(yaml.safe_dump(TINY_OPTUNA))
    subs = {"{grid}": str(tmp_path / "g.yaml"), "{optuna}": str(tmp_path / "o.yaml")}
    argv = [subs.get(a, a) for a in argv]
    storage = tmp_path / "runs"
    p = subprocess.run([sys.executable, "-c", WRAPPER, *argv, "--storage", str(storage)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    err = p.stderr.strip()
    assert p.returncode == 2, (p.stdout, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)
    assert "NO_RAY" in p.stdout
    assert not storage.exists()


def test_pack_off_and_auto_are_fine_with_asha_and_optuna(tmp_path):
    from poh_tune.cli import build_parser, resolve

    (tmp_path / "g.yaml").write_text(yaml.safe_dump(TINY_GRID))
    (tmp_path / "o.yaml").write_text(yaml.safe_dump(TINY_OPTUNA))
    for argv in (["grid", str(tmp_path / "g.yaml"), "--scheduler", "asha", "--pack", "auto",
                  "--gpus-per-trial", "1"],
                 ["grid", str(tmp_path / "g.yaml"), "--scheduler", "asha", "--pack", "1"],
                 ["optuna", str(tmp_path / "o.yaml"), "--pack", "off"],
                 ["optuna", str(tmp_path / "o.yaml"), "--gpus-per-trial", "1"]):
        args = build_parser().parse_args([*argv, "--storage", str(tmp_path / "runs")])
        assert resolve(args)[2]["pack"] == 1, argv
    args = build_parser().parse_args(["grid", str(tmp_path / "g.yaml"), "--gpus-per-trial",
                                      "0.5", "--storage", str(tmp_path / "runs")])
    assert resolve(args)[2]["pack"] == 2  # auto with GPUs: every configuration that shares shapes
    args = build_parser().parse_args(["grid", str(tmp_path / "g.yaml"), "--storage",
                                      str(tmp_path / "runs")])
    from poh_tune.cli import CPU_DEFAULT_PACK

    assert resolve(args)[2]["pack"] == CPU_DEFAULT_PACK


def _launch(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poh_tune.launch", *args], capture_output=True,
                          text=True, timeout=timeout)


def _by_config(exp: Path) -> dict[str, dict]:
    """canonical config -> its results.csv row, poh_trial.yaml and metrics.jsonl rows."""
    with open(exp / "results.csv") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        spec = yaml.safe_load(open(Path(r["trial_dir"]) / "poh_trial.yaml"))
        metrics = [json.loads(x) for x in open(Path(r["trial_dir"]) / "metrics.jsonl")]
        key = json.dumps(spec["config"], sort_keys=True)
        assert key not in out, "two rows with the same configuration"
        out[key] = {"row": r, "spec": spec, "metrics": metrics}
    return out


def _close(a, b, tol: float = 2e-4) -> bool:
    """Equal within tol: numbers, and lists and records (per iteration, per seed) of them."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)):
        return a == b
    if not isinstance(b, (int, float)):
        return False
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol


def _num(s: str):
    try:
        return float(s)
    except ValueError:
        return s


@pytest.fixture(scope="module")
def unpacked_run(tmp_path_factory) -> Path:
    """The smoke grid, every configuration its own trial."""
    storage = tmp_path_factory.mktemp("unpacked")
    p = _launch("grid", "--smoke", "--pack", "off", "--storage", str(storage), "--name", "poff",
                "--num-cpus", "2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return storage / "poff"


def _same_metrics(a: dict, b: dict) -> None:
    """Two runs of one configuration: the same epochs, each logged once, with the same values."""
    assert [m["epoch"] for m in a["metrics"]] == [m["epoch"] for m in b["metrics"]] == [1, 2, 3]
    for ma, mb in zip(a["metrics"], b["metrics"], strict=True):
        assert set(ma) == set(mb)
        for k in ma:
            if k not in ("epoch_s", "trial_id"):
                assert _close(ma[k], mb[k]), (k, ma[k], mb[k])
        assert mb["trial_id"] == b["row"]["trial_id"]


@pytest.mark.slow
def test_packed_grid_gives_every_configuration_the_same_results_and_files(tmp_path,
                                                                          unpacked_run):
    p = _launch("grid", "--smoke", "--pack", "11", "--storage", str(tmp_path), "--name", "p11",
                "--num-cpus", "2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    check_same_results_and_files(tmp_path / "p11", unpacked_run)


def check_same_results_and_files(packed_exp: Path, unpacked_exp: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {"11": _by_config(packed_exp), "off": _by_config(unpacked_exp)}
    exps = {"11": packed_exp, "off": unpacked_exp}
    packed, alone = runs["11"], runs["off"]
    assert len(alone) == 11 and set(packed) == set(alone)
    ids = {r["row"]["trial_id"] for r in packed.values()}
    assert len(ids) == 11
    # 5 Tune trials: one pack of 7 (its rows name it in pack_id), four configurations alone
    # (ordinary trials: no pack_id)
    assert len({r["row"]["pack_id"] or r["row"]["trial_id"] for r in packed.values()}) == 5
    assert sorted(Counter(r["row"]["pack_id"] for r in packed.values()).values()) == [4, 7]
    assert not any(r["row"]["pack_id"] for r in alone.values())
    for key, a in alone.items():
        b = packed[key]
        assert b["spec"]["experiments"] == a["spec"]["experiments"]
        assert b["spec"]["trial_id"] == b["row"]["trial_id"]
        assert a["row"]["status"] == b["row"]["status"] == "TERMINATED"
        for col, v in a["row"].items():
            if col.startswith(("final_", "best_", "test_", "config.")) or col in (
                    "experiments", "epochs_done", "stopped_early"):
                assert _close(_num(v), _num(b["row"][col])), (col, v, b["row"][col])
        _same_metrics(a, b)
        for run in (a, b):  # its own TensorBoard run with HParams
            ea = EventAccumulator(str(Path(run["row"]["trial_dir"]) / "tb"),
                                  purge_orphaned_data=False)
            ea.Reload()
            assert [e.step for e in ea.Scalars("tau/dev")] == [1, 2, 3]
            hp = ea.PluginTagToContent("hparams")
            assert "_hparams_/session_start_info" in hp and "_hparams_/session_end_info" in hp
        tb_a = EventAccumulator(str(Path(a["row"]["trial_dir"]) / "tb"))
        tb_b = EventAccumulator(str(Path(b["row"]["trial_dir"]) / "tb"))
        tb_a.Reload()
        tb_b.Reload()
        assert set(tb_a.Tags()["scalars"]) == set(tb_b.Tags()["scalars"])
    for mode, exp in exps.items():  # the report lists every configuration, with its own id
        with open(exp / "summary.csv") as f:
            listed = {r["trial_id"] for r in csv.DictReader(f)}
        with open(exp / "results.csv") as f:
            assert listed == {r["trial_id"] for r in csv.DictReader(f)}
        text = (exp / "report.md").read_text()
        assert all(t in text for t in listed)
        best = yaml.safe_load((exp / "best_config.yaml").read_text())
        assert json.dumps(best, sort_keys=True) in runs[mode]


@pytest.mark.slow
def test_a_crashed_pack_resumes_and_a_diverged_member_errors_alone(tmp_path):
    # One pack of 3 learning rates (1e6 makes the loss NaN at epoch 2). Its process dies after
    # epoch 1, before any checkpoint (every 2 epochs): the retry replays epoch 1, which each
    # configuration logs once; the diverged configuration ends ERROR, the others train on.
    space = tmp_path / "lr.yaml"
    space.write_text(yaml.safe_dump({**TINY_GRID, "base": {**TINY_BASE, "epochs": 3},
                                     "experiments": {"lr": {"sweep": {
                                         "lr_encoder": [0.001, 0.002, 1e6]}}}}))
    runs = {}
    for name, pack, env in (("packed", "3", {"POH_TUNE_CRASH_AFTER_EPOCH": "1"}),
                            ("alone", "off", {})):
        p = subprocess.run([sys.executable, "-m", "poh_tune.launch", "grid", str(space),
                            "--pack", pack, "--checkpoint-every", "2", "--storage",
                            str(tmp_path), "--name", name, "--num-cpus", "2", "--no-report"],
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, **env})
        assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]  # 1: a trial errored
        runs[name] = {float(r["row"]["config.lr_encoder"]): r
                      for r in _by_config(tmp_path / name).values()}
    packed, alone = runs["packed"], runs["alone"]
    assert list((tmp_path / "packed").glob("*/.crashed")), "the fault was not injected"
    assert len({r["row"]["pack_id"] for r in packed.values()}) == 1
    bad = packed[1e6]["row"]
    assert bad["status"] == "ERROR" and bad["error"] == alone[1e6]["row"]["error"]
    assert "seed 1, epoch 2: training loss is nan" in bad["error"]
    assert [m["epoch"] for m in packed[1e6]["metrics"]] == [1]
    for lr in (0.001, 0.002):
        assert packed[lr]["row"]["status"] == "TERMINATED" and packed[lr]["row"]["error"] == ""
        _same_metrics(alone[lr], packed[lr])


def test_lost_pack_folders_are_retired(tmp_path):
    from poh_tune.io import LOST_TRIAL_FILE, TRIAL_FILE
    from poh_tune.results import retire_lost_trials

    for folder in ("kept/c0", "kept/c1", "lost/c0", "lost/c1"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / TRIAL_FILE).write_text("config: {}\n")
    rows = [{"trial_dir": str(tmp_path / "kept" / c)} for c in ("c0", "c1")]
    assert retire_lost_trials(tmp_path, rows) == 2
    assert all((tmp_path / "kept" / c / TRIAL_FILE).exists() for c in ("c0", "c1"))
    assert all((tmp_path / "lost" / c / LOST_TRIAL_FILE).exists() for c in ("c0", "c1"))


@pytest.mark.slow
def test_driver_killed_then_resumed_with_packs(tmp_path):
    """SIGKILL the driver while the second of two packs trains; --resume completes both, every
    configuration's epochs logged once, with the results of an unpacked run."""
    import time

    space = tmp_path / "lr.yaml"
    lrs = [0.001, 0.002, 0.003, 0.004]
    space.write_text(yaml.safe_dump({**TINY_GRID, "base": {**TINY_BASE, "epochs": 8},
                                     "experiments": {"lr": {"sweep": {"lr_encoder": lrs}}}}))
    common = ["--storage", str(tmp_path), "--num-cpus", "2", "--no-report"]
    proc = subprocess.Popen([sys.executable, "-m", "poh_tune.launch", "grid", str(space),
                             "--pack", "2", "--max-concurrent", "1", "--name", "r", *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    exp = tmp_path / "r"
    finished: dict[Path, bytes] = {}
    started = False
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            files = {f: f.read_bytes() for f in exp.glob("train_pack_*/c*/metrics.jsonl")}
            finished = {f: d for f, d in files.items() if d.count(b"\n") == 8}
            started = any(0 < d.count(b"\n") < 8 for d in files.values())
            if len(finished) >= 2 and started:
                break
            time.sleep(0.05)
    finally:
        kill_session(proc)  # the driver and the Ray processes it started
    assert len(finished) >= 2, "the run ended before it could be killed"
    assert not (exp / "results.csv").exists()
    p = _launch("grid", "--resume", "--name", "r", *common)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = _launch("grid", str(space), "--pack", "off", "--name", "alone", *common)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    resumed, alone = _by_config(exp), _by_config(tmp_path / "alone")
    assert set(resumed) == set(alone) and len(resumed) == 4
    assert len({r["row"]["pack_id"] for r in resumed.values()}) == 2
    for key, b in resumed.items():
        assert b["row"]["status"] == "TERMINATED"
        assert [m["epoch"] for m in b["metrics"]] == list(range(1, 9))
        for ma, mb in zip(alone[key]["metrics"], b["metrics"], strict=True):
            for k in ma:
                if k not in ("epoch_s", "trial_id"):
                    assert _close(ma[k], mb[k]), (k, ma[k], mb[k])
    for f, data in finished.items():  # the finished pack was not rerun
        assert f.read_bytes() == data


# A cross-product sweep (model x lr_encoder) and a task sweep sharing its base point:
# 4 + 2 listed, 5 configurations; packs: baseline x 2 lr, pot x 2 lr (L=4), pot L=6 alone.
CROSS_GRID = {"name": "x", "base": {**TINY_BASE, "epochs": 3, "seeds": [1, 2],
                                    "lr_encoder": 0.001},
              "experiments": {
                  "model_lr": {"sweep": {"model": ["baseline", "pot"],
                                         "lr_encoder": [0.001, 0.002]}},
                  "length": {"sweep": {"array_len": [4, 6]}}}}


@pytest.mark.slow
def test_cross_product_grid_packed_and_alone_give_the_same_results_and_files(tmp_path):
    space = tmp_path / "x.yaml"
    space.write_text(yaml.safe_dump(CROSS_GRID, sort_keys=False))  # the file's order is kept
    for name, pack in (("packed", "5"), ("alone", "off")):
        p = _launch("grid", str(space), "--pack", pack, "--storage", str(tmp_path), "--name",
                    name, "--num-cpus", "2")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    packed, alone = _by_config(tmp_path / "packed"), _by_config(tmp_path / "alone")
    assert set(packed) == set(alone) and len(packed) == 5
    combos = {(json.loads(k)["model"], json.loads(k)["lr_encoder"], json.loads(k)["array_len"])
              for k in packed}
    assert combos == {("baseline", 0.001, 4), ("baseline", 0.002, 4), ("pot", 0.001, 4),
                      ("pot", 0.002, 4), ("pot", 0.001, 6)}
    assert sorted(Counter(r["row"]["pack_id"] for r in packed.values()).values()) == [1, 2, 2]
    for key, a in alone.items():
        b = packed[key]
        cfg = json.loads(key)
        shared = (cfg["model"], cfg["lr_encoder"], cfg["array_len"]) == ("pot", 0.001, 4)
        assert a["spec"]["experiments"] == b["spec"]["experiments"] == (
            ["model_lr", "length"] if shared else
            ["length"] if cfg["array_len"] == 6 else ["model_lr"])
        assert a["row"]["status"] == b["row"]["status"] == "TERMINATED"
        _same_metrics(a, b)
    for name in ("packed", "alone"):
        exp = tmp_path / name
        info = yaml.safe_load((exp / "poh_experiment.yaml").read_text())
        assert info["experiments"]["model_lr"]["swept"] == ["model", "lr_encoder"]
        assert info["experiments"]["length"]["swept"] == "array_len"
        text = (exp / "report.md").read_text()
        assert "| model | lr_encoder | configuration |" in text
        assert "| array_len | configuration |" in text
        assert "## Regimes" in text  # array_len is a task factor with a baseline at L=4 only
        with open(exp / "summary.csv") as f:
            assert len(list(csv.DictReader(f))) == 5
