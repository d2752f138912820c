"""Paper Table 1: FCN, CNN, ST-FCN and ST-CNN (affine / projective / TPS) on distorted digits.

    python -m pipeline.experiments distorted --idx-root tests/data/mnist --train-count 8000 --profile standard

Every run is an ordinary training run of the project's Trainer (`pipeline.train.run`) with a config
of configs/digits/ and the profile's overrides: the same loop, checkpoints, NaN stop, metrics.jsonl,
TensorBoard scalars and attention pictures as any other experiment, in OUT/runs/<D>/<model>-seed<S>-<id>/.
For each distortion (R, RTS, P, E, TC) the shards come from `data_prep digits --fresh-train`
(cached in OUT/data): a fixed distortion of every test digit, and the undistorted training digits,
which the trainer distorts afresh in every batch (data.distortion).

Profiles (`--profile`):
  quick     every code path in about a minute a run: 40 steps, the tests' profile.
  standard  Adam 1e-3, batch 128, 1,000 steps (lr /10 at 2/3 and 5/6), models of ~130k parameters
            (the plain reference's CNN: 9x9x32 - 7x7x64): the budget at which every ST model has left
            its identity on 2 CPU cores (docs/experiments.md).
  paper     the paper's schedule and sizes: SGD 0.01, batch 256, 150,000 steps, lr /10 every 50,000,
            every model ~400k parameters.

OUT/results.jsonl gets one line per finished run (a rerun skips the runs it holds with the same
settings, and an interrupted run resumes from its own last checkpoint), OUT/table.md the test error
in % (mean ± std over seeds) in Table 1's layout with what each transformer learnt, OUT/results.json
the same numbers for programs, and OUT/distorted_<D>.png the paper's Table 1 (right): test digits
the CNN gets wrong and the ST-CNN right, with the sampling grid on the input and the transformer's
output.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from data_prep.distortions import DISTORTIONS, OUTPUT_SIZE

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "digits"


class ExperimentError(RuntimeError):
    """An experiment that cannot go on (bad option, inconsistent data); the message names it."""


# Table 1's rows: key -> (row label, transform label, config under configs/digits, transform)
ROWS: Dict[str, Tuple[str, str, str, Optional[str]]] = {
    "fcn": ("FCN", "", "fcn", None),
    "cnn": ("CNN", "", "cnn", None),
    "st-fcn-aff": ("ST-FCN", "Aff", "st_fcn", "affine"),
    "st-fcn-proj": ("ST-FCN", "Proj", "st_fcn", "projective"),
    "st-fcn-tps": ("ST-FCN", "TPS", "st_fcn", "tps"),
    "st-cnn-aff": ("ST-CNN", "Aff", "st_cnn", "affine"),
    "st-cnn-proj": ("ST-CNN", "Proj", "st_cnn", "projective"),
    "st-cnn-tps": ("ST-CNN", "TPS", "st_cnn", "tps"),
}
MODEL_KEYS = tuple(ROWS)  # Table 1's rows
# Variants for finding out why a result differs from the paper's; rows below Table 1's when asked.
VARIANTS: Dict[str, Tuple[str, str, str, Optional[str]]] = {
    "st-cnn-aff-nopool": ("ST-CNN, no pooling after ST", "Aff", "st_cnn", "affine"),
    "st-fcn-aff-nopool": ("ST-FCN, no pooling after ST", "Aff", "st_fcn", "affine"),
}
ROWS.update(VARIANTS)
POOLED = ("RTS", "TC")  # paper A.3: average pooling after the transformer on these
# The paper's headline comparison (ST-CNN vs CNN) is on RTS and TC: train those first, so that a
# run cut short still answers it. The table keeps the paper's column order.
TRAIN_ORDER = ("RTS", "TC", "R", "P", "E")
STATS_IMAGES = 500  # test images for the transformer statistics


@dataclass
class DistortedProfile:
    """Everything a table depends on; `PROFILES` holds the presets, options override them."""
    idx_root: str
    out: str = "runs/digits"
    name: str = "standard"
    distortions: Tuple[str, ...] = DISTORTIONS
    models: Tuple[str, ...] = MODEL_KEYS
    seeds: int = 1
    steps: int = 1000
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 0.001
    milestones: Tuple[float, ...] = (2 / 3, 5 / 6)  # fractions of the run where lr is divided by 10
    loc_lr_scale: float = 1.0
    target_params: int = 400_000          # every model's size (paper A.3: about the same for all)
    train_count: Optional[int] = None     # split one IDX pair: its first N digits train, the rest test
    train_limit: Optional[int] = None     # first N training digits; None: all
    test_limit: Optional[int] = None
    data_seed: int = 0                    # the test split's fixed distortions (seed + 1), as data_prep writes them
    threads: Optional[int] = None         # None: all cores
    num_examples: int = 6
    extra: Dict[str, object] = field(default_factory=dict)  # recorded in the results, e.g. the command

    def run_settings(self) -> Dict[str, object]:
        """The settings that make two runs of one (model, distortion, seed) the same run."""
        keys = ("steps", "batch_size", "optimizer", "lr", "milestones", "loc_lr_scale", "target_params", "train_count",
                "train_limit", "test_limit", "data_seed")
        settings = {k: getattr(self, k) for k in keys} | {"idx_root": str(Path(self.idx_root).resolve())}
        return json.loads(json.dumps(settings))  # as results.jsonl holds them (tuples as lists)

    def overrides(self) -> List[str]:
        """Config overrides of the profile's recipe (on top of configs/digits/*.yaml)."""
        milestones = sorted({max(1, round(self.steps * m)) for m in self.milestones})  # a tiny run: distinct
        sgd = ["optim.momentum=0.9"] if self.optimizer == "sgd" else []
        return [f"optim.name={self.optimizer}", f"optim.lr={self.lr}", "optim.weight_decay=0.0", *sgd,
                f"schedule.milestones={milestones}", f"train.global_batch_size={self.batch_size}",
                f"train.max_steps={self.steps}", f"train.eval_every={self.steps}",
                f"train.checkpoint_every={max(1, self.steps // 4)}", f"train.log_every={max(1, self.steps // 5)}",
                "train.keep_checkpoints=1", "train.device=cpu", f"model.extra.target_params={self.target_params}"]


PROFILES = {
    "quick": dict(name="quick", steps=40, batch_size=64, seeds=1, train_limit=512, test_limit=256),
    "standard": dict(name="standard", target_params=130_000),
    "paper": dict(name="paper", steps=150_000, batch_size=256, optimizer="sgd", lr=0.01, seeds=3,
                  milestones=(1 / 3, 2 / 3)),
}


def make_preset(profile_class, presets: Dict[str, Dict], preset: str, idx_root: str, **overrides):
    """A `profile_class` from one of the experiment's `presets` (name -> field values), `overrides` on top
    (the digits experiments' profiles: Table 1, 4 and 5)."""
    if preset not in presets:
        raise ExperimentError(f"--profile {preset!r}: expected one of {', '.join(presets)}")
    return replace(profile_class(idx_root=idx_root, **presets[preset]), **overrides)


def given_options(args, names: Sequence[str]) -> Dict[str, object]:
    """The CLI options among `names` the user set (the rest keep the preset's values)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def make_profile(preset: str, idx_root: str, **overrides) -> DistortedProfile:
    return make_preset(DistortedProfile, PROFILES, preset, idx_root, **overrides)


def profile_from_args(args) -> DistortedProfile:
    """The profile of the CLI's parsed arguments (explicit options override the preset's)."""
    overrides = given_options(args, ("seeds", "steps", "batch_size", "train_count", "train_limit", "test_limit",
                                     "loc_lr_scale", "lr", "threads", "num_examples", "out"))
    chosen = _choices(args.distortions, DISTORTIONS, "--distortions")
    overrides["distortions"] = tuple(d for d in DISTORTIONS if d in chosen)  # the paper's column order
    overrides["models"] = _choices(args.models, tuple(ROWS), "--models")
    if "out" not in overrides:
        overrides["out"] = f"runs/digits_{args.profile}"
    return make_profile(args.profile, args.idx_root, **overrides)


def _choices(text: str, valid: Sequence[str], option: str) -> Tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in valid]
    if bad or not items:
        raise ExperimentError(f"{option} {text!r}: expected a comma-separated subset of {','.join(valid)}")
    return items


# ---- data --------------------------------------------------------------------------------------

def dataset_dir(profile: DistortedProfile, distortion: str) -> Path:
    split = f"count{profile.train_count}-" if profile.train_count else ""
    limits = f"train{profile.train_limit or 'all'}-test{profile.test_limit or 'all'}"
    return Path(profile.out) / "data" / f"{distortion}-{split}{limits}-seed{profile.data_seed}"


def prepare_data(profile: DistortedProfile, distortion: str) -> Path:
    """Shards of one distortion, written by data_prep digits --fresh-train. A folder holding the same
    ones keeps them (data_prep finds every shard complete); one holding other data is replaced."""
    from data_prep.digits import DigitsOptions, prepare
    from data_prep.jobs import JobOptions

    opts = DigitsOptions(idx_root=profile.idx_root, out=str(dataset_dir(profile, distortion)), distortion=distortion,
                         seed=profile.data_seed, limit=profile.train_limit, test_limit=profile.test_limit,
                         train_count=profile.train_count, fresh_train=True, shard_size=2000)
    prepare(opts, JobOptions(overwrite=True))
    return Path(opts.out)


# ---- one run: an ordinary Trainer run ------------------------------------------------------------

def run_config(profile: DistortedProfile, key: str, distortion: str, seed: int, data_root: Path):
    """The Config of one (model, distortion, seed) run: configs/digits/<model>.yaml + profile + run."""
    from pipeline.config import load_config

    _, _, config_name, transform = ROWS[key]
    settings_id = hashlib.sha256(json.dumps(profile.run_settings(), sort_keys=True).encode()).hexdigest()[:8]
    run_dir = Path(profile.out) / "runs" / distortion / f"{key}-seed{seed}-{settings_id}"
    overrides = profile.overrides() + [
        f"data.root={data_root}", f"data.distortion={distortion}", f"model.input_size={OUTPUT_SIZE[distortion]}",
        f"train.seed={seed}", f"run.dir={run_dir}", "train.resume=auto"]
    if transform is not None:
        pooled = distortion in POOLED and key not in VARIANTS
        overrides += [f"model.transform={transform}", f"model.extra.pool_after_st={str(pooled).lower()}"]
        if profile.loc_lr_scale != 1.0:
            overrides.append(f"optim.lr_scale.localisation={profile.loc_lr_scale}")
    return load_config(CONFIGS / f"{config_name}.yaml", overrides)


def train_one(profile: DistortedProfile, key: str, distortion: str, seed: int, data_root: Path) -> Dict:
    """Train (or finish) one run through the Trainer; returns its results.jsonl record."""
    from pipeline.train import NonFiniteLoss, run

    cfg = run_config(profile, key, distortion, seed, data_root)
    torch.set_num_threads(threads_for(profile, key))
    start = time.time()
    record = {"model": key, "distortion": distortion, "seed": seed, "run_dir": cfg.run.dir}
    try:
        summary = run(cfg)
    except NonFiniteLoss as err:
        print(f"warning: {key} on {distortion}, seed {seed}: {err}", flush=True)
        return record | {"test_error": None, "diverged": str(err), "wall_s": time.time() - start}
    top1 = summary["metrics"]["top1"]
    model, _, _ = load_run(cfg.run.dir)
    return record | {"test_error": round(100.0 * (1.0 - top1), 4), "num_test": summary["metrics"]["num_samples"],
                     "num_params": sum(p.numel() for p in model.parameters()), "wall_s": time.time() - start}


def load_run(run_dir: str | Path):
    """(model in eval mode, config, checkpoint state) of a finished run's last checkpoint."""
    from pipeline.evaluate import load_model

    return load_model(Path(run_dir) / "checkpoints" / "last.pt")


def threads_for(profile: DistortedProfile, key: str) -> int:
    """Intra-op threads for one run: all cores for the CNNs; one for the FCNs, whose ops are too small
    to split (with two threads each op waits on the other thread, which costs 10-50x on a busy machine)."""
    cores = profile.threads or os.cpu_count() or 1
    return 1 if ROWS[key][2].endswith("fcn") else cores


# ---- results -----------------------------------------------------------------------------------

def load_results(path: Path) -> List[Dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, record: Dict) -> None:
    # One short line per write, opened for appending: two runners sharing OUT (say one per
    # distortion, one per core) interleave whole lines.
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def errors_by_cell(records: Sequence[Dict]) -> Dict[Tuple[str, str], List[Optional[float]]]:
    errors: Dict[Tuple[str, str], List[Optional[float]]] = {}
    for r in records:
        errors.setdefault((r["model"], r["distortion"]), []).append(r["test_error"])  # None: diverged
    return errors


def format_table(records: Sequence[Dict], distortions: Sequence[str] = DISTORTIONS,
                 models: Sequence[str] = MODEL_KEYS) -> str:
    """Markdown in Table 1's layout: test error % as mean ± standard deviation over seeds."""
    models = [m for m in ROWS if m in models]  # Table 1's order, variants last
    errors = errors_by_cell(records)
    lines = ["| Model | | " + " | ".join(distortions) + " |", "|---|---|" + "---|" * len(distortions)]
    previous = None
    for key in models:
        row, sub, _, _ = ROWS[key]
        cells = [_cell(errors.get((key, d), [])) for d in distortions]
        lines.append(f"| {row if row != previous else ''} | {sub} | " + " | ".join(cells) + " |")
        previous = row
    return "\n".join(lines)


def _cell(values: List[Optional[float]]) -> str:
    if not values:
        return "–"
    diverged = sum(v is None for v in values)
    values = [v for v in values if v is not None]
    if not values:
        return "diverged"
    if diverged:
        return f"{_cell(values)} ({diverged} diverged)"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def results_json(records: Sequence[Dict], dataset: str, profile: str) -> Dict:
    """{"dataset", "profile", "errors": {distortion: {model: {"mean", "std", "n"}}}} (test error, %)."""
    errors: Dict[str, Dict[str, Dict[str, float]]] = {}
    for (model, distortion), values in sorted(errors_by_cell(records).items()):
        done = [v for v in values if v is not None]
        if done:
            errors.setdefault(distortion, {})[model] = {
                "mean": round(statistics.fmean(done), 3),
                "std": round(statistics.stdev(done), 3) if len(done) > 1 else 0.0, "n": len(done)}
    return {"dataset": dataset, "profile": profile, "errors": errors}


# ---- what the transformers learnt ----------------------------------------------------------------

def sampled_outline(theta: torch.Tensor, kind: str, size: int) -> torch.Tensor:
    """(B, P, 2) input pixel coordinates of the border of the region each transform samples."""
    from pipeline.models.spatial_transformer import sampling_grid

    grid = sampling_grid(theta, kind, (size, size))                           # (B, S, S, 2) in [-1, 1]
    border = torch.cat([grid[:, 0, :], grid[:, :, -1], grid[:, -1, :].flip(1), grid[:, :, 0].flip(1)], 1)
    return (border + 1) / 2 * size                                             # pixel edges: 0..size


def as_input(images: torch.Tensor) -> torch.Tensor:
    # configs/digits: mean 0, std 1, i.e. [0, 1] pixels; the transformer's zero padding stays black.
    return images.float().div(255.0)


@torch.no_grad()
def transform_stats(model: nn.Module, images: torch.Tensor, kind: str) -> Dict[str, float]:
    """What a trained transformer does on test images: the mean displacement of its sampling grid
    from the identity (input pixels) and the mean area of the region it samples (1 = the whole
    image; < 1 zooms in). A transformer that stayed at its identity initialisation scores 0 and 1."""
    from pipeline.models.spatial_transformer import base_grid, sampling_grid

    theta = model.attend(as_input(images))["theta"][:, 0]
    size = images.shape[-1]
    shift = (sampling_grid(theta, kind, (size, size)) - base_grid((size, size))).norm(dim=-1).mean() * size / 2
    outline = sampled_outline(theta, kind, size)
    x, y = outline[..., 0], outline[..., 1]
    area = 0.5 * (x * y.roll(-1, 1) - x.roll(-1, 1) * y).sum(1).abs()  # shoelace
    area = area / (size - 1) ** 2  # the outline runs through the border pixels' centres
    return {"grid_shift_px": float(shift), "sampled_area": float(area.mean())}


def transform_table(stats: Dict[str, Dict[str, Dict[str, float]]], distortions: Sequence[str],
                    models: Sequence[str]) -> str:
    keys = [k for k in ROWS if k in models and any(k in stats.get(d, {}) for d in distortions)]
    lines = ["| ST model (first seed) | " + " | ".join(distortions) + " |", "|---|" + "---|" * len(distortions)]
    for key in keys:
        cells = [(f"{stats[d][key]['grid_shift_px']:.1f} px / {stats[d][key]['sampled_area']:.2f}"
                  if key in stats.get(d, {}) else "–") for d in distortions]
        lines.append(f"| {ROWS[key][0]} {ROWS[key][1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_split(data_root: Path, limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` test digits: (uint8 (N, 1, S, S), labels (N,)), read by the evaluation loader."""
    from pipeline.config import Config, DataConfig, ModelConfig
    from pipeline.data import build_eval_loader, read_manifest

    manifest = read_manifest(data_root)
    size = int(manifest.raw.get("image_size", 28))
    cfg = Config(model=ModelConfig(input_size=size), data=DataConfig(root=str(data_root), augment="none", channels=1,
                                                                     mean=[0.0], std=[1.0]))
    images, labels = [], []
    for batch, targets, _ in build_eval_loader(cfg, manifest, "test", 0, 1, batch_size=500, num_workers=0):
        images.append(batch)
        labels.append(targets)
        if limit is not None and sum(len(b) for b in images) >= limit:
            break
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(as_input(images[i:i + 500])).argmax(1) for i in range(0, len(images), 500)])


def grid_lines(theta: torch.Tensor, kind: str, size: int, lines: int = 7) -> List[torch.Tensor]:
    """Polylines (P, 2) in input pixels: `lines` rows and columns of the sampling grid of one theta (1, ...)."""
    from pipeline.models.spatial_transformer import sampling_grid

    grid = (sampling_grid(theta, kind, (size, size))[0] + 1) / 2 * size       # (S, S, 2)
    picks = torch.linspace(0, size - 1, lines).round().long()
    return [grid[i] for i in picks] + [grid[:, j] for j in picks]


def examples_picture(images: torch.Tensor, labels: torch.Tensor, cnn_pred: torch.Tensor,
                     panels: Dict[str, Dict[str, torch.Tensor]], kind_of: Dict[str, str], path: Path,
                     zoom: int = 3) -> Path:
    """One row per test digit: for each ST model the input with its sampling grid drawn on it, then the
    transformer's output (paper Table 1, right); a caption gives the label and both predictions."""
    from PIL import Image, ImageDraw

    size = images.shape[-1]
    cell, gap, header, caption = size * zoom, 6, 14, 150
    columns = [(name, part) for name in panels for part in ("in", "out")]
    canvas = Image.new("RGB", (len(columns) * (cell + gap) + caption, header + len(images) * (cell + gap)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(panels):
        draw.text((2 * c * (cell + gap) + 2, 1), f"{name}: input + grid, output", fill=(0, 0, 0))
    for c, (name, part) in enumerate(columns):
        got = panels[name]
        for r in range(len(images)):
            pixels = images[r, 0] if part == "in" else got["crops"][r, 0, 0].mul(255).clamp(0, 255)
            tile = Image.fromarray(pixels.to(torch.uint8).numpy()).resize((cell, cell), Image.NEAREST).convert("RGB")
            x0, y0 = c * (cell + gap), header + r * (cell + gap)
            canvas.paste(tile, (x0, y0))
            if part == "in":
                for line in grid_lines(got["theta"][r:r + 1, 0], kind_of[name], size):
                    draw.line([(x0 + float(px) * zoom, y0 + float(py) * zoom) for px, py in line],
                              fill=(255, 60, 60), width=1)
            if c == len(columns) - 1:
                says = "".join(f"\n{other} says {int(panels[other]['pred'][r])}" for other in panels)
                cnn = f"\nCNN says {int(cnn_pred[r])}" if cnn_pred[r] >= 0 else ""
                draw.text((x0 + cell + gap + 4, y0 + 2), f"label {int(labels[r])}{cnn}{says}", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    canvas.save(tmp, optimize=True)
    os.replace(tmp, path)
    return path


def picture_for(profile: DistortedProfile, distortion: str, runs: Dict[str, str], images: torch.Tensor,
                labels: torch.Tensor) -> Optional[Path]:
    """Table 1 (right) for one distortion from the first seed's runs: test digits the CNN gets wrong and
    the ST-CNN Aff right (any digits when either is missing), for each ST-CNN (ST-FCN when none ran)."""
    st_keys = ([k for k in ROWS if k in runs and k.startswith("st-cnn") and k not in VARIANTS]
               or [k for k in ROWS if k in runs and k.startswith("st-")])
    if not st_keys:
        return None
    models = {key: load_run(runs[key])[0] for key in st_keys + (["cnn"] if "cnn" in runs else [])}
    cnn_pred = predict(models["cnn"], images) if "cnn" in models else torch.full_like(labels, -1)
    st_pred = predict(models[st_keys[0]], images)
    chosen = ((cnn_pred != labels) & (st_pred == labels)).nonzero()[:, 0]
    if len(chosen) < profile.num_examples:  # too few such digits (or no CNN): fill with the first ones
        chosen = torch.cat([chosen, torch.arange(len(images))])[:profile.num_examples]
    chosen = chosen[:profile.num_examples]
    panels, kinds = {}, {}
    for key in st_keys:
        label = f"{ROWS[key][0].split(',')[0]} {ROWS[key][1]}"
        with torch.no_grad():
            panels[label] = models[key].attend(as_input(images[chosen])) | {"pred": predict(models[key], images[chosen])}
        kinds[label] = ROWS[key][3]
    return examples_picture(images[chosen], labels[chosen], cnn_pred[chosen], panels, kinds,
                            Path(profile.out) / f"distorted_{distortion}.png")


# ---- the experiment ----------------------------------------------------------------------------

def run(profile: DistortedProfile, train_missing: bool = True) -> Dict:
    """Train every (model, distortion, seed) not done yet; write the table, results.json and pictures.

    train_missing=False only reports what OUT/results.jsonl holds (e.g. while a long run goes on).
    """
    started = time.time()
    out = Path(profile.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    settings = profile.run_settings()
    pictures: List[str] = []
    stats: Dict[str, Dict[str, Dict[str, float]]] = {}
    for distortion in sorted(profile.distortions, key=TRAIN_ORDER.index):
        root = prepare_data(profile, distortion) if train_missing else dataset_dir(profile, distortion)
        if not (root / "manifest.json").is_file():
            continue
        for key in profile.models:
            for seed in range(profile.seeds):
                # reread each time: another runner sharing OUT may have finished this run meanwhile
                done = {(r["model"], r["distortion"], r["seed"]) for r in load_results(results_path)
                        if r.get("settings") == settings}
                if not train_missing or (key, distortion, seed) in done:
                    continue
                record = train_one(profile, key, distortion, seed, root) | {"settings": settings}
                append_result(results_path, record)
                error = "diverged" if record["test_error"] is None else f"{record['test_error']:.2f}%"
                print(f"{distortion:>3} {key:<12} seed {seed}: test error {error} ({record['wall_s']:.0f} s)", flush=True)
        runs = {r["model"]: r["run_dir"] for r in load_results(results_path)
                if r.get("settings") == settings and r["distortion"] == distortion and r["seed"] == 0
                and r["test_error"] is not None and r["model"] in profile.models}
        if not runs:
            continue
        images, labels = test_split(root, max(STATS_IMAGES, 2000))
        picture = picture_for(profile, distortion, runs, images, labels)
        if picture is not None:
            pictures.append(str(picture))
        for key in (k for k in runs if ROWS[k][3] is not None):
            stats.setdefault(distortion, {})[key] = transform_stats(load_run(runs[key])[0], images[:STATS_IMAGES],
                                                                     ROWS[key][3])
    records = [r for r in load_results(results_path) if r.get("settings") == settings
               and r["model"] in profile.models and r["distortion"] in profile.distortions and r["seed"] < profile.seeds]
    return write_report(profile, records, stats, pictures, time.time() - started)


def write_report(profile: DistortedProfile, records: List[Dict], stats: Dict, pictures: List[str], wall: float) -> Dict:
    out = Path(profile.out)
    table = format_table(records, profile.distortions, profile.models)
    dataset = dataset_name(profile)
    header = (f"Test error (%) on {dataset}, profile '{profile.name}': {profile.steps} steps of {profile.batch_size} "
              f"({profile.optimizer}, lr {profile.lr}), a fresh distortion of every training digit in every batch, "
              f"{profile.seeds} seed(s), training digits {profile.train_count or 'all'} "
              f"(first {profile.train_limit or 'all'}), test digits {profile.test_limit or 'all'}; "
              f"mean ± std over seeds; {len(records)} runs, their training and testing took "
              f"{sum(r['wall_s'] for r in records) / 60:.1f} min in all.\n\n")
    diagnostics = ""
    if stats:
        diagnostics = ("\n\nWhat the transformers learned (first seed, first "
                       f"{STATS_IMAGES} test images): mean displacement of the sampling grid from the identity / "
                       "area of the sampled region (1 = whole image, < 1 zooms in).\n\n"
                       + transform_table(stats, profile.distortions, profile.models))
    table_path = out / "table.md"
    table_path.write_text(header + table + diagnostics + "\n")
    summary = results_json(records, dataset.lower(), profile.name)
    (out / "results.json").write_text(json.dumps(summary | {"transform_stats": stats}, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps({"profile": asdict(profile), "wall_s": wall, "runs": records},
                                                 indent=1, default=str))
    return {"table": table, "table_path": str(table_path), "pictures": pictures, "wall_s": wall, "runs": records}


def dataset_name(profile: DistortedProfile) -> str:
    path = str(Path(profile.idx_root).resolve()).lower()
    return "fashion" if "fashion" in path else "mnist" if "mnist" in path else "digits"
