"""Sweep files: schema, validation and the Ray Tune search space they describe.

    sweep = load_sweep("configs/sweeps/tiny_cpu.yaml", ["num_trials=8", "data.root=/data/cub"])

A sweep file names a base experiment config, the overrides every trial shares, a search space
over dotted config keys, the metric, scheduler, search algorithm, trial count and resources.
Everything is checked here, before Ray starts: an unknown key, an empty space, an unknown
scheduler or search algorithm, or a space key that the experiment config does not have raises
`SweepError` with one line naming the file, key and value. Each space key is also tried against
the base config with its extreme values, so `model.dropout: {high: 1.5}` fails here and not in
trial 7 an hour later.

Command-line overrides: `key=value` sets a sweep key when its first part is a sweep field
(`num_trials=8`, `scheduler.grace_period=200`), otherwise it is appended to `overrides` and
applies to the experiment config of every trial (`data.root=/data/cub`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from pipeline.config import Config, ConfigError, load_config, read_yaml


class SweepError(ValueError):
    """A sweep file, key or value that cannot be used; the message names it."""


# Each space entry: its type and the keys that type takes (all required).
SPACE_TYPES = {
    "loguniform": ("low", "high"),
    "uniform": ("low", "high"),
    "randint": ("low", "high"),      # integers in [low, high), as numpy and Ray draw them
    "choice": ("values",),
    "grid": ("values",),
}
# Scheduler name -> the keys it takes besides `name` (None = derived from the base config).
SCHEDULERS = {
    "asha": {"grace_period": None, "reduction_factor": 2, "max_t": None, "brackets": 1},
    "median": {"grace_period": None, "min_samples_required": 3},
    "none": {},
}
SEARCH_ALGS = {"random": {"seed": None}, "grid": {}, "optuna": {"seed": None}}


@dataclass
class Resources:
    workers: int = 1                 # ranks per trial; > 1 makes each trial a DDP job (Ray Train)
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0


@dataclass
class SweepConfig:
    base: Optional[str] = None       # experiment config the trials start from; null = schema defaults
    overrides: List[str] = field(default_factory=list)   # dotted overrides every trial shares
    space: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    metric: str = "top1"             # a key of the trainer's evaluation metrics
    mode: str = "max"                # max | min
    scheduler: Dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    search: Dict[str, Any] = field(default_factory=lambda: {"name": "random"})
    num_trials: int = 8              # Ray's num_samples: with grid entries, repeats of the whole grid
    resources: Resources = field(default_factory=Resources)
    max_concurrent: Optional[int] = None  # null = as many as the cluster's resources allow
    storage_path: str = "runs/sweeps"
    name: Optional[str] = None       # experiment folder under storage_path; null = sweep file stem
    max_failures: int = 1            # retries of a failed trial, each from its last checkpoint

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage_path) / str(self.name)

    def base_config(self, extra: Sequence[str] = ()) -> Config:
        """The validated experiment config of a trial: base <- shared overrides <- `extra`."""
        return load_config(self.base, [*self.overrides, *extra])

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(SweepConfig)}
_RESOURCE_FIELDS = {f.name for f in dataclasses.fields(Resources)}


def format_override(key: str, value: Any) -> str:
    """`key=value` that pipeline.config parses back to the same value (1e-07 stays a float)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    elif text.endswith("..."):
        text = text[:-3].strip()
    return f"{key}={text}"


def _fail(source: str, message: str) -> SweepError:
    return SweepError(f"{source}: {message}")


def _apply_cli_overrides(values: Dict[str, Any], overrides: Sequence[str], source: str) -> None:
    """Sweep keys go into `values`; anything else joins the shared experiment overrides."""
    for item in overrides:
        if "=" not in item:
            raise _fail(source, f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        head, *rest = key.strip().split(".")
        if head not in _FIELDS:
            values.setdefault("overrides", [])
            if not isinstance(values["overrides"], list):
                raise _fail(source, f"'overrides' must be a list of key=value strings, got {values['overrides']!r}")
            values["overrides"] = [*values["overrides"], item]
            continue
        value = yaml.safe_load(raw) if raw != "" else None
        node = values
        for part in [head, *rest][:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise _fail(source, f"override '{item}' sets a key inside the value of '{part}'")
        node[[head, *rest][-1]] = value


def _check_options(given: Dict[str, Any], allowed: Dict[str, Any], where: str, source: str) -> Dict[str, Any]:
    unknown = sorted(set(given) - set(allowed) - {"name"})
    if unknown:
        raise _fail(source, f"unknown key '{where}.{unknown[0]}' for {where}.name={given.get('name')!r}; "
                            f"valid keys: {', '.join(['name', *allowed]) }")
    return {**allowed, **{k: v for k, v in given.items() if k != "name"}}


def _check_space_entry(key: str, spec: Any, source: str) -> None:
    where = f"space.{key}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise _fail(source, f"'{where}' must be a mapping with a 'type' ({', '.join(SPACE_TYPES)}), got {spec!r}")
    kind = spec["type"]
    if kind not in SPACE_TYPES:
        raise _fail(source, f"{where}.type={kind!r} is not one of {', '.join(SPACE_TYPES)}")
    needed = SPACE_TYPES[kind]
    extra = sorted(set(spec) - set(needed) - {"type"})
    if extra:
        raise _fail(source, f"unknown key '{where}.{extra[0]}' for type {kind}; it takes {', '.join(needed)}")
    missing = [k for k in needed if k not in spec]
    if missing:
        raise _fail(source, f"'{where}' of type {kind} needs '{missing[0]}'")
    if "values" in needed:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise _fail(source, f"{where}.values must be a non-empty list, got {spec['values']!r}")
        return
    low, high = spec["low"], spec["high"]
    numeric = (int,) if kind == "randint" else (int, float)
    if not all(isinstance(v, numeric) and not isinstance(v, bool) for v in (low, high)):
        kind_word = "integers" if kind == "randint" else "numbers"
        raise _fail(source, f"{where}.low and .high must be {kind_word}, got low={low!r} high={high!r}")
    if not low < high:
        raise _fail(source, f"{where}: low={low} must be below high={high}")
    if kind == "loguniform" and low <= 0:
        raise _fail(source, f"{where}: loguniform needs low > 0, got low={low}")


def _probe_values(spec: Dict[str, Any]) -> List[Any]:
    """Values of a space entry that together reach its edges: try each against the config."""
    if "values" in spec:
        return list(spec["values"])
    if spec["type"] == "randint":
        return [spec["low"], spec["high"] - 1]
    return [float(spec["low"]), float(spec["high"])]


def _validate(sweep: SweepConfig, source: str) -> SweepConfig:
    if sweep.mode not in ("max", "min"):
        raise _fail(source, f"mode={sweep.mode!r} is not one of max, min")
    if not isinstance(sweep.metric, str) or not sweep.metric:
        raise _fail(source, f"metric={sweep.metric!r} must name an evaluation metric such as top1 or loss")
    if not isinstance(sweep.space, dict) or not sweep.space:
        raise _fail(source, "'space' is empty: name at least one config key to search, "
                            "e.g. space: {optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-1}}")
    if not isinstance(sweep.num_trials, int) or sweep.num_trials < 1:
        raise _fail(source, f"num_trials={sweep.num_trials!r} must be a positive integer")
    if sweep.max_concurrent is not None and (not isinstance(sweep.max_concurrent, int) or sweep.max_concurrent < 1):
        raise _fail(source, f"max_concurrent={sweep.max_concurrent!r} must be a positive integer or null")
    if not isinstance(sweep.max_failures, int) or sweep.max_failures < 0:
        raise _fail(source, f"max_failures={sweep.max_failures!r} must be a non-negative integer")
    r = sweep.resources
    if not isinstance(r.workers, int) or r.workers < 1:
        raise _fail(source, f"resources.workers={r.workers!r} must be a positive integer")
    if not r.cpus_per_worker > 0 or r.gpus_per_worker < 0:
        raise _fail(source, f"resources: cpus_per_worker={r.cpus_per_worker} must be > 0 and "
                            f"gpus_per_worker={r.gpus_per_worker} >= 0")

    for section, table in (("scheduler", SCHEDULERS), ("search", SEARCH_ALGS)):
        spec = getattr(sweep, section)
        if not isinstance(spec, dict) or "name" not in spec:
            raise _fail(source, f"'{section}' must be a mapping with a 'name' ({', '.join(table)}), got {spec!r}")
        if spec["name"] not in table:
            raise _fail(source, f"{section}.name={spec['name']!r} is not one of {', '.join(table)}")
        _check_options(spec, table[spec["name"]], section, source)
    for key in ("grace_period", "max_t", "reduction_factor", "min_samples_required"):
        value = sweep.scheduler.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise _fail(source, f"scheduler.{key}={value!r} must be a positive number")

    for key, spec in sweep.space.items():
        _check_space_entry(key, spec, source)
    kinds = {spec["type"] for spec in sweep.space.values()}
    if sweep.search["name"] == "grid" and kinds - {"grid", "choice"}:
        raise _fail(source, "search.name=grid needs every space entry to be of type grid or choice")
    if sweep.search["name"] == "optuna":
        if "grid" in kinds:
            raise _fail(source, "search.name=optuna cannot search a 'grid' entry; use type choice")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise _fail(source, "search.name=optuna needs the optuna package (pip install optuna)") from None

    try:
        sweep.base_config()
    except ConfigError as err:
        raise _fail(source, f"base config / overrides: {err}") from None
    for key, spec in sweep.space.items():
        if key in {o.split("=", 1)[0].strip() for o in sweep.overrides}:
            raise _fail(source, f"space key '{key}' is also fixed in 'overrides'; keep it in one place")
        for value in _probe_values(spec):
            try:
                sweep.base_config([format_override(key, value)])
            except ConfigError as err:
                message = str(err)
                if "unknown key" in message:
                    raise _fail(source, f"space key '{key}' is not a config key ({message})") from None
                raise _fail(source, f"space.{key}: value {value!r} is not valid for the config ({message})") from None
    return sweep


def _resolve_base(base: Optional[str], sweep_file: Path) -> Optional[str]:
    """A relative `base` is looked up from the working directory, then next to the sweep file."""
    if base is None:
        return None
    path = Path(str(base)).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    beside = sweep_file.parent / path
    return str(beside) if beside.exists() else str(path)


def sweep_from_dict(values: Dict[str, Any], source: str, sweep_file: Optional[Path] = None) -> SweepConfig:
    """A validated SweepConfig from a plain mapping (a parsed sweep file plus overrides)."""
    if not isinstance(values, dict):
        raise _fail(source, f"a sweep file must be a mapping of keys, got {type(values).__name__}")
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise _fail(source, f"unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(_FIELDS))}")
    values = dict(values)
    resources = values.pop("resources", None) or {}
    if not isinstance(resources, dict):
        raise _fail(source, f"'resources' must be a mapping, got {resources!r}")
    bad = sorted(set(resources) - _RESOURCE_FIELDS)
    if bad:
        raise _fail(source, f"unknown key 'resources.{bad[0]}'; valid keys: {', '.join(sorted(_RESOURCE_FIELDS))}")
    overrides = values.get("overrides") or []
    if isinstance(overrides, dict):  # {model.backbone: resnet10t} reads better in YAML for some
        overrides = [format_override(k, v) for k, v in overrides.items()]
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise _fail(source, f"'overrides' must be a list of key=value strings, got {overrides!r}")
    values["overrides"] = overrides
    for key, default in (("scheduler", "asha"), ("search", "random")):
        if isinstance(values.get(key), str):  # `scheduler: none` is short for {name: none}
            values[key] = {"name": values[key]}
        elif isinstance(values.get(key), dict) and "name" not in values[key]:
            values[key] = {"name": default, **values[key]}
    if values.get("space") is None:
        values["space"] = {}
    sweep = SweepConfig(**values, resources=Resources(**resources))
    if sweep_file is not None:
        sweep.base = _resolve_base(sweep.base, sweep_file)
        sweep.name = sweep.name or sweep_file.stem
    sweep.name = sweep.name or "sweep"
    if not isinstance(sweep.name, str) or "/" in sweep.name or sweep.name in (".", ".."):
        raise _fail(source, f"name={sweep.name!r} must be a plain folder name")
    sweep.storage_path = str(Path(str(sweep.storage_path)).expanduser().resolve())
    return _validate(sweep, source)


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Sweep file <- command-line overrides, validated (see the module docstring)."""
    path = Path(path)
    values = read_yaml(path, "sweep", SweepError)
    if not isinstance(values, dict):
        raise _fail(str(path), f"a sweep file must be a mapping of keys, got {type(values).__name__}")
    _apply_cli_overrides(values, overrides, str(path))
    return sweep_from_dict(values, str(path), sweep_file=path)


def scheduler_options(sweep: SweepConfig) -> Dict[str, Any]:
    """The scheduler's options with defaults filled from the base config (time unit: train step)."""
    spec = sweep.scheduler
    options = _check_options(spec, SCHEDULERS[spec["name"]], "scheduler", "sweep")
    train = sweep.base_config().train
    if "grace_period" in options and options["grace_period"] is None:
        options["grace_period"] = train.eval_every
    if "max_t" in options and options["max_t"] is None:
        # One step past the last evaluation: ASHA stops a trial that reaches max_t, and a trial that
        # trains to the end should finish on its own (final checkpoint and all).
        options["max_t"] = train.max_steps + 1
    return options


def num_grid_points(sweep: SweepConfig) -> int:
    grids = [len(s["values"]) for s in sweep.space.values()
             if s["type"] == "grid" or (sweep.search["name"] == "grid" and s["type"] == "choice")]
    return math.prod(grids) if grids else 1
