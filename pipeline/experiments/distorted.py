"""Paper Table 1: FCN, CNN, ST-FCN and ST-CNN (affine / projective / TPS) on distorted digits.

    python -m pipeline.experiments distorted --idx-root /usr/share/datasets/fashion-mnist --quick

For each distortion (R, RTS, P, E, TC) the runner writes the shards once with `data_prep digits`
(cached under OUT/data), loads them into memory, and trains every (model, seed) in this process on
the CPU with the paper's schedule scaled to `steps`: SGD, lr 0.01, lr /10 at 1/3 and 2/3 of the
run, batch 256, no weight decay; the localisation net's lr is lr x `loc_lr_scale`. It writes
OUT/results.jsonl (one line per run; a rerun skips the runs already there with the same settings),
OUT/table.md (test error in %, mean ± standard deviation over seeds, in Table 1's layout) and
OUT/distorted_<D>.png (test images with the region each ST-CNN samples, and what it outputs).
"""
from __future__ import annotations

import io
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_prep.digits import DISTORTIONS, OUTPUT_SIZE, DigitsOptions, prepare
from data_prep.jobs import JobOptions
from pipeline.config import OptimConfig, ScheduleConfig
from pipeline.models import create_model
from pipeline.train.optim import build_optimizer, lr_multiplier


class ExperimentError(RuntimeError):
    """An experiment that cannot go on (bad option, inconsistent data); the message names it."""


class Diverged(ExperimentError):
    """A training run whose loss became NaN or infinite: recorded in the table, the others go on."""


# Table 1's rows: key -> (row label, transform label, model name, transform)
ROWS: Dict[str, Tuple[str, str, str, Optional[str]]] = {
    "fcn": ("FCN", "", "digits_fcn", None),
    "cnn": ("CNN", "", "digits_cnn", None),
    "st-fcn-aff": ("ST-FCN", "Aff", "digits_st_fcn", "affine"),
    "st-fcn-proj": ("ST-FCN", "Proj", "digits_st_fcn", "projective"),
    "st-fcn-tps": ("ST-FCN", "TPS", "digits_st_fcn", "tps"),
    "st-cnn-aff": ("ST-CNN", "Aff", "digits_st_cnn", "affine"),
    "st-cnn-proj": ("ST-CNN", "Proj", "digits_st_cnn", "projective"),
    "st-cnn-tps": ("ST-CNN", "TPS", "digits_st_cnn", "tps"),
}
MODEL_KEYS = tuple(ROWS)  # Table 1's rows
# Variants for finding out why a result differs from the paper's; rows below Table 1's when asked.
VARIANTS: Dict[str, Tuple[str, str, str, Optional[str]]] = {
    "st-cnn-aff-nopool": ("ST-CNN, no pooling after ST", "Aff", "digits_st_cnn", "affine"),
    "st-fcn-aff-nopool": ("ST-FCN, no pooling after ST", "Aff", "digits_st_fcn", "affine"),
}
ROWS.update(VARIANTS)
POOLED = ("RTS", "TC")  # paper A.3: average pooling after the transformer on these
# The paper's headline comparison (ST-CNN vs CNN) is on RTS and TC: train those first, so that a
# run cut short still answers it. The table keeps the paper's column order.
TRAIN_ORDER = ("RTS", "TC", "R", "P", "E")
STATS_IMAGES = 500  # test images for the transformer statistics


@dataclass
class DistortedProfile:
    """Everything a run of the experiment depends on; `paper()` and `quick()` are the presets."""
    idx_root: str
    out: str = "runs/distorted"
    name: str = "paper"
    distortions: Tuple[str, ...] = DISTORTIONS
    models: Tuple[str, ...] = MODEL_KEYS
    seeds: int = 3
    steps: int = 150_000                  # paper: 150k iterations, lr /10 every 50k
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    loc_lr_scale: float = 1.0
    train_limit: Optional[int] = None     # first N training images; None: all
    test_limit: Optional[int] = None
    data_seed: int = 0                    # one distorted dataset for all training seeds, as in the paper
    threads: Optional[int] = None         # None: all cores
    num_examples: int = 6
    eval_batch_size: int = 1000
    extra: Dict[str, object] = field(default_factory=dict)  # recorded in the results, e.g. the command

    def run_settings(self) -> Dict[str, object]:
        """The settings that make two runs of one (model, distortion, seed) the same run."""
        keys = ("steps", "batch_size", "lr", "momentum", "loc_lr_scale", "train_limit", "test_limit", "data_seed")
        return {k: getattr(self, k) for k in keys} | {"idx_root": str(Path(self.idx_root).resolve())}


def paper(idx_root: str, **overrides) -> DistortedProfile:
    return replace(DistortedProfile(idx_root=idx_root), **overrides)


def quick(idx_root: str, **overrides) -> DistortedProfile:
    """~15-20 min on 2 idle cores: 10k training images (2.5 epochs), 2k test images, one seed."""
    base = DistortedProfile(idx_root=idx_root, name="quick", seeds=1, steps=100, train_limit=10_000,
                            test_limit=2_000, out="runs/distorted_quick")
    return replace(base, **overrides)


def profile_from_args(args) -> DistortedProfile:
    """The profile of the CLI's parsed arguments (explicit options override the preset's)."""
    overrides = {k: getattr(args, k) for k in ("seeds", "steps", "batch_size", "train_limit", "test_limit",
                                               "loc_lr_scale", "lr", "threads", "num_examples")
                 if getattr(args, k) is not None}
    chosen = _choices(args.distortions, DISTORTIONS, "--distortions")
    overrides["distortions"] = tuple(d for d in DISTORTIONS if d in chosen)  # the paper's column order
    overrides["models"] = _choices(args.models, tuple(ROWS), "--models")
    preset = quick if args.quick else paper
    profile = preset(args.idx_root, **overrides)
    return replace(profile, out=args.out) if args.out is not None else profile


def _choices(text: str, valid: Sequence[str], option: str) -> Tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in valid]
    if bad or not items:
        raise ExperimentError(f"{option} {text!r}: expected a comma-separated subset of {','.join(valid)}")
    return items


# ---- data --------------------------------------------------------------------------------------

def dataset_dir(profile: DistortedProfile, distortion: str) -> Path:
    limits = f"train{profile.train_limit or 'all'}-test{profile.test_limit or 'all'}"
    return Path(profile.out) / "data" / f"{distortion}-{limits}-seed{profile.data_seed}"


def prepare_data(profile: DistortedProfile, distortion: str) -> Path:
    """Shards of one distortion, written by data_prep digits. A folder holding the same ones keeps
    them (data_prep finds every shard complete); one holding other data or options is replaced."""
    opts = DigitsOptions(idx_root=profile.idx_root, out=str(dataset_dir(profile, distortion)),
                         distortion=distortion, seed=profile.data_seed, limit=profile.train_limit,
                         test_limit=profile.test_limit)
    prepare(opts, JobOptions(overwrite=True))
    return Path(opts.out)


def load_split(root: Path, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """All samples of a split: (uint8 images (N, 1, S, S), int64 labels (N,)), counted against the manifest."""
    import webdataset as wds
    from PIL import Image

    from pipeline.data.manifest import read_manifest

    manifest = read_manifest(root)
    images, labels = [], []
    for sample in wds.WebDataset(manifest.shard_paths(split), shardshuffle=False, empty_check=False):
        images.append(np.asarray(Image.open(io.BytesIO(sample["png"])).convert("L")))
        labels.append(int(sample["cls"]))
    expected = manifest.num_samples(split)
    if len(images) != expected:
        raise ExperimentError(f"{root / 'manifest.json'}: split '{split}' lists {expected} samples, "
                              f"its shards hold {len(images)}")
    return torch.from_numpy(np.stack(images))[:, None], torch.tensor(labels, dtype=torch.int64)


# ---- one run -----------------------------------------------------------------------------------

def build(model_key: str, distortion: str) -> nn.Module:
    _, _, name, transform = ROWS[model_key]
    kwargs = {"input_size": OUTPUT_SIZE[distortion], "num_classes": 10}
    if transform is not None:
        kwargs.update(transform=transform, pool_after_st=distortion in POOLED and model_key not in VARIANTS)
    return create_model(name, **kwargs)


def as_input(images: torch.Tensor) -> torch.Tensor:
    # [0, 1] with no normalisation: the transformer's zero padding stays the black background.
    return images.float().div_(255.0)


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, profile: DistortedProfile,
          seed: int, what: str) -> float:
    """Train in place with the paper's step schedule; returns the mean loss of the last 10% of steps."""
    has_loc = "localisation" in model.parameter_groups()
    optim_cfg = OptimConfig(name="sgd", lr=profile.lr, momentum=profile.momentum, weight_decay=0.0,
                            lr_scale={"localisation": profile.loc_lr_scale} if has_loc else {})
    third = max(1, profile.steps // 3)
    schedule = ScheduleConfig(name="step", milestones=[third, 2 * third], gamma=0.1)
    optimizer = build_optimizer(model, optim_cfg, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, profile.steps))
    generator = torch.Generator().manual_seed(seed)
    batches = _epoch_batches(len(images), profile.batch_size, generator)
    tail: List[float] = []
    model.train()
    for step in range(profile.steps):
        index = next(batches)
        loss = F.cross_entropy(model(as_input(images[index])), labels[index])
        if not torch.isfinite(loss):
            raise Diverged(f"{what}: loss is {loss.item()} at step {step}; try a smaller --lr or --loc-lr-scale")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step >= profile.steps * 0.9:
            tail.append(loss.item())
    return statistics.fmean(tail) if tail else float("nan")


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless batches of indices: a fresh seeded permutation each epoch, batches never straddle two."""
    if n < 1:
        raise ExperimentError("the training split is empty")
    full = max(1, n // batch_size)  # a split smaller than a batch is one batch
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, full * batch_size, batch_size):
            yield order[start:start + batch_size]


@torch.no_grad()
def test_error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Test error in % over every test image."""
    model.eval()
    wrong = 0
    for start in range(0, len(images), batch_size):
        logits = model(as_input(images[start:start + batch_size]))
        wrong += int((logits.argmax(1) != labels[start:start + batch_size]).sum())
    return 100.0 * wrong / max(1, len(images))


# ---- results -----------------------------------------------------------------------------------

def load_results(path: Path) -> List[Dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, record: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def checkpoint_path(profile: DistortedProfile, distortion: str, model_key: str, seed: int) -> Path:
    return Path(profile.out) / "models" / distortion / f"{model_key}-seed{seed}.pt"


def format_table(records: Sequence[Dict], distortions: Sequence[str] = DISTORTIONS,
                 models: Sequence[str] = MODEL_KEYS) -> str:
    models = [m for m in ROWS if m in models]  # Table 1's order, variants last
    """Markdown in Table 1's layout: test error % as mean ± standard deviation over seeds."""
    errors: Dict[Tuple[str, str], List[float]] = {}
    for r in records:
        errors.setdefault((r["model"], r["distortion"]), []).append(r["test_error"])  # None: diverged
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
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


# ---- pictures ----------------------------------------------------------------------------------

def sampled_outline(theta: torch.Tensor, kind: str, size: int) -> torch.Tensor:
    """(B, P, 2) input pixel coordinates of the border of the region each transform samples."""
    from pipeline.models.spatial_transformer import sampling_grid

    grid = sampling_grid(theta, kind, (size, size))                           # (B, S, S, 2) in [-1, 1]
    border = torch.cat([grid[:, 0, :], grid[:, :, -1], grid[:, -1, :].flip(1), grid[:, :, 0].flip(1)], 1)
    return (border + 1) / 2 * size                                             # pixel edges: 0..size


def examples_picture(images: torch.Tensor, panels: Dict[str, Dict[str, torch.Tensor]], kind_of: Dict[str, str],
                     path: Path, zoom: int = 2) -> Path:
    """One row per test image: for each model, the input with the sampled region outlined, then the
    transformer's output (paper Table 1, right)."""
    from PIL import Image, ImageDraw

    size = images.shape[-1]
    cell, gap, header = size * zoom, 4, 14
    columns = [(name, part) for name in panels for part in ("in", "out")]
    width = len(columns) * (cell + gap)
    canvas = Image.new("RGB", (width, header + len(images) * (cell + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(panels):
        draw.text((2 * c * (cell + gap) + 2, 1), name, fill=(0, 0, 0))
    for c, (name, part) in enumerate(columns):
        got = panels[name]
        outline = sampled_outline(got["theta"][:, 0], kind_of[name], size) if part == "in" else None
        for r in range(len(images)):
            pixels = images[r, 0] if part == "in" else got["crops"][r, 0, 0].mul(255).clamp(0, 255)
            tile = Image.fromarray(pixels.to(torch.uint8).numpy()).resize((cell, cell), Image.NEAREST).convert("RGB")
            x0, y0 = c * (cell + gap), header + r * (cell + gap)
            canvas.paste(tile, (x0, y0))
            if outline is not None:
                points = [(x0 + float(px) * zoom, y0 + float(py) * zoom) for px, py in outline[r]]
                draw.line(points + points[:1], fill=(255, 40, 40), width=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def first_seed_model(profile: DistortedProfile, distortion: str, key: str) -> Optional[nn.Module]:
    """The saved first-seed ST model of a run, or None when that run has not been done."""
    ckpt = checkpoint_path(profile, distortion, key, 0)
    if not ckpt.is_file():
        return None
    model = build(key, distortion)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    return model.eval()


def picture_for(profile: DistortedProfile, distortion: str, test_images: torch.Tensor) -> Optional[Path]:
    """The examples picture from the first seed's ST-CNN models (ST-FCN when no ST-CNN ran)."""
    keys = ([k for k in profile.models if k.startswith("st-cnn") and k not in VARIANTS]
            or [k for k in profile.models if k.startswith("st-")])
    images = test_images[:profile.num_examples]
    panels, kinds = {}, {}
    for key in keys:
        model = first_seed_model(profile, distortion, key)
        if model is None:
            continue
        label = f"{ROWS[key][0].split(',')[0]} {ROWS[key][1]}"
        panels[label] = model.attend(as_input(images))
        kinds[label] = ROWS[key][3]
    if not panels:
        return None
    return examples_picture(images, panels, kinds, Path(profile.out) / f"distorted_{distortion}.png")


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


# ---- the experiment ----------------------------------------------------------------------------

def run(profile: DistortedProfile, train_missing: bool = True) -> Dict:
    """Train every (model, distortion, seed) not done yet; write the table and the pictures.

    train_missing=False only reports what OUT/results.jsonl holds (e.g. while a long run goes on).
    """
    started = time.time()
    torch.set_num_threads(profile.threads or os.cpu_count() or 1)
    out = Path(profile.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    settings = profile.run_settings()
    done = {(r["model"], r["distortion"], r["seed"]): r for r in load_results(results_path)
            if r.get("settings") == settings}
    pictures: List[str] = []
    stats: Dict[str, Dict[str, Dict[str, float]]] = {}
    for distortion in sorted(profile.distortions, key=TRAIN_ORDER.index):
        root = dataset_dir(profile, distortion) if not train_missing else prepare_data(profile, distortion)
        if not (root / "manifest.json").is_file():
            continue
        test_x, test_y = load_split(root, "test")
        train_x, train_y = load_split(root, "train") if train_missing else (None, None)
        for key in profile.models:
            for seed in range(profile.seeds):
                if not train_missing or ((key, distortion, seed) in done
                                         and _has_checkpoint_if_needed(profile, distortion, key, seed)):
                    continue
                record = _one_run(profile, key, distortion, seed, (train_x, train_y, test_x, test_y))
                record["settings"] = settings
                append_result(results_path, record)
                done[(key, distortion, seed)] = record
                error = "diverged" if record["test_error"] is None else f"{record['test_error']:.2f}%"
                print(f"{distortion:>3} {key:<12} seed {seed}: test error {error} ({record['wall_s']:.0f} s)", flush=True)
        picture = picture_for(profile, distortion, test_x)
        if picture is not None:
            pictures.append(str(picture))
        for key in (k for k in profile.models if ROWS[k][3] is not None):
            model = first_seed_model(profile, distortion, key)
            if model is not None:
                stats.setdefault(distortion, {})[key] = transform_stats(model, test_x[:STATS_IMAGES], ROWS[key][3])
    records = [r for r in done.values() if r["model"] in profile.models and r["distortion"] in profile.distortions
               and r["seed"] < profile.seeds]
    table = format_table(records, profile.distortions, profile.models)
    wall = time.time() - started
    header = (f"Test error (%) on {_dataset_name(profile)}, profile '{profile.name}': {profile.steps} steps of "
              f"{profile.batch_size}, {profile.seeds} seed(s), train images {profile.train_limit or 'all'}, "
              f"test images {profile.test_limit or 'all'}, localisation lr x{profile.loc_lr_scale}; "
              f"mean ± std over seeds; {len(records)} runs, their training and testing took "
              f"{sum(r['wall_s'] for r in records) / 60:.1f} min in all.\n\n")
    table_path = out / "table.md"
    diagnostics = ""
    if stats:
        diagnostics = ("\n\nWhat the transformers learned (first seed, first "
                       f"{STATS_IMAGES} test images): mean displacement of the sampling grid from the identity / "
                       "area of the sampled region (1 = whole image, < 1 zooms in).\n\n"
                       + transform_table(stats, profile.distortions, profile.models))
    table_path.write_text(header + table + diagnostics + "\n")
    (out / "summary.json").write_text(json.dumps({"profile": asdict(profile), "wall_s": wall, "runs": records,
                                                  "transform_stats": stats},
                                                 indent=1, default=str))
    return {"table": table, "table_path": str(table_path), "pictures": pictures, "wall_s": wall, "runs": records}


def _has_checkpoint_if_needed(profile: DistortedProfile, distortion: str, key: str, seed: int) -> bool:
    return seed != 0 or not key.startswith("st-") or checkpoint_path(profile, distortion, key, seed).is_file()


def _one_run(profile: DistortedProfile, key: str, distortion: str, seed: int, data) -> Dict:
    train_x, train_y, test_x, test_y = data
    what = f"{key} on {distortion}, seed {seed}"
    torch.set_num_threads(threads_for(profile, key))
    start = time.time()
    torch.manual_seed(seed)
    model = build(key, distortion)
    record = {"model": key, "distortion": distortion, "seed": seed,
              "num_params": sum(p.numel() for p in model.parameters()),
              "num_test": len(test_x), "num_train": len(train_x)}
    try:
        final_loss = train(model, train_x, train_y, profile, seed, what)
    except Diverged as err:
        print(f"warning: {err}", flush=True)
        return record | {"test_error": None, "diverged": str(err), "wall_s": time.time() - start}
    error = test_error(model, test_x, test_y, profile.eval_batch_size)
    if seed == 0 and key.startswith("st-"):  # kept for the examples picture
        ckpt = checkpoint_path(profile, distortion, key, seed)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(ckpt.name + ".partial")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, ckpt)
    return record | {"test_error": error, "final_train_loss": final_loss, "wall_s": time.time() - start}


def threads_for(profile: DistortedProfile, key: str) -> int:
    """Intra-op threads for one run: all cores for the CNNs; one for the FCNs, whose ops are too small
    to split (with two threads each op waits on the other thread, which costs 10-50x on a busy machine)."""
    cores = profile.threads or os.cpu_count() or 1
    return 1 if ROWS[key][2].endswith("fcn") else cores


def _dataset_name(profile: DistortedProfile) -> str:
    return "Fashion-MNIST" if "fashion" in str(Path(profile.idx_root).resolve()).lower() else "MNIST-format digits"
