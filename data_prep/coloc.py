"""Co-localisation digits (paper A.2, Table 5): one MNIST digit at a random place of an 84x84 image.

    python -m data_prep coloc --idx-root tests/data/mnist --train-count 8000 --classes 3 --count 100 \
        --clutter TC --seed 0 --out data/coloc_TC_3

For each class of --classes, the first --count digits of that class in the *test source* of the IDX
pair (digits --train-count.. of it, as `data_prep digits --train-count` cuts it: the feature CNN of
the co-localisation loss trains on the first --train-count digits and never sees these), each
pasted at a uniform random integer place of a black 84x84 image:

  T    the digit alone;
  TC   first 16 random 6x6 crops of other digits of the test source (any digit but this one; a crop
       anywhere in the 28x28 frame, as `data_prep digits`' TC draws them, so some are blank) at
       random places, then the digit, blended with max so neither hides the other.

Every sample draws from its own generator seeded by (seed, clutter, index): the same options give
the same bytes, whatever --shard-size. A sample carries `png` (84x84 grayscale), `cls` (the digit)
and `json`: "bbox" [x, y, w, h] in pixels = the digit's 28x28 frame (the box Table 5 scores a
crop against, as CUB's boxes are the object's), "ink_bbox" the tight box of its non-zero pixels,
the source digit's index in the IDX pair and the drawn parameters.

Co-localisation is transductive: a model is optimised on the images and scored on the same images.
The manifest says so ("transductive": true) and lists the same samples as both split "train" and
split "test" (the training loader draws from one, the exactly-once evaluation reads the other; the
ground-truth boxes are only read by the evaluation). One folder holds one (class set, T/TC); a
co-localisation model is trained per class, so `python -m pipeline.experiments coloc` writes one
folder per (class, T/TC) with a single --classes value each: no class filter is needed anywhere.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import DataPrepError
from ._cli import add_job_arguments, job_options, print_summary
from .digits import MNIST_CLASSES, DigitsOptions, _split_arrays, find_idx, split_sources
from .distortions import CLUTTER_SIZE, SOURCE_SIZE, mix_seed
from .jobs import JobOptions, Plan, ShardContent, ShardSpec, chunk_specs, digest, run_plan
from .shards import encode_png, file_sha256

IMAGE_SIZE = 84
CLUTTER = ("T", "TC")
CLUTTER_PIECES = 16  # paper A.2: 16 random 6x6 crops
CLUTTER_IDS = {"T": 0, "TC": 1}


@dataclass
class ColocOptions:
    idx_root: str
    out: str
    clutter: str = "T"
    classes: str = "0,1,2,3,4,5,6,7,8,9"  # digits, comma-separated
    count: int = 100                       # images per class
    seed: int = 0
    train_count: int = 8000                # digits before this one of the pair train the feature CNN
    source: str = "auto"                   # the IDX pair: auto | train | t10k
    shard_size: int = 1000


def parse_classes(text: str) -> List[int]:
    try:
        digits = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        digits = []
    if not digits or any(not 0 <= d <= 9 for d in digits) or len(set(digits)) != len(digits):
        raise DataPrepError(f"--classes {text!r}: expected distinct comma-separated digits 0-9, e.g. 3,5,8")
    return digits


def draw(seed: int, clutter: str, index: int, num_sources: int, own: int) -> Dict:
    """The random parameters of sample `index` (JSON-ready): where the digit goes, and TC's clutter
    (source digit != `own`, top-left of the crop in it, top-left on the canvas)."""
    g = torch.Generator().manual_seed(mix_seed(seed, CLUTTER_IDS[clutter], index))
    params: Dict = {"digit_xy": torch.randint(0, IMAGE_SIZE - SOURCE_SIZE + 1, (2,), generator=g).tolist()}
    if clutter == "TC":
        others = torch.randint(0, num_sources - 1, (CLUTTER_PIECES,), generator=g)
        sources = others + (others >= own)  # any digit but this one
        crop_xy = torch.randint(0, SOURCE_SIZE - CLUTTER_SIZE + 1, (CLUTTER_PIECES, 2), generator=g)
        canvas_xy = torch.randint(0, IMAGE_SIZE - CLUTTER_SIZE + 1, (CLUTTER_PIECES, 2), generator=g)
        params["clutter"] = [{"source_index": int(s), "source_xy": c.tolist(), "canvas_xy": p.tolist()}
                             for s, c, p in zip(sources, crop_xy, canvas_xy)]
    return params


def render(digit: np.ndarray, params: Dict, sources: np.ndarray) -> np.ndarray:
    """uint8 (84, 84): the clutter crops, then the digit, max-blended on black."""
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    pieces = [(sources[c["source_index"]][c["source_xy"][1]:c["source_xy"][1] + CLUTTER_SIZE,
                                          c["source_xy"][0]:c["source_xy"][0] + CLUTTER_SIZE], c["canvas_xy"])
              for c in params.get("clutter", [])]
    for piece, (x, y) in pieces + [(digit, params["digit_xy"])]:
        window = canvas[y:y + piece.shape[0], x:x + piece.shape[1]]
        np.maximum(window, piece, out=window)
    return canvas


def ink_bbox(digit: np.ndarray, x: int, y: int) -> List[int]:
    """[x, y, w, h] of the digit's non-zero pixels placed at (x, y)."""
    rows, cols = np.nonzero(digit)
    return [x + int(cols.min()), y + int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)]


def chosen_digits(labels: np.ndarray, classes: Sequence[int], count: int, where: str) -> List[int]:
    """Indices (within the test source) of the first `count` digits of each class, class by class."""
    picked = []
    for c in classes:
        found = np.flatnonzero(labels == c)
        if len(found) < count:
            raise DataPrepError(f"--count {count}: the test source of {where} holds only {len(found)} digits of class {c}")
        picked += found[:count].tolist()
    return picked


def make_plan(opts: ColocOptions) -> Plan:
    """Check the options and read the IDX pair (nothing is written), then cut both splits into shards."""
    if opts.clutter not in CLUTTER:
        raise DataPrepError(f"--clutter {opts.clutter!r}: expected one of {', '.join(CLUTTER)}")
    if opts.count < 2:
        raise DataPrepError(f"--count {opts.count}: must be at least 2 (the loss pairs each image with another)")
    classes = parse_classes(opts.classes)
    root = Path(opts.idx_root)
    if not root.is_dir():
        raise DataPrepError(f"--idx-root {root}: not a directory")
    root = root.resolve()
    # the test source exactly as `data_prep digits --train-count` cuts it
    sources = split_sources(DigitsOptions(idx_root=str(root), out=opts.out, distortion="R", train_count=opts.train_count,
                                          source=opts.source), root)
    pair, first, end = sources["test"]
    _split_arrays.cache_clear()
    _, labels = _split_arrays(str(root), pair, first, end, None)
    picked = chosen_digits(labels, classes, opts.count, f"{root} ({pair}, digits {first}..)")
    context = {"root": str(root), "pair": pair, "first": first, "end": end, "seed": opts.seed, "clutter": opts.clutter}
    items = [(context, i, source) for i, source in enumerate(picked)]
    specs = chunk_specs("train", items, opts.shard_size) + chunk_specs("test", items, opts.shard_size)
    files = {p.name: file_sha256(p) for p in (find_idx(root, pair, kind) for kind in ("images", "labels"))}
    options = {"clutter": opts.clutter, "classes": classes, "count": opts.count, "seed": opts.seed,
               "test_source": [pair, first, end], "shard_size": opts.shard_size}
    extra = {"task": "colocalisation", "classes": MNIST_CLASSES, "image_size": IMAGE_SIZE, "clutter": opts.clutter,
             "digit_classes": classes, "transductive": True, "seed": opts.seed,
             "sources": {"idx": "t10k" if pair == "test" else pair, "first": first, "end": end}}
    return Plan("coloc", specs, ["train", "test"], options, str(root), extra, plan_digest=digest([options, files]))


def build_shard(spec: ShardSpec, strict: bool) -> ShardContent:
    c = spec.items[0][0]
    images, labels = _split_arrays(c["root"], c["pair"], c["first"], c["end"], None)
    return _samples(spec.split, spec.items, images, labels), []


def _samples(split: str, items: Sequence[Tuple[Dict, int, int]], images: np.ndarray,
             labels: np.ndarray) -> Iterator[Dict]:
    for c, index, source in items:
        params = draw(c["seed"], c["clutter"], index, len(images), source)
        canvas = render(images[source], params, images)
        x, y = params["digit_xy"]
        label = int(labels[source])
        yield {"__key__": f"{split}_{index:06d}", "png": encode_png(canvas), "cls": label,
               "json": {"index": index, "source_index": c["first"] + source, "label": label, "clutter": c["clutter"],
                        "seed": c["seed"], "size": [IMAGE_SIZE, IMAGE_SIZE], "bbox": [x, y, SOURCE_SIZE, SOURCE_SIZE],
                        "ink_bbox": ink_bbox(images[source], x, y), "params": params}}


def prepare(opts: ColocOptions, job: JobOptions = JobOptions()) -> Optional[Dict]:
    """Write the shards and manifest.json; returns the manifest (None while other jobs' shards are missing)."""
    return run_plan(opts.out, make_plan(opts), build_shard, job)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep coloc", description=__doc__.split("\n")[0])
    p.add_argument("--idx-root", required=True, help="folder with the MNIST IDX files (.gz or not)")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--clutter", default="T", choices=CLUTTER, help="T: the digit alone; TC: 16 6x6 clutter crops too")
    p.add_argument("--classes", default=ColocOptions.classes, help="comma-separated digits (default: all ten)")
    p.add_argument("--count", type=int, default=100, help="images per class (paper: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the places and the clutter")
    p.add_argument("--train-count", type=int, default=8000,
                   help="the IDX pair's first N digits train the feature CNN; the images come from the rest")
    p.add_argument("--source", default="auto", choices=("auto", "train", "t10k"),
                   help="the IDX pair --train-count splits (auto: the only pair in --idx-root)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    add_job_arguments(p)
    args = p.parse_args(list(argv))
    job = job_options(args)
    opts = ColocOptions(**{k: v for k, v in vars(args).items() if k in ColocOptions.__dataclass_fields__})
    manifest = prepare(opts, job)
    print_summary(f"coloc {opts.clutter}", manifest, opts.out)
    return 0
