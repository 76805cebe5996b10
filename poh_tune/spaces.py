"""Search spaces: one YAML schema and one loader for every file in search_spaces/."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poh_tune.config import ConfigError, TrialConfig, from_dict, pack_key, read_yaml, suggest

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"

TOP_KEYS = ("name", "description", "metric", "metric_mode", "scheduler", "asha", "resources",
            "max_concurrent", "num_samples", "seed", "base", "experiments", "search")
SCHEDULERS = ("fifo", "asha")
DIST_TYPES = ("uniform", "loguniform", "int", "choice")

# What a space file may leave out, and the value it then gets (its name: the file's stem).
FILE_DEFAULTS: dict[str, Any] = {
    "description": "",
    "metric": "tau",
    "metric_mode": "max",
    "scheduler": "fifo",
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "resources": {"cpu": 1, "gpu": 0},  # per trial
    "max_concurrent": 0,  # 0: as many trials at once as the resources allow
    "num_samples": 1,
    "seed": 0,
    "base": {},  # TrialConfig's defaults
}
# What an experiment may leave out: without a sweep it is the base configuration alone.
EXPERIMENT_DEFAULTS: dict[str, Any] = {"description": "", "sweep": None}

# --smoke: a tiny task with the same structure (SPEC: "a newcomer sees the whole flow in a minute").
SMOKE_BASE: dict[str, Any] = dict(
    array_len=8, train_samples=64, dev_samples=32, test_samples=32, epochs=3, batch_size=16,
    max_inner_iters=2, hrm_period=1, d_model=32, n_heads=4, d_ff=64, d_ctrl=16, seeds=[1, 2],
    controller_warmup_epochs=1, entropy_decay_every=1)
SMOKE_NUM_SAMPLES = 8
# Swept integer keys whose values are mapped onto 1, 2, 3, ... under --smoke (count preserved).
SMOKE_RANKED = ("max_inner_iters", "hrm_period")
# Swept task sizes, mapped by rank onto start, start + step, ... under --smoke: the smoke run
# keeps one configuration per value and stays tiny. Other swept task keys (mask_rate,
# value_levels) cost nothing and keep their values.
SMOKE_TASK_RANKED: dict[str, tuple[int, int]] = {"array_len": (6, 2), "train_samples": (32, 32)}


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    # (key, values) per swept key, in the file's order; the configurations are their cross
    # product (as Ray Tune's grid_search over several keys). (): the base config alone.
    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.sweep)

    @property
    def swept(self) -> str | None:
        """The one swept key (None: none, or several: see `keys`)."""
        return self.sweep[0][0] if len(self.sweep) == 1 else None

    def points(self) -> list[dict[str, Any]]:
        """The swept params of every configuration: the cross product, the first key slowest."""
        return [dict(zip(self.keys, combo, strict=True))
                for combo in itertools.product(*(v for _, v in self.sweep))]


@dataclass(frozen=True)
class Space:
    path: Path
    name: str
    description: str
    metric: str
    metric_mode: str
    scheduler: str  # default scheduler of the file (the CLI may override)
    grace_period: int
    reduction_factor: int
    cpu: float
    gpu: float
    max_concurrent: int  # 0: as many as the resources allow
    num_samples: int
    seed: int
    base: TrialConfig
    experiments: tuple[Experiment, ...] = ()
    search: dict[str, dict[str, Any]] = field(default_factory=dict)


def _err(path: Path, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {msg}")


def _number(path: Path, key: str, value: Any, *, integer: bool = False, low: float = 0,
            inclusive: bool = True) -> Any:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise _err(path, f"{key}={value!r}: expected {kind}")
    if value < low or (not inclusive and value == low):
        raise _err(path, f"{key}={value!r}: must be {'>=' if inclusive else '>'} {low}")
    return value


def _mapping(path: Path, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(path, f"{key}: expected a mapping, got {value!r}")
    for k in value:
        if k not in allowed:
            raise _err(path, f"{key}: unknown key {k!r}{suggest(str(k), list(allowed))}; "
                             f"allowed: {', '.join(allowed)}")
    return value


def _config(path: Path, where: str, d: dict[str, Any]) -> TrialConfig:
    try:
        return from_dict(d)
    except ConfigError as e:
        raise _err(path, f"{where}: {e}") from None


def _experiments(path: Path, raw: Any, base: TrialConfig) -> tuple[Experiment, ...]:
    if not isinstance(raw, dict) or not raw:
        raise _err(path, f"experiments: expected a non-empty mapping of name -> "
                         f"{{description, sweep}}, got {raw!r}")
    out = []
    for name, spec in raw.items():
        spec = {**EXPERIMENT_DEFAULTS,
                **_mapping(path, f"experiments.{name}", spec, tuple(EXPERIMENT_DEFAULTS))}
        sweep = _mapping(path, f"experiments.{name}.sweep", spec["sweep"],
                         tuple(TrialConfig.__dataclass_fields__))
        for key, values in sweep.items():
            if not isinstance(values, list) or not values:
                raise _err(path, f"experiments.{name}.sweep.{key}={values!r}: expected a "
                                 f"non-empty list of values")
            if len({canonical({"v": v}) for v in values}) != len(values):
                raise _err(path, f"experiments.{name}.sweep.{key}={values!r}: a value is listed "
                                 f"twice")
            for v in values:  # type-checked against TrialConfig, with the base config around it
                _config(path, f"experiments.{name}.sweep.{key}", {**base.to_dict(), key: v})
        exp = Experiment(str(name), str(spec["description"]),
                         tuple((str(k), tuple(v)) for k, v in sweep.items()))
        for point in exp.points():  # a combination can break a cross-key rule (n_heads | d_model)
            _config(path, f"experiments.{name}.sweep {point}", {**base.to_dict(), **point})
        out.append(exp)
    return tuple(out)


def _search(path: Path, raw: Any, base: TrialConfig) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not raw:
        raise _err(path, f"search: expected a non-empty mapping of config key -> distribution, "
                         f"got {raw!r}")
    out: dict[str, dict[str, Any]] = {}
    for key, spec in raw.items():
        if key not in TrialConfig.__dataclass_fields__:
            raise _err(path, f"search: unknown config key {key!r}"
                             f"{suggest(str(key), list(TrialConfig.__dataclass_fields__))}")
        spec = _mapping(path, f"search.{key}", spec, ("type", "low", "high", "values"))
        kind = spec.get("type")
        if kind not in DIST_TYPES:
            raise _err(path, f"search.{key}.type={kind!r}: expected one of {', '.join(DIST_TYPES)}")
        if kind == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise _err(path, f"search.{key}.values={values!r}: expected a non-empty list")
            for v in values:
                _config(path, f"search.{key}", {**base.to_dict(), key: v})
            out[key] = {"type": kind, "values": list(values)}
            continue
        lo = _number(path, f"search.{key}.low", spec.get("low"), integer=kind == "int", low=-1e300)
        hi = _number(path, f"search.{key}.high", spec.get("high"), integer=kind == "int",
                     low=-1e300)
        if kind == "loguniform" and lo <= 0:
            raise _err(path, f"search.{key}.low={lo!r}: a log-uniform bound must be > 0")
        if not lo < hi:
            raise _err(path, f"search.{key}: low={lo!r} must be < high={hi!r}")
        out[key] = {"type": kind, "low": lo, "high": hi}
    # Every corner of the box must be a valid config (e.g. temperature_min <= temperature_init).
    bounds = [[(k, s["low"]), (k, s["high"])] if "low" in s else [(k, v) for v in s["values"]]
              for k, s in out.items()]
    for corner in itertools.product(*bounds):
        _config(path, f"search corner {dict(corner)}", {**base.to_dict(), **dict(corner)})
    return out


def load_space(path: str | Path, overrides: dict[str, Any] | None = None,
               smoke: bool = False) -> Space:
    """Read and validate a search-space YAML file; errors name the file, key, value and what is allowed.

    Args:
        path: the YAML file.
        overrides: key=value changes to the base config (applied after --smoke).
        smoke: shrink the task to a tiny one, keeping the number of configurations.
    """
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise _err(path, "expected a mapping with keys " + ", ".join(TOP_KEYS))
    raw = {**FILE_DEFAULTS, "name": path.stem, **_mapping(path, "top level", raw, TOP_KEYS)}
    metric = raw["metric"]
    if not isinstance(metric, str) or not metric:
        raise _err(path, f"metric={metric!r}: expected a metric name such as 'tau'")
    metric_mode = raw["metric_mode"]
    if metric_mode not in ("max", "min"):
        raise _err(path, f"metric_mode={metric_mode!r}: expected max or min")
    scheduler = raw["scheduler"]
    if scheduler not in SCHEDULERS:
        raise _err(path, f"scheduler={scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
    asha = {**FILE_DEFAULTS["asha"], **_mapping(path, "asha", raw["asha"],
                                                 tuple(FILE_DEFAULTS["asha"]))}
    grace = _number(path, "asha.grace_period", asha["grace_period"], integer=True, low=1)
    rf = _number(path, "asha.reduction_factor", asha["reduction_factor"], integer=True, low=2)
    res = {**FILE_DEFAULTS["resources"], **_mapping(path, "resources", raw["resources"],
                                                     tuple(FILE_DEFAULTS["resources"]))}
    cpu = _number(path, "resources.cpu", res["cpu"], low=0, inclusive=False)
    gpu = _number(path, "resources.gpu", res["gpu"], low=0)
    max_conc = _number(path, "max_concurrent", raw["max_concurrent"], integer=True)
    num_samples = _number(path, "num_samples", raw["num_samples"], integer=True, low=1)
    seed = _number(path, "seed", raw["seed"], integer=True)
    base_raw = raw["base"] or {}
    if not isinstance(base_raw, dict):
        raise _err(path, f"base: expected a mapping of config keys, got {base_raw!r}")
    base = _config(path, "base", base_raw)

    experiments = _experiments(path, raw["experiments"], base) if "experiments" in raw else ()
    if smoke:
        base, experiments = _smoke(path, base, experiments)
        num_samples, grace = min(num_samples, SMOKE_NUM_SAMPLES), 1
    if overrides:
        swept = {k for e in experiments for k in e.keys} | set(raw.get("search") or {})
        clash = sorted(set(overrides) & swept)
        if clash:
            raise _err(path, f"{clash[0]} is swept by this space; it cannot be overridden")
        base = _config(path, "override", {**base.to_dict(), **overrides})
    search = _search(path, raw["search"], base) if "search" in raw else {}
    return Space(path.resolve(), str(raw["name"]), str(raw["description"]),
                 metric, metric_mode, scheduler, grace, rf, float(cpu), float(gpu), max_conc,
                 num_samples, seed, base, experiments, search)


def _smoke(path: Path, base: TrialConfig,
           experiments: tuple[Experiment, ...]) -> tuple[TrialConfig, tuple[Experiment, ...]]:
    """Shrink the task; map swept iteration counts / periods onto 1, 2, 3, ... and swept
    task sizes onto small distinct ones, by rank (so no two configurations merge)."""
    small = base.replace(**SMOKE_BASE)
    swept_values: dict[str, set[Any]] = {}
    for e in experiments:
        for k, values in e.sweep:
            if k in SMOKE_RANKED or k in SMOKE_TASK_RANKED:
                swept_values.setdefault(k, set()).update(values)
    ranks: dict[str, dict[Any, Any]] = {}
    for key in SMOKE_RANKED:
        vals = {getattr(base, key)} | swept_values.get(key, set())
        ranks[key] = {v: i + 1 for i, v in enumerate(sorted(vals))}
    if any(k in ranks for k in swept_values):
        small = small.replace(**{k: r[getattr(base, k)] for k, r in ranks.items()})
    for key, (start, step) in SMOKE_TASK_RANKED.items():
        if key in swept_values:  # only a swept one: an unswept key keeps SMOKE_BASE's value
            vals = sorted({getattr(base, key)} | swept_values[key])
            ranks[key] = {v: start + step * i for i, v in enumerate(vals)}
            small = small.replace(**{key: ranks[key][getattr(base, key)]})
    exps = []
    for e in experiments:
        sweep = tuple((k, tuple(ranks[k][v] for v in vals) if k in ranks else vals)
                      for k, vals in e.sweep)
        # The file's description quotes the full task's values; say what the smoke run sweeps.
        what = ("; ".join(f"{k} {', '.join(map(str, vals))}" for k, vals in sweep) if sweep
                else "the base configuration")
        exps.append(Experiment(e.name, f"smoke run: {what} on the tiny task (full grid: "
                                       f"{e.description or e.name})", sweep))
    _config(path, "smoke", small.to_dict())
    for e in exps:
        for point in e.points():
            _config(path, f"smoke: experiments.{e.name}.sweep {point}", {**small.to_dict(), **point})
    return small, tuple(exps)


def canonical(params: dict[str, Any]) -> str:
    """A stable key for a set of hyperparameters (equal configs, equal keys)."""
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)


def grid_variants(space: Space, names: list[str] | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """The deduplicated configurations of the chosen experiments.

    Returns:
        variants: one dict per distinct configuration, holding every swept key (base values
            filled in), in first-seen order.
        membership: canonical(variant) -> names of the experiments it counts for.
    """
    chosen = list(space.experiments)
    if names:
        known = [e.name for e in chosen]
        for n in names:
            if n not in known:
                raise ConfigError(f"{space.path}: unknown experiment {n!r}{suggest(n, known)}; "
                                  f"experiments: {', '.join(known)}")
        chosen = [e for e in chosen if e.name in names]
    swept = sorted({k for e in chosen for k in e.keys})
    base = space.base.to_dict()
    variants: list[dict[str, Any]] = []
    membership: dict[str, list[str]] = {}
    for e in chosen:
        for point in e.points() if e.sweep else [{}]:
            params = {**{k: base[k] for k in swept}, **point}
            key = canonical(params)
            if key not in membership:
                variants.append(params)
                membership[key] = []
            if e.name not in membership[key]:
                membership[key].append(e.name)
    return variants, membership


def pack_variants(base: TrialConfig, variants: list[dict[str, Any]], size: int
                  ) -> list[list[int]]:
    """Group a grid's configurations into packs that can train as one ensemble.

    Args:
        base: the base config the variants' params apply to.
        variants: the grid's swept params, one dict per configuration (grid_variants).
        size: the most configurations in one pack (1: every configuration alone).
    Returns:
        Packs of indices into `variants`: configurations with equal config.pack_key, in
        first-seen order, cut into chunks of at most `size`; packs ordered by their first member.
    """
    if size < 1:
        raise ValueError(f"pack size {size}: must be >= 1")
    groups: dict[tuple, list[list[int]]] = {}
    for i, params in enumerate(variants):
        chunks = groups.setdefault(pack_key(base.replace(**params)), [])
        if not chunks or len(chunks[-1]) >= size:
            chunks.append([])
        chunks[-1].append(i)
    return sorted((c for chunks in groups.values() for c in chunks), key=lambda c: c[0])


def plan_packs(base: TrialConfig, variants: list[dict[str, Any]], slots: int
               ) -> list[list[int]]:
    """--pack auto with GPUs: pack only as far as the cluster's GPU slots require.

    Start from the largest packs (every configuration that shares shapes together); while there
    are more slots than packs, split the largest pack in two (its first half keeps the lower
    indices), until every slot has a trial or every configuration is alone. A graphed step of
    55 members costs 3.9x one of 5 (GPU_NOTES), so the largest pack is the run's critical path:
    an idle GPU is better spent on half of it.

    Args:
        base, variants: as pack_variants.
        slots: trials the cluster runs at once (its GPUs / GPUs per trial); 0 or 1: pack fully.
    Returns:
        Packs of indices into `variants`, ordered by their first member.
    """
    packs = pack_variants(base, variants, max(1, len(variants)))
    while packs and len(packs) < slots:
        largest = max(packs, key=len)  # the first of the largest
        if len(largest) == 1:
            break
        i, half = packs.index(largest), (len(largest) + 1) // 2
        packs[i:i + 1] = [largest[:half], largest[half:]]
    return sorted(packs, key=lambda c: c[0])


def resolve_space_path(arg: str | None, default_name: str, next_arg: str | None = None) -> Path:
    """A path as given, or a bare name looked up in search_spaces/.

    Args:
        arg: the positional search-space argument (None: `default_name` in search_spaces/).
        default_name: the file used when no space is given.
        next_arg: the positional argument after it, quoted in the hint for a forgotten "="
            (`launch grid epochs 2`).
    """
    if arg is None:
        return SPACES_DIR / default_name
    p = Path(arg)
    if p.exists() or p.suffix or "/" in arg:
        return p  # a path: read_yaml says what is wrong with it
    if (SPACES_DIR / f"{arg}.yaml").exists():
        return SPACES_DIR / f"{arg}.yaml"
    names = sorted(f.stem for f in SPACES_DIR.glob("*.yaml"))
    value = next_arg if next_arg is not None and "=" not in next_arg else "VALUE"
    hint = (f"to change the config key write {arg}={value}" if arg in TrialConfig.__dataclass_fields__
            else "a config change is written key=value, e.g. epochs=20")
    raise ConfigError(f"{arg!r}: no such search-space file, and no search space of that name"
                      f"{suggest(arg, names)} (spaces: {', '.join(names)}); {hint}")
