"""A plain-PyTorch reference of paper A.2 (co-localisation, Table 5), side by side over variants.

    .venv/bin/python benchmarks/coloc_reference.py --data runs/coloc_standard/data/coloc-T-class3-n100-seed0 \
        --idx-root tests/data/mnist --variants ours,raw,whole,rts,whole+rts --seeds 3 --out ref.json
    # e() = the project's own feature CNN (a trainer checkpoint or a bare state dict):
    .venv/bin/python benchmarks/coloc_reference.py --data DIR --features RUN/checkpoints/last.pt --variants ours

Self-contained (torch, numpy, PIL and the standard library; nothing of the project is imported), as a
reference written outside the project would be:

- the images: the shard folders `python -m data_prep coloc` writes (plain tar files; each sample a
  84x84 grayscale .png and a .json whose "bbox" [x, y, w, h] is the digit's 28x28 box);
- e(): a CNN of the Table 1 shape (conv 9x9 36 - max 2 - ReLU - conv 7x7 72 - max 2 - ReLU - linear
  10, 130k parameters) trained here with a plain loop on the first --train-count digits of the IDX
  pair in --idx-root, with a fresh distortion per batch (none | translate | rts: A.3's rotation
  +-45 deg and scale 0.7-1.2, plus a random shift), or the --features state dict; its three layers'
  outputs, flattened and concatenated (each L2-normalised unless the variant says raw);
- the A.2 localisation net (conv 8 9x9 stride 4, max 2, FC 8, FC 8, FC 3 -> s, tx, ty: s = sigmoid,
  the centre tanh-bounded to keep the window inside the image), its head starting at zero weights
  and the bias of the start window (centred, side --init-scale of the image);
- the loss of A.2: L_n = max(0, ||e(T I_n) - e(T I_m)||^2 - ||e(T I_n) - e(r(I_n))||^2 + 1), m the
  next image of the batch (or, `allpos`, the mean over all others), r(I_n) a random window of
  T(I_n)'s side anywhere in image n; AdamW on the 100 images, batches drawn epoch by epoch;
- the score: the share of images whose final crop has IoU > 0.5 with the digit's box (the loss never
  reads the boxes), the initial crop's share, the mean final window side.

A variant is tokens joined by "+", applied to the project's settings ("ours": centred 28 px start,
per-layer normalised features, lr 1e-3, batch 50, 600 steps): raw, whole (start s = 0.99), none |
translate | rts (the distortion e() trains on; default: --features if given, else --base-distortion),
allpos, lowlr (1e-4), big (batch = all images), neg28 (r(I_n) always 28 px, not T(I_n)'s side),
free (a diagnostic: one free window per image, no localisation net), atdigit (free, started at the
digit's box: does the optimisation keep the digit?), and key=value for init, lr, steps, batch, margin, negative (r(I_n)'s side as a share of the image).
Every variant runs with the same seeds (the start weights and the random crops).
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import statistics
import sys
import tarfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

IMAGE, CROP, WIDTH = 84, 28, 36  # WIDTH: the Table 1 CNN's at 130k parameters (28 px)
DISTORTIONS = ("none", "translate", "rts")


@dataclass(frozen=True)
class Variant:
    name: str
    features: str = "base"     # base (--features, or trained with --base-distortion) | none | translate | rts
    normalize: bool = True
    init: float = CROP / IMAGE
    positive: str = "next"     # next: the batch rolled by one (the project's) | all: mean over the others
    lr: float = 1e-3
    steps: int = 600
    batch: int = 50
    margin: float = 1.0
    negative: float = 0.0      # r(I_n)'s side: 0 = T(I_n)'s (the project's), else this share of the image
    windows: str = "net"       # net: the A.2 localisation net | free: one (s, tx, ty) per image | atdigit: free, from the box


def parse_variant(text: str, steps: Optional[int]) -> Variant:
    v = Variant(text, steps=steps or Variant.steps)
    for token in text.split("+"):
        if token == "ours":
            continue
        if token == "raw":
            v = replace(v, normalize=False)
        elif token == "whole":
            v = replace(v, init=0.99)
        elif token in DISTORTIONS:
            v = replace(v, features=token)
        elif token == "allpos":
            v = replace(v, positive="all")
        elif token == "lowlr":
            v = replace(v, lr=1e-4)
        elif token == "big":
            v = replace(v, batch=10 ** 6)
        elif token in ("free", "atdigit"):
            v = replace(v, windows=token)
        elif token == "neg28":
            v = replace(v, negative=CROP / IMAGE)
        elif "=" in token and token.split("=")[0] in ("init", "lr", "steps", "batch", "margin", "negative"):
            key, value = token.split("=", 1)
            v = replace(v, **{key: int(value) if key in ("steps", "batch") else float(value)})
        else:
            sys.exit(f"--variants: unknown token {token!r} in {text!r}")
    return v


# ---- data ---------------------------------------------------------------------------------------

def read_idx(root: Path, kind: str) -> np.ndarray:
    paths = sorted(root.glob(f"t10k-{kind}-idx*-ubyte*")) or sorted(root.glob(f"*{kind}*idx*"))
    if not paths:
        sys.exit(f"--idx-root {root}: no MNIST {kind} IDX file")
    raw = gzip.open(paths[0]).read() if paths[0].suffix == ".gz" else paths[0].read_bytes()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_coloc(folder: Path) -> Tuple[torch.Tensor, torch.Tensor, str, int]:
    """(images (N, 1, 84, 84) in [0, 1], the digits' boxes (N, 4) [x0, y0, x1, y1] in [-1, 1], clutter, class)."""
    shards = sorted(folder.glob("train-*.tar")) or sorted(folder.glob("*.tar"))
    if not shards:
        sys.exit(f"--data {folder}: no .tar shards")
    samples: Dict[str, Dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key.split("_")[-1], {})[ext] = tar.extractfile(member).read()
    images, boxes, metas = [], [], []
    for key in sorted(samples):
        meta = json.loads(samples[key]["json"])
        images.append(np.asarray(Image.open(io.BytesIO(samples[key]["png"])).convert("L"), np.float32) / 255)
        x, y, w, h = meta["bbox"]
        boxes.append([2 * x / IMAGE - 1, 2 * y / IMAGE - 1, 2 * (x + w) / IMAGE - 1, 2 * (y + h) / IMAGE - 1])
        metas.append(meta)
    return (torch.from_numpy(np.stack(images))[:, None], torch.tensor(boxes),
            metas[0].get("clutter", "?"), int(metas[0].get("label", -1)))


# ---- e(): the feature CNN -----------------------------------------------------------------------

class FeatureCNN(nn.Module):
    """The Table 1 CNN at 28 px; the layer names of the project's checkpoints (features.0, features.3, head)."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 9), nn.MaxPool2d(2), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 7), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(2 * width * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def embed(self, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        """A.2's e(): the two conv blocks' and the logits' outputs, flattened and concatenated."""
        block1 = self.features[:3](x)
        block2 = self.features[3:6](block1)
        layers = [block1.flatten(1), block2.flatten(1), self.head(block2.flatten(1))]
        if normalize:
            layers = [F.normalize(layer, dim=1) for layer in layers]
        return torch.cat(layers, 1)


def distort(x: torch.Tensor, kind: str, shift_px: float, g: torch.Generator) -> torch.Tensor:
    """A fresh random warp of each 28 px digit: translate (a shift of up to shift_px each way) or rts
    (rotation +-45 deg, scale 0.7-1.2, the same shift)."""
    if kind == "none":
        return x
    n = len(x)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * shift_px / CROP)
    angle = torch.zeros(n)
    scale = torch.ones(n)
    if kind == "rts":
        angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(45)
        scale = 0.7 + 0.5 * torch.rand(n, generator=g)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output -> input: the inverse warp
    theta = torch.stack([torch.stack([cos, -sin, -shift[:, 0]], 1), torch.stack([sin, cos, -shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def train_features(digits: torch.Tensor, labels: torch.Tensor, test: Tuple[torch.Tensor, torch.Tensor],
                   distortion: str, steps: int, shift_px: float, seed: int = 0) -> Tuple[FeatureCNN, float]:
    """Adam, batches of 128, a fresh distortion per batch; returns the CNN and its test error (%) on distorted test digits."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cnn = FeatureCNN()
    opt = torch.optim.Adam(cnn.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(digits), (128,), generator=g)
        loss = F.cross_entropy(cnn(distort(digits[idx], distortion, shift_px, g)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    cnn.eval()
    with torch.no_grad():
        wrong = (cnn(distort(test[0], distortion, shift_px, g)).argmax(1) != test[1]).float().mean()
    return cnn.requires_grad_(False), 100 * float(wrong)


def load_features(path: str) -> FeatureCNN:
    """A state dict, or a trainer checkpoint whose "model" entry is one."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    width = state["features.0.weight"].shape[0]
    cnn = FeatureCNN(width)
    cnn.load_state_dict(state)
    return cnn.eval().requires_grad_(False)


# ---- the transformer and the loss ---------------------------------------------------------------

def bounded(raw: torch.Tensor) -> torch.Tensor:
    """(s, tx, ty) of raw (B, 3): s = sigmoid, the centre tanh-bounded to keep the window inside the image."""
    s = torch.sigmoid(raw[:, :1])
    return torch.cat([s, (1 - s) * torch.tanh(raw[:, 1:])], 1)


def raw_of(windows: torch.Tensor) -> torch.Tensor:
    s = windows[:, :1].clamp(0.01, 0.99)
    return torch.cat([torch.logit(s), torch.atanh((windows[:, 1:] / (1 - s)).clamp(-0.999, 0.999))], 1)


class Localiser(nn.Module):
    """A.2: conv 8 9x9 stride 4, max 2, FC 8, FC 8, FC 3 -> (s, tx, ty) of a window inside the image."""

    def __init__(self, init_scale: float):
        super().__init__()
        side = ((IMAGE - 9) // 4 + 1) // 2
        self.net = nn.Sequential(nn.Conv2d(1, 8, 9, stride=4), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * side * side, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        with torch.no_grad():  # every image starts at the same window: the centred one of side init_scale
            self.head.weight.zero_()
            self.head.bias.copy_(raw_of(torch.tensor([[init_scale, 0.0, 0.0]]))[0])

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return bounded(self.head(self.net(x)))


class FreeWindows(nn.Module):
    """A diagnostic, not A.2: one free window per image (no localisation net), from the given windows (N, 3)."""

    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.raw = nn.Parameter(raw_of(start))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return bounded(self.raw[idx])


def crop(x: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """The 28x28 bilinear samples of the windows (B, 3) = (s, tx, ty) in [-1, 1] image coordinates."""
    s, tx, ty = windows.unbind(1)
    zero = torch.zeros_like(s)
    theta = torch.stack([torch.stack([s, zero, tx], 1), torch.stack([zero, s, ty], 1)], 1)
    grid = F.affine_grid(theta, [len(x), 1, CROP, CROP], align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def triplet_loss(cnn: FeatureCNN, x: torch.Tensor, windows: torch.Tensor, v: Variant) -> torch.Tensor:
    anchor = cnn.embed(crop(x, windows), v.normalize)
    # r(I_n): T(I_n)'s side (or the variant's), anywhere inside image n, no gradient through it
    s = windows[:, :1].detach() if not v.negative else torch.full_like(windows[:, :1], v.negative)
    random_windows = torch.cat([s, (torch.rand(len(x), 2) * 2 - 1) * (1 - s)], 1)
    negative = cnn.embed(crop(x, random_windows), v.normalize)
    if v.positive == "all":
        pair = torch.cdist(anchor, anchor).pow(2)
        positive = pair.sum(1) / (len(x) - 1)
    else:
        positive = (anchor - anchor.roll(1, 0)).pow(2).sum(1)
    return torch.relu(positive - (anchor - negative).pow(2).sum(1) + v.margin).mean()


def window_boxes(windows: torch.Tensor) -> torch.Tensor:
    s, tx, ty = windows.unbind(1)
    return torch.stack([tx - s, ty - s, tx + s, ty + s], 1)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(1)
    area = lambda z: (z[:, 2:] - z[:, :2]).prod(1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@torch.no_grad()
def score(loc: nn.Module, x: torch.Tensor, truth: torch.Tensor) -> Dict[str, float]:
    windows = loc(x, torch.arange(len(x)))
    overlap = iou(window_boxes(windows), truth)
    return {"rate": float((overlap > 0.5).float().mean()), "mean_iou": float(overlap.mean()),
            "scale": float(windows[:, 0].mean())}


def colocalise(cnn: FeatureCNN, x: torch.Tensor, truth: torch.Tensor, v: Variant, seed: int,
               every: int = 100) -> Dict:
    """One optimisation of A.2 on the images x; the rate at the start, every `every` steps and at the end."""
    torch.manual_seed(seed)
    if v.windows == "net":
        loc: nn.Module = Localiser(v.init)
    elif v.windows == "free":
        loc = FreeWindows(torch.tensor([[v.init, 0.0, 0.0]]).repeat(len(x), 1))
    else:  # the digit's own box: is the digit a minimum the optimisation keeps?
        loc = FreeWindows(torch.cat([(truth[:, 2:3] - truth[:, :1]) / 2, (truth[:, :2] + truth[:, 2:]) / 2], 1))
    opt = torch.optim.AdamW(loc.parameters(), lr=v.lr, weight_decay=0.0)
    batch = min(v.batch, len(x))
    start, trace, order, losses = time.time(), [], torch.empty(0, dtype=torch.long), []
    trace.append({"step": 0, **score(loc, x, truth)})
    for step in range(1, v.steps + 1):
        if len(order) < batch:  # epoch by epoch, as a shuffling loader draws them
            order = torch.cat([order, torch.randperm(len(x))])
        idx, order = order[:batch], order[batch:]
        loss = triplet_loss(cnn, x[idx], loc(x[idx], idx), v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % every == 0 or step == v.steps:
            trace.append({"step": step, "loss": statistics.fmean(losses[-every:]), **score(loc, x, truth)})
    final = trace[-1]
    return {"seed": seed, "rate": final["rate"], "initial_rate": trace[0]["rate"], "scale": final["scale"],
            "mean_iou": final["mean_iou"], "loss": final["loss"], "wall_s": round(time.time() - start, 1),
            "trace": trace}


# ---- the side-by-side table ---------------------------------------------------------------------

def summarise(runs: List[Dict]) -> Dict:
    rates = [r["rate"] for r in runs]
    return {"rate_mean": statistics.fmean(rates), "rate_std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
            "rates": rates, "initial_rate": statistics.fmean(r["initial_rate"] for r in runs),
            "scale": statistics.fmean(r["scale"] for r in runs), "wall_s": sum(r["wall_s"] for r in runs)}


def format_rows(rows: List[Dict]) -> str:
    lines = ["| variant | clutter | class | seeds | IoU>0.5 rate mean +- std | per seed | initial | final scale | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary"]
        per_seed = " ".join(f"{100 * v:.0f}" for v in s["rates"])
        lines.append(f"| {r['variant']} | {r['clutter']} | {r['class']} | {len(s['rates'])} | "
                     f"{100 * s['rate_mean']:.0f} +- {100 * s['rate_std']:.0f} % | {per_seed} | "
                     f"{100 * s['initial_rate']:.0f} % | {s['scale']:.2f} | {s['wall_s']:.0f} |")
    return "\n".join(lines)


def feature_nets(variants: List[Variant], args, log) -> Dict[str, Tuple[FeatureCNN, Optional[float]]]:
    """One e() per source the variants name, trained here (cached under --cache) or loaded."""
    needed = {args.base_distortion if v.features == "base" and not args.features else v.features for v in variants}
    nets: Dict[str, Tuple[FeatureCNN, Optional[float]]] = {}
    if args.features and any(v.features == "base" for v in variants):
        nets["base"] = (load_features(args.features), None)
        needed.discard("base")
    if needed:
        images = torch.from_numpy(read_idx(Path(args.idx_root), "images").astype(np.float32) / 255)[:, None]
        labels = torch.from_numpy(read_idx(Path(args.idx_root), "labels").astype(np.int64))
        train = (images[:args.train_count], labels[:args.train_count])
        test = (images[args.train_count:], labels[args.train_count:])
    for kind in sorted(needed):
        cache = Path(args.cache) / f"cnn-{kind}-{args.feature_steps}steps-shift{args.shift_px:g}.pt" if args.cache else None
        start = time.time()
        if cache and cache.exists():
            cnn, error = load_features(str(cache)), json.loads(cache.with_suffix(".json").read_text())["test_error"]
        else:
            cnn, error = train_features(*train, test, kind, args.feature_steps, args.shift_px)
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(cnn.state_dict(), cache)
                cache.with_suffix(".json").write_text(json.dumps({"test_error": error}))
        log(f"e() trained on '{kind}' digits: test error {error:.1f} % ({time.time() - start:.0f} s)")
        nets[kind] = (cnn, error)
    if not args.features:
        nets["base"] = nets.get(args.base_distortion)
    return nets


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="data_prep coloc folders (one clutter and class each)")
    p.add_argument("--idx-root", default="tests/data/mnist", help="MNIST t10k IDX files: e() trains on the first --train-count")
    p.add_argument("--train-count", type=int, default=8000)
    p.add_argument("--features", help="e()'s weights (a state dict or a trainer checkpoint) for the 'base' variants")
    p.add_argument("--base-distortion", default="none", choices=DISTORTIONS, help="e()'s training without --features")
    p.add_argument("--feature-steps", type=int, default=400, help="e()'s training steps of 128 digits")
    p.add_argument("--shift-px", type=float, default=8.0, help="translate / rts: the largest shift of e()'s training digits")
    p.add_argument("--cache", help="a folder to keep the trained e() in (reused when the settings match)")
    p.add_argument("--variants", default="ours,raw,whole,rts,whole+rts", help="comma-separated (see the docstring)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, help="every variant's steps (default 600; a variant's steps= wins)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(t, args.steps) for t in args.variants.split(",") if t]
    if not args.features and not args.idx_root:
        sys.exit("--idx-root or --features is needed for e()")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    started = time.time()
    nets = feature_nets(variants, args, log)
    datasets = [(Path(d), *read_coloc(Path(d))) for d in args.data]
    rows = []
    for v in variants:
        cnn, error = nets[v.features]
        for folder, x, truth, clutter, digit in datasets:
            runs = [colocalise(cnn, x, truth, v, seed) for seed in range(args.seeds)]
            summary = summarise(runs)
            rows.append({"variant": v.name, "settings": v.__dict__, "feature_test_error": error, "data": str(folder),
                         "clutter": clutter, "class": digit, "summary": summary, "runs": runs})
            log(f"{v.name} {clutter} class {digit}: rate {100 * summary['rate_mean']:.0f} % "
                f"(seeds {[round(100 * r) for r in summary['rates']]}, initial {100 * summary['initial_rate']:.0f} %, "
                f"scale {summary['scale']:.2f}, {summary['wall_s']:.0f} s)")
    table = format_rows(rows)
    print(table)
    result = {"rows": rows, "table": table, "wall_s": time.time() - started, "threads": args.threads,
              "command": " ".join(sys.argv), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)
    return result


if __name__ == "__main__":
    main()
