"""Paper Table 5: co-localisation of MNIST digits, plain (T) and cluttered (TC).

    python -m pipeline.experiments coloc --idx-root tests/data/mnist --classes 3,5,8 --profile standard

1. The feature network e(): the Table 1 CNN (`digits_cnn`, 28 px) trained on the first --train-count
   digits with a fresh elastic (E) distortion per batch, by the Table 1 runner's own `train_one`
   (OUT/runs/E/cnn-seed0-<id>/; a rerun finds it finished and reuses it).
2. Per (T/TC, class, seed): `data_prep coloc` writes --count images of the class from the digits
   after --train-count (which e() never saw; OUT/data/), and one ordinary Trainer run of
   configs/digits/coloc.yaml (`pipeline.train.run`) optimises the transformer on them
   (OUT/runs/<T|TC>/class<c>-seed<s>-<id>/): the triplet loss, no labels, no boxes. Co-localisation
   is transductive: the images it trains on are the images it is scored on. The score is the final
   step's (never the best checkpoint's, which the boxes would pick): the share of images whose
   crop has IoU > 0.5 with the digit's 28x28 box (`iou50`).
3. The boxes over the optimisation: every periodic checkpoint (train.checkpoint_every) is read back
   and its boxes on all images scored, from step 0 (the initial, input-independent centred crop).

Writes OUT/table.md, OUT/results.json (rates, the trajectories, the settings),
OUT/coloc_mnist.json ({"T": {"<class>": rate}, "TC": {...}}, rates in [0, 1], mean over seeds: the
shape of docs/results/coloc_mnist.json) and OUT/coloc_boxes.png (paper Fig. 4: a few images of each
run with their crop at each kept step, early yellow to final red, the digit's box in green).

Profiles (`--profile`):
  quick     every code path in seconds: 20 images, 10 coloc steps, a 10-step feature CNN (the tests').
  standard  the 2-core figures: 100 images per class, a 400-step feature CNN, 600 coloc steps of 50.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .distorted import DistortedProfile, ExperimentError, _choices, given_options, make_preset, prepare_data, train_one

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits" / "coloc.yaml"
CLUTTERS = ("T", "TC")
FEATURE_DISTORTION = "E"


@dataclass
class ColocProfile:
    """Everything the table depends on; `PROFILES` holds the presets, options override them."""
    idx_root: str
    out: str = "runs/coloc"
    name: str = "standard"
    classes: Tuple[int, ...] = (3, 5, 8)
    clutters: Tuple[str, ...] = CLUTTERS
    seeds: int = 1
    count: int = 100                # images per class (paper: 100)
    train_count: int = 8000         # the IDX pair's first N digits train e(); the images come from the rest
    data_seed: int = 0
    steps: int = 600
    batch_size: int = 50
    lr: float = 0.001
    margin: float = 1.0
    checkpoint_every: int = 100     # the steps whose boxes the trajectory and the picture keep
    feature_steps: int = 400
    feature_params: int = 130_000
    feature_limit: Optional[int] = None  # the feature CNN's first N training digits (N / 2 test digits); None: all
    threads: int = 1                # per coloc run: its ops are small (measured: 1 thread 3x faster than 2 on a busy 2-core machine)
    num_examples: int = 4
    overrides: Tuple[str, ...] = ()  # extra config overrides of every coloc run (e.g. model.extra.margin=...)
    extra: Dict[str, object] = field(default_factory=dict)  # recorded in the results, e.g. the command

    def run_settings(self) -> Dict[str, object]:
        keys = ("count", "train_count", "data_seed", "steps", "batch_size", "lr", "margin", "checkpoint_every",
                "feature_steps", "feature_params", "feature_limit", "overrides")
        settings = {k: getattr(self, k) for k in keys} | {"idx_root": str(Path(self.idx_root).resolve())}
        return json.loads(json.dumps(settings))


PROFILES = {
    "quick": dict(name="quick", count=20, steps=10, batch_size=10, checkpoint_every=5, feature_steps=10,
                  feature_params=20_000, feature_limit=512, num_examples=2),
    "standard": dict(name="standard"),
}


def make_profile(preset: str, idx_root: str, **overrides) -> ColocProfile:
    return make_preset(ColocProfile, PROFILES, preset, idx_root, **overrides)


def profile_from_args(args) -> ColocProfile:
    """The profile of the CLI's parsed arguments (explicit options override the preset's)."""
    overrides = given_options(args, ("seeds", "steps", "count", "train_count", "lr", "margin", "threads",
                                     "feature_steps", "out"))
    digits = _choices(args.classes, tuple(str(d) for d in range(10)), "--classes")
    overrides["classes"] = tuple(int(d) for d in digits)
    overrides["clutters"] = _choices(args.clutter, CLUTTERS, "--clutter")
    overrides["overrides"] = tuple(args.set or ())
    if "out" not in overrides:
        overrides["out"] = f"runs/coloc_{args.profile}"
    return make_profile(args.profile, args.idx_root, **overrides)


# ---- the feature network: a Table 1 run -----------------------------------------------------------

def feature_profile(profile: ColocProfile) -> DistortedProfile:
    return DistortedProfile(idx_root=profile.idx_root, out=profile.out, name=f"coloc-{profile.name}",
                            steps=profile.feature_steps, target_params=profile.feature_params,
                            train_count=profile.train_count, threads=os.cpu_count(), train_limit=profile.feature_limit,
                            test_limit=profile.feature_limit and profile.feature_limit // 2)


def train_features(profile: ColocProfile) -> Dict:
    """Train (or find) the feature CNN; its record has run_dir and test_error (%) on E-distorted test digits."""
    dprofile = feature_profile(profile)
    record = train_one(dprofile, "cnn", FEATURE_DISTORTION, 0, prepare_data(dprofile, FEATURE_DISTORTION))
    if record["test_error"] is None:
        raise ExperimentError(f"the feature CNN diverged: {record['diverged']}")
    return record


# ---- one co-localisation run ---------------------------------------------------------------------

def prepare_images(profile: ColocProfile, clutter: str, digit: int) -> Path:
    from data_prep.coloc import ColocOptions, prepare
    from data_prep.jobs import JobOptions

    out = Path(profile.out) / "data" / f"coloc-{clutter}-class{digit}-n{profile.count}-seed{profile.data_seed}"
    prepare(ColocOptions(idx_root=profile.idx_root, out=str(out), clutter=clutter, classes=str(digit),
                         count=profile.count, seed=profile.data_seed, train_count=profile.train_count),
            JobOptions(overwrite=True))
    return out


def run_config(profile: ColocProfile, clutter: str, digit: int, seed: int, data_root: Path, features: str):
    from pipeline.config import load_config

    settings_id = hashlib.sha256(json.dumps(profile.run_settings(), sort_keys=True).encode()).hexdigest()[:8]
    run_dir = Path(profile.out) / "runs" / clutter / f"class{digit}-seed{seed}-{settings_id}"
    overrides = [f"data.root={data_root}", f"model.extra.feature_checkpoint={features}", f"train.seed={seed}",
                 f"run.dir={run_dir}", "train.resume=auto", f"train.max_steps={profile.steps}",
                 f"train.global_batch_size={min(profile.batch_size, profile.count)}", f"optim.lr={profile.lr}",
                 f"model.extra.margin={profile.margin}", f"train.eval_every={profile.checkpoint_every}",
                 f"train.checkpoint_every={profile.checkpoint_every}",
                 f"train.keep_checkpoints={profile.steps // profile.checkpoint_every + 1}",
                 f"train.log_every={max(1, profile.steps // 6)}", *profile.overrides]
    return load_config(CONFIG, overrides)


def train_coloc(profile: ColocProfile, clutter: str, digit: int, seed: int, data_root: Path, features: str) -> Dict:
    """One Trainer run (or its finished checkpoint); the final iou50 and the boxes at every kept step."""
    from pipeline.train import NonFiniteLoss, run

    cfg = run_config(profile, clutter, digit, seed, data_root, features)
    torch.set_num_threads(profile.threads)
    start = time.time()
    record = {"clutter": clutter, "class": digit, "seed": seed, "run_dir": cfg.run.dir}
    try:
        summary = run(cfg)
    except NonFiniteLoss as err:
        return record | {"iou50": None, "diverged": str(err), "wall_s": time.time() - start}
    metrics = summary["metrics"]
    return record | {"iou50": metrics["iou50"], "mean_iou": metrics["mean_iou"], "loss": metrics["loss"],
                     "num_images": metrics["num_samples"], "wall_s": time.time() - start}


# ---- the boxes over the optimisation -------------------------------------------------------------

def images_and_boxes(cfg) -> Tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 1, S, S), the digits' boxes (N, 4) in [-1, 1] input coordinates) of the eval split."""
    from pipeline.data import build_eval_loader, read_manifest
    from pipeline.evaluation import meta_boxes

    images, boxes = [], []
    for batch, _, metas in build_eval_loader(cfg, read_manifest(cfg.data.root), cfg.data.eval_split, 0, 1,
                                             batch_size=500, num_workers=0):
        images.append(batch)
        boxes.append(meta_boxes(metas))
    return torch.cat(images), torch.cat(boxes)


@torch.no_grad()
def trajectory(run_dir: str, images: torch.Tensor, truth: torch.Tensor) -> List[Dict]:
    """Per kept step (0 first): the boxes (N, 4) of every image, their iou50, mean IoU, scale and centre."""
    from pipeline.evaluate import load_model
    from pipeline.metrics import box_iou
    from pipeline.models import build_model

    x = images.float() / 255  # the coloc config's normalisation: mean 0, std 1
    paths = sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))
    models = [(0, None)] + [(int(p.stem.split("_")[1]), p) for p in paths]
    steps = []
    for step, path in models:
        if path is None:
            _, cfg, _ = load_model(paths[-1])
            model = build_model(cfg.model).eval()  # the initial crop does not depend on the weights' draw
        else:
            model = load_model(path)[0]
        out = model.attend(x)
        boxes = out["boxes"][:, 0].double()
        iou = box_iou(boxes, truth.double())
        steps.append({"step": step, "boxes": boxes, "iou50": float((iou > 0.5).double().mean()),
                      "mean_iou": float(iou.mean()), "scale": float(out["theta"][:, 0, 0].mean()),
                      "centre": [round(float(v), 4) for v in out["theta"][:, 0, 1:].mean(0)]})
    return steps


def boxes_picture(panels: List[Tuple[str, torch.Tensor, torch.Tensor, List[Dict]]], path: Path, num: int,
                  zoom: int = 2) -> Path:
    """Paper Fig. 4: per run a row of `num` images, each with its crop at every kept step (yellow = first,
    red = last) and the digit's box (green)."""
    from PIL import Image, ImageDraw

    size = panels[0][1].shape[-1]
    cell, gap, label = size * zoom, 4, 110
    canvas = Image.new("RGB", (label + num * (cell + gap), len(panels) * (cell + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def rect(box, x0, y0, colour):
        corners = [(float(v) + 1) / 2 * cell for v in box]
        draw.rectangle([x0 + corners[0], y0 + corners[1], x0 + corners[2], y0 + corners[3]], outline=colour)

    for r, (name, images, truth, steps) in enumerate(panels):
        y0 = r * (cell + gap)
        kept = f"steps {steps[0]['step']}..{steps[-1]['step']}"
        draw.text((2, y0 + 2), f"{name}\n{kept}\niou50 {steps[0]['iou50']:.2f}\n-> {steps[-1]['iou50']:.2f}",
                  fill=(0, 0, 0))
        for i in range(min(num, len(images))):
            x0 = label + i * (cell + gap)
            tile = Image.fromarray(images[i, 0].numpy()).resize((cell, cell), Image.NEAREST).convert("RGB")
            canvas.paste(tile, (x0, y0))
            rect(truth[i], x0, y0, (0, 200, 0))
            for k, s in enumerate(steps):
                t = k / max(1, len(steps) - 1)
                rect(s["boxes"][i], x0, y0, (255, int(230 * (1 - t)), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    canvas.save(tmp, optimize=True)
    os.replace(tmp, path)
    return path


# ---- the experiment ------------------------------------------------------------------------------

def run(profile: ColocProfile) -> Dict:
    started = time.time()
    out = Path(profile.out)
    out.mkdir(parents=True, exist_ok=True)
    features = train_features(profile)
    feature_ckpt = str(Path(features["run_dir"]) / "checkpoints" / "last.pt")
    print(f"feature CNN: test error {features['test_error']:.2f}% on E-distorted digits ({features['run_dir']})",
          flush=True)
    records, panels = [], []
    for clutter in profile.clutters:
        for digit in profile.classes:
            root = prepare_images(profile, clutter, digit)
            for seed in range(profile.seeds):
                record = train_coloc(profile, clutter, digit, seed, root, feature_ckpt)
                if record["iou50"] is not None:
                    cfg = run_config(profile, clutter, digit, seed, root, feature_ckpt)
                    images, truth = images_and_boxes(cfg)
                    steps = trajectory(record["run_dir"], images, truth)
                    record["trajectory"] = [{k: v for k, v in s.items() if k != "boxes"} for s in steps]
                    if seed == 0:
                        panels.append((f"{clutter}, class {digit}", images, truth, steps))
                rate = "diverged" if record["iou50"] is None else f"{record['iou50']:.2f}"
                print(f"{clutter:>2} class {digit} seed {seed}: iou50 {rate} ({record['wall_s']:.0f} s)", flush=True)
                records.append(record)
    picture = boxes_picture(panels, out / "coloc_boxes.png", profile.num_examples) if panels else None
    return write_report(profile, features, records, picture, time.time() - started)


def seed_rates(records: Sequence[Dict]) -> Dict[str, Dict[str, List[float]]]:
    """{"T": {"<class>": [iou50 of each seed]}, "TC": ...} of the runs that finished."""
    found: Dict[str, Dict[str, List[float]]] = {}
    for r in records:
        if r["iou50"] is not None:
            found.setdefault(r["clutter"], {}).setdefault(str(r["class"]), []).append(r["iou50"])
    return found


def rates(records: Sequence[Dict]) -> Dict[str, Dict[str, float]]:
    """{"T": {"<class>": mean iou50 over seeds}, "TC": ...} of the runs that finished."""
    return {c: {d: round(statistics.fmean(v), 4) for d, v in by_class.items()}
            for c, by_class in seed_rates(records).items()}


def rate_cell(seeds: Sequence[float], initial: Optional[Sequence[float]]) -> str:
    """"4 % (initial 5 %)" for one seed; "4 +- 2 % (seeds 3 / 6 / 3; initial 5 %)" for several (percent)."""
    percent = [100 * rate for rate in seeds]
    notes = [] if len(percent) == 1 else ["seeds " + " / ".join(f"{p:.0f}" for p in percent)]
    if initial:
        notes.append(f"initial {100 * statistics.fmean(initial):.0f} %")
    mean = f"{statistics.fmean(percent):.0f}" + ("" if len(percent) == 1 else f" +- {statistics.stdev(percent):.0f}")
    return f"{mean} %" + (f" ({'; '.join(notes)})" if notes else "")


def format_table(records: Sequence[Dict], profile: ColocProfile) -> str:
    """Markdown: % of images localised (IoU > 0.5) per class, T and TC (with several seeds: mean +- std
    and each seed's) and the initial crop's."""
    per_seed = seed_rates(records)
    initial: Dict[Tuple[str, str], List[float]] = {}
    for r in records:
        if r.get("trajectory"):
            initial.setdefault((r["clutter"], str(r["class"])), []).append(r["trajectory"][0]["iou50"])
    lines = ["| class | " + " | ".join(profile.clutters) + " |", "|---|" + "---|" * len(profile.clutters)]
    for digit in map(str, profile.classes):
        cells = []
        for clutter in profile.clutters:
            seeds, start = per_seed.get(clutter, {}).get(digit), initial.get((clutter, digit))
            cells.append(rate_cell(seeds, start) if seeds else "–")
        lines.append(f"| {digit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(profile: ColocProfile, features: Dict, records: List[Dict], picture: Optional[Path],
                 wall: float) -> Dict:
    out = Path(profile.out)
    table = format_table(records, profile)
    header = (f"Co-localisation on MNIST (paper Table 5), profile '{profile.name}': share of the {profile.count} "
              f"images per class whose crop has IoU > 0.5 with the digit's box after {profile.steps} steps of "
              f"{profile.batch_size} (adamw, lr {profile.lr}, margin {profile.margin}), mean over {profile.seeds} "
              f"seed(s); in brackets the initial centred crop. Feature CNN: test error "
              f"{features['test_error']:.2f} % (E-distorted digits, {profile.feature_steps} steps). "
              f"Wall time {wall / 60:.1f} min.\n\n")
    (out / "table.md").write_text(header + table + "\n")
    summary = {"profile": profile.name, "rates": rates(records), "settings": profile.run_settings(),
               "feature_cnn": {k: features[k] for k in ("run_dir", "test_error", "num_params")},
               "runs": records, "wall_s": wall, "extra": profile.extra}
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "coloc_mnist.json").write_text(json.dumps(rates(records), indent=1) + "\n")
    return {"table": table, "table_path": str(out / "table.md"), "pictures": [str(picture)] if picture else [],
            "rates": rates(records), "wall_s": wall, "runs": records, "profile": asdict(profile)}
