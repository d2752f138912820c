"""Typed experiment configuration: dataclass schema -> YAML file -> dotted CLI overrides.

    cfg = load_config("configs/cub/st2_448.yaml", ["optim.lr=0.01", "model.num_streams=4"])

YAML files hold only what differs from the defaults below; overrides are applied last; every
key is checked against the schema (an unknown key names the valid keys of its section) and
`validate` rejects impossible combinations. `save_config` writes the resolved config that a run
directory keeps, and which `load_config` reads back as is.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type

import yaml
from omegaconf import OmegaConf

from data_prep.registry import Registry
from data_prep.transform_kinds import TRANSFORM_KINDS


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


@dataclass
class ModelConfig:
    name: str = "nxst_cnn"                 # a name from pipeline.models.list_models()
    backbone: str = "inception_v3"         # timm model for the streams (and the localisation trunk)
    loc_backbone: Optional[str] = None     # timm trunk of the localisation net; null = same as backbone
    num_streams: int = 2                   # N spatial transformers / streams; 0 = the bare backbone
    input_size: int = 448                  # side of the full-resolution input (224 or 448 in the paper)
    crop_size: int = 224                   # side of each transformer's output crop
    transform: str = "translation"         # a kind of data_prep.transform_kinds: affine | attention | translation | projective | tps
    transform_scale: float = 0.5           # fixed window scale of the `translation` kind (paper A.5: 0.5)
    num_classes: int = 200
    dropout: float = 0.7
    pretrained: Any = None                 # true (timm hub), a weights file path, or null (random init)
    extra: Dict[str, Any] = field(default_factory=dict)  # model-specific keyword arguments


@dataclass
class DataConfig:
    root: Optional[str] = None             # folder holding manifest.json and the shards
    train_split: str = "train"
    eval_split: str = "test"
    augment: str = "cub"                   # augmentation preset: cub | svhn | svhn_shift | svhn_crop | digits | none
                                           # (pipeline/data/augment.py; svhn: the whole crop, no augmentation)
    resize: Optional[int] = None           # shorter side before the random crop; null = derived (paper A.5: 512 for 448)
    shuffle_buffer: int = 1000             # samples held by the in-memory shuffle
    mean: Optional[List[float]] = None     # input normalisation; null = what the backbone's pretrained weights
    std: Optional[List[float]] = None      # expect (timm's pretrained cfg; inception_v3: 0.5 / 0.5), resolved
                                           # when the model is built (pipeline/models/normalisation.py)
    on_corrupt: str = "skip"               # skip (count and go on) | error
    channels: int = 3                      # 3: RGB; 1: grayscale (the digits models); others: npy shards (addition: 2)
    in_memory: bool = False                # decode the training split once and hold it (small data sets
                                           # without random per-sample augmentation: digits)
    distortion: Optional[str] = None       # R | RTS | P | E | TC: distort each training batch afresh (digits
                                           # shards written with data_prep digits --fresh-train); null: none


@dataclass
class OptimConfig:
    name: str = "sgd"                      # sgd (the paper's) | adamw
    lr: float = 0.1                        # base learning rate for the global batch
    momentum: float = 0.9
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-5
    decay_norm_and_bias: bool = False      # weight decay on norm weights and biases too
    lr_scale: Dict[str, float] = field(default_factory=dict)  # role -> multiplier of lr
    lr_start: Dict[str, int] = field(default_factory=dict)    # role -> first step it trains (lr 0 before)
    grad_clip: Optional[float] = None
    fused: bool = True                     # foreach/fused optimiser kernels where available


@dataclass
class ScheduleConfig:
    name: str = "step"                     # step | cosine | constant
    milestones: List[int] = field(default_factory=list)  # step: multiply by gamma at these steps
    step_every: Optional[int] = None       # step: ... or every this many steps
    gamma: float = 0.1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0              # cosine: final lr / base lr


@dataclass
class TrainConfig:
    global_batch_size: int = 256           # summed over ranks and accumulation steps
    micro_batch_size: Optional[int] = None # per-rank batch per forward; null = global / world size
    max_steps: int = 30000
    eval_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3              # periodic checkpoints kept besides last and best
    resume: Optional[str] = None           # null | auto | a checkpoint path
    seed: int = 0
    num_workers: int = 8
    precision: str = "bf16"                # bf16 | fp16 | fp32 (CPU runs use fp32 unless told)
    cpu_autocast: bool = False             # CPU: honour precision=bf16 (default: fp32 on CPU)
    channels_last: bool = True             # NHWC activations on CUDA (and on CPU with cpu_channels_last)
    cpu_channels_last: bool = False        # CPU: channels_last too (1.4-1.7x for the digits CNNs; measure per model)
    compile: bool = False
    compile_mode: Optional[str] = None     # torch.compile mode when compile=true; null = torch's default
    sync_bn: bool = False
    ddp_bucket_cap_mb: int = 25
    log_every: int = 20
    num_viz: int = 8                       # validation images drawn with their attention windows
    eval_max_samples: Optional[int] = None # cap for quick evaluations during training; null = whole split
    device: str = "auto"                   # auto | cpu | cuda
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])  # trackers: tensorboard | mlflow | wandb,
                                           # or none; comma-separated on the command line (docs/tracking.md)
    mlflow_uri: Optional[str] = None       # MLflow tracking URI; null = $MLFLOW_TRACKING_URI, else file:./mlruns
    experiment: Optional[str] = None       # MLflow experiment and W&B project; null = $MLFLOW_EXPERIMENT_NAME /
                                           # $WANDB_PROJECT, else stn-pipeline
    wandb_entity: Optional[str] = None     # W&B user or team; null = $WANDB_ENTITY, else your default entity


@dataclass
class RunConfig:
    dir: str = "runs/default"              # run directory: config, metrics, checkpoints, pictures
    name: Optional[str] = None
    overwrite: bool = False                # a run.dir holding a run: replace it (else refused unless resumed)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Sections whose values are free-form mappings: their keys are not checked against a schema.
_FREE_FORM = {("model", "extra"), ("optim", "lr_scale"), ("optim", "lr_start")}


def _check_keys(values: Any, schema: type, where: str, source: str) -> None:
    """Raise ConfigError for the first key of `values` that `schema` does not define."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{path}'; valid keys of "
                              f"'{where or 'top level'}': {', '.join(sorted(fields))}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub) and tuple(path.split(".")) not in _FREE_FORM:
            _check_keys(value, sub, path, source)


def _parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    nested: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key inside the value of '{part}'")
        node[parts[-1]] = value
    return nested


def _split_report_to(values: Dict[str, Any]) -> None:
    """train.report_to given as one string (`mlflow` or `tensorboard,mlflow`, as the command line
    gives it) -> the list the schema holds."""
    train = values.get("train")
    if isinstance(train, dict) and isinstance(train.get("report_to"), str):
        train["report_to"] = [name.strip() for name in train["report_to"].split(",") if name.strip()]


def _merge(base: Config, values: Dict[str, Any], source: str) -> Config:
    _check_keys(values, Config, "", source)
    _split_report_to(values)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.create(values))
        return OmegaConf.to_object(merged)
    except Exception as err:  # OmegaConf's type errors: reword them on one line
        msg = str(err).splitlines()[0]
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{source}: bad value for '{key}': {msg}" if key else f"{source}: {msg}") from None


def read_yaml(path: Path, kind: str, error: Type[Exception]) -> Any:
    """The contents of a YAML file (`{}` if empty); a missing file or bad YAML raises `error` naming it."""
    if not path.is_file():
        raise error(f"{kind} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, then validated."""
    cfg = Config()
    if path is not None:
        cfg = _merge(cfg, read_yaml(Path(path), "config", ConfigError), str(path))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: Sequence[str] = ()) -> Config:
    """`cfg` with dotted `key=value` overrides (values read as YAML), then validated."""
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), "override")
    return validate(cfg)


_CHOICES = {
    "model.transform": TRANSFORM_KINDS,  # read at validation: each registered kind of data_prep.transform_kinds
    "data.augment": ("cub", "svhn", "svhn_shift", "svhn_crop", "digits", "none"),
    "data.on_corrupt": ("skip", "error"),
    "optim.name": ("sgd", "adamw"),
    "schedule.name": ("step", "cosine", "constant"),
    "train.precision": ("bf16", "fp16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
}


DIGIT_DISTORTIONS = ("R", "RTS", "P", "E", "TC")  # data_prep.distortions (not imported: configs load torch-free)

# Experiment trackers of train.report_to (pipeline/train/tracking.py); `none`: metrics.jsonl only.
TRACKERS = ("tensorboard", "mlflow", "wandb")

# torch.compile's modes (null: its default, the quickest to compile).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Reject impossible values and combinations with a message naming the key."""
    for key, choices in _CHOICES.items():
        allowed = choices.names() if isinstance(choices, Registry) else choices
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    m, t = cfg.model, cfg.train
    positive = {"model.input_size": m.input_size, "model.crop_size": m.crop_size, "model.num_classes": m.num_classes,
                "train.global_batch_size": t.global_batch_size, "train.max_steps": t.max_steps,
                "train.eval_every": t.eval_every, "train.checkpoint_every": t.checkpoint_every,
                "optim.lr": cfg.optim.lr}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}={value} must be positive")
    if m.num_streams < 0:
        raise ConfigError(f"model.num_streams={m.num_streams} must be >= 0")
    # crop_size > input_size is refused by the models that take a crop (nxst_cnn); the others ignore it.
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if not 0.0 < m.transform_scale <= 1.0:
        raise ConfigError(f"model.transform_scale={m.transform_scale} must be in (0, 1]")
    if t.resume not in (None, "auto") and not str(t.resume).endswith(".pt"):
        raise ConfigError(f"train.resume={t.resume!r} must be null, 'auto' or a checkpoint path ending in .pt")
    if t.compile_mode is not None:
        if t.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"train.compile_mode={t.compile_mode!r} is not one of null, {', '.join(COMPILE_MODES)}")
        if not t.compile:
            raise ConfigError(f"train.compile_mode={t.compile_mode!r} needs train.compile=true")
    _check_report_to(t.report_to)
    if t.micro_batch_size is not None and t.micro_batch_size <= 0:
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} must be positive")
    for role, scale in cfg.optim.lr_scale.items():
        if not isinstance(scale, (int, float)) or scale < 0:
            raise ConfigError(f"optim.lr_scale.{role}={scale!r} must be a non-negative number")
    for role, start in cfg.optim.lr_start.items():
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ConfigError(f"optim.lr_start.{role}={start!r} must be a step number >= 0")
    if any(b <= a for a, b in zip(cfg.schedule.milestones, cfg.schedule.milestones[1:])):
        raise ConfigError(f"schedule.milestones={cfg.schedule.milestones} must be increasing")
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise ConfigError(f"data.mean={cfg.data.mean} and data.std={cfg.data.std}: set both, or leave both null "
                          "(the backbone's pretrained normalisation)")
    if cfg.data.mean is not None and len(cfg.data.mean) != len(cfg.data.std):
        raise ConfigError("data.mean and data.std must have the same length")
    if cfg.data.channels < 1 or (cfg.data.mean is not None and len(cfg.data.mean) != cfg.data.channels):
        raise ConfigError(f"data.channels={cfg.data.channels} must be positive, with as many data.mean and data.std "
                          f"values (got {len(cfg.data.mean or [])})")
    if cfg.data.std is not None and not all(v > 0 for v in cfg.data.std):
        raise ConfigError(f"data.std={cfg.data.std} must be positive")
    if cfg.data.in_memory and cfg.data.augment in ("cub", "svhn_shift", "svhn_crop"):
        raise ConfigError(f"data.in_memory=true holds decoded samples, which data.augment={cfg.data.augment} would "
                          "crop and flip afresh each epoch; use it with data.augment=none, digits or svhn")
    if cfg.data.distortion is not None and cfg.data.distortion not in DIGIT_DISTORTIONS:
        raise ConfigError(f"data.distortion={cfg.data.distortion!r} is not one of null, {', '.join(DIGIT_DISTORTIONS)}")
    if world_size is not None:
        per_rank_batch(cfg, world_size)
    return cfg


def _check_report_to(report_to: List[str]) -> None:
    for name in report_to:
        if name not in (*TRACKERS, "none"):
            raise ConfigError(f"train.report_to: {name!r} is not one of {', '.join(TRACKERS)}, none "
                              "(a list, or comma-separated: train.report_to=tensorboard,mlflow)")
    if "none" in report_to and len(report_to) > 1:
        raise ConfigError(f"train.report_to={','.join(report_to)}: 'none' cannot be combined with a tracker")


def per_rank_batch(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) for a global batch on `world_size` ranks."""
    gb = cfg.train.global_batch_size
    if gb % world_size:
        raise ConfigError(f"train.global_batch_size={gb} is not divisible by the world size {world_size}")
    per_rank = gb // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.global_batch_size={gb} / world size {world_size} = {per_rank} per rank "
                          f"is not a multiple of train.micro_batch_size={micro}")
    return micro, per_rank // micro


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (a run directory's config.yaml)."""
    from data_prep.contract import write_text_atomic  # here: loading a config needs none of data_prep

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False), durable=False)


def from_dict(values: Dict[str, Any], source: str = "dict") -> Config:
    """A validated Config from a plain mapping (e.g. a checkpoint's saved config)."""
    return validate(_merge(Config(), values, source))
