"""Distorted digits (paper A.3): IDX files of MNIST or Fashion-MNIST -> distorted webdataset shards.

    # the paper's splits: train-* (training digits) and t10k-* (test digits), both distorted once
    python -m data_prep digits --idx-root DIR --out data/digits_rts --distortion RTS --seed 0 --limit 10000
    # one IDX pair split in two: its first 8,000 digits train, the rest test; training digits stay
    # undistorted, and the trainer distorts them afresh in every batch (data.distortion=RTS)
    python -m data_prep digits --idx-root tests/data/mnist --train-count 8000 --fresh-train \
        --distortion RTS --out data/mnist_rts

The distortions are those of `data_prep.distortions` (R, RTS, P, E, TC). Each stored sample draws
its parameters from its own generator, seeded by (seed, split, index): a sample is the same whatever
--limit or --shard-size, and the test split has its own seed (--test-seed, default seed + 1).
Samples carry `png` (grayscale uint8), `cls` and `json` with the drawn parameters.

--train-count N splits one IDX pair (`--source`, default: the only pair in --idx-root): the first N
digits are the training source, the others the test source; the two never share a digit, and the
split depends on N and the file only. --fresh-train stores the training digits as they are (28x28
`png` and `cls`; the key train_<i> is digit first + i of the pair, manifest "sources"): a training run then sees a new distortion of every digit each time it draws
it (`data.distortion`), as the paper's and our reference's training did, instead of one fixed
distortion per digit that a 400k-parameter network memorises in a few epochs of 8,000 digits.

--addition (paper A.1, MNIST addition): each sample is two digits of the split, each distorted
independently (its own parameters) into its own channel of one S x S image, stored as a uint8
S x S x 2 `npy`; `cls` is their sum (19 classes, "0".."18"); the second digit is drawn at random
from the split (never the sample's own digit). With --fresh-train the training split keeps single
undistorted digits, and the trainer pairs and distorts them afresh in every batch.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import DataPrepError, distortions
from ._cli import add_job_arguments, job_options, print_summary
from .distortions import CLUTTER_PATCHES, CLUTTER_SIZE, DISTORTIONS, OUTPUT_SIZE, from_records, mix_seed, to_records
from .jobs import JobOptions, Plan, ShardContent, ShardSpec, chunk_specs, digest, run_plan
from .shards import encode_npy, encode_png, file_sha256

__all__ = ["CLUTTER_PATCHES", "CLUTTER_SIZE", "DISTORTIONS", "OUTPUT_SIZE", "DigitsOptions", "prepare", "distort",
           "load_split", "read_idx", "write_idx", "write_synthetic_idx"]
SPLIT_FILES = {"train": "train", "test": "t10k"}
SPLIT_IDS = {"train": 0, "test": 1}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
MNIST_CLASSES = [str(d) for d in range(10)]
SUM_CLASSES = [str(s) for s in range(19)]  # MNIST addition: the sum of two digits
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
WARP_BATCH = 1024


@dataclass
class DigitsOptions:
    idx_root: str
    out: str
    distortion: str
    seed: int = 0
    test_seed: Optional[int] = None      # None: seed + 1
    limit: Optional[int] = None          # first N training images; None: all
    test_limit: Optional[int] = None     # first N test images; None: same as limit
    shard_size: int = 5000
    classes: str = "auto"                # auto | mnist | fashion-mnist | comma-separated names
    train_count: Optional[int] = None    # split one IDX pair: its first N digits train, the rest test
    source: str = "auto"                 # the pair --train-count splits: auto | train | t10k
    fresh_train: bool = False            # store the training digits undistorted (the trainer distorts them)
    addition: bool = False               # two digits a sample, one per channel, labelled with their sum (A.1)


# ---- IDX files ---------------------------------------------------------------------------------

def find_idx(root: Path, split: str, kind: str) -> Path:
    """The IDX file of `split` (train|test) and `kind` (images|labels), plain or gzipped."""
    dims = 3 if kind == "images" else 1
    stem = f"{SPLIT_FILES[split]}-{kind}"
    for name in (f"{stem}-idx{dims}-ubyte", f"{stem}.idx{dims}-ubyte"):
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataPrepError(f"{root / (stem + f'-idx{dims}-ubyte')}[.gz]: IDX file not found "
                        f"(expected {stem}-idx{dims}-ubyte or its .gz in --idx-root)")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX array (http://yann.lecun.com/exdb/mnist/ format): big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataPrepError(f"{path}: cannot read IDX file: {err}") from None
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        found = f"0x{int.from_bytes(data[:4], 'big'):08x}" if len(data) >= 4 else "nothing"
        raise DataPrepError(f"{path}: wrong magic number {found}; expected 0x{magic:08x} "
                            f"({magic & 0xFF}-dimensional unsigned-byte IDX)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise DataPrepError(f"{path}: {len(data) - header} data bytes, but the header says shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_split(root: Path, split: str, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N,28,28) uint8, labels (N,) uint8) of one split, the first `limit` of them."""
    images_path = find_idx(root, split, "images")
    labels_path = find_idx(root, split, "labels")
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataPrepError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}; expected 28x28")
    if len(images) != len(labels):
        raise DataPrepError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    if labels.size and labels.max() > 9:
        raise DataPrepError(f"{labels_path}: label {int(labels.max())} out of range 0-9")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz); for tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_synthetic_idx(root: str | Path, num_train: int = 64, num_test: int = 32, seed: int = 0) -> Path:
    """A tiny IDX dataset of digit-like strokes (class k: a bar at 18k degrees, off-centre blob) in
    the MNIST file layout, for tests and smoke runs where no real IDX files are at hand."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:28, 0:28] - 13.5
    for split, count in (("train", num_train), ("test", num_test)):
        labels = rng.integers(0, 10, size=count).astype(np.uint8)
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        for image, label in zip(images, labels):
            a = math.radians(18.0 * label + rng.normal(0, 4))
            along, across = xs * math.cos(a) + ys * math.sin(a), -xs * math.sin(a) + ys * math.cos(a)
            bar = (np.abs(across) < 1.8) & (np.abs(along) < 9)
            blob = (along - 6) ** 2 + (across - 5) ** 2 < 6
            image[bar | blob] = 255
        write_idx(root / f"{SPLIT_FILES[split]}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{SPLIT_FILES[split]}-labels-idx1-ubyte", labels)
    return root


# ---- drawing the distortion parameters ---------------------------------------------------------

def sample_rng(seed: int, split: str, index: int) -> torch.Generator:
    """The generator of one stored sample: its distortion depends on (seed, split, index) only."""
    return torch.Generator().manual_seed(mix_seed(seed, SPLIT_IDS[split], index))


def draw_params(distortion: str, rng: torch.Generator, num_images: int, index: int) -> Dict:
    """The random parameters of one sample (JSON-ready; lengths in source-digit pixels)."""
    try:
        return to_records(distortions.draw(distortion, 1, rng, num_sources=num_images, first_index=index))[0]
    except ValueError as err:
        raise DataPrepError(f"--distortion {distortion!r}: {err}") from None


def distort(images: np.ndarray, distortion: str, seed: int, split: str,
            first_index: int = 0, sources: Optional[np.ndarray] = None) -> Tuple[np.ndarray, List[Dict]]:
    """Distort `images` (the split's images from `first_index` on) -> (uint8 (N,S,S), parameters).

    `sources` is the whole split (TC's clutter comes from it); default: `images`.
    """
    if distortion not in DISTORTIONS:
        raise DataPrepError(f"--distortion {distortion!r}: expected one of {', '.join(DISTORTIONS)}")
    sources = images if sources is None else sources
    if distortion == "TC" and len(sources) < 2:
        raise DataPrepError("TC needs at least 2 images per split (clutter comes from other digits)")
    params = [draw_params(distortion, sample_rng(seed, split, first_index + i), len(sources), first_index + i)
              for i in range(len(images))]
    return _render(images, distortion, params, sources)


def _render(images: np.ndarray, distortion: str, params: List[Dict], sources: np.ndarray) -> Tuple[np.ndarray, List[Dict]]:
    """uint8 (N, S, S): each digit distorted with its recorded parameters, in batches."""
    out = np.empty((len(images), OUTPUT_SIZE[distortion], OUTPUT_SIZE[distortion]), dtype=np.uint8)
    source_tensor = torch.tensor(sources) if distortion == "TC" else None  # a copy: IDX arrays are read-only
    for start in range(0, len(images), WARP_BATCH):
        chunk = slice(start, start + WARP_BATCH)
        out[chunk] = distortions.render(torch.tensor(images[chunk]), distortion, from_records(params[chunk]),
                                        source_tensor).numpy()
    return out, params


def distort_pairs(images: np.ndarray, distortion: str, seed: int, split: str, first_index: int,
                  sources: np.ndarray) -> Tuple[np.ndarray, List[Dict]]:
    """MNIST addition: sample i pairs digit first_index + i of `sources` (the split) with another digit of
    the split drawn at random, each distorted with its own parameters into its own channel ->
    (uint8 (N, S, S, 2), per sample {"partner": index, "params": [first's, second's]})."""
    if len(sources) < 2:
        raise DataPrepError("--addition needs at least 2 digits per split (each sample pairs two)")
    partners, first_params, second_params = [], [], []
    for i in range(len(images)):
        index = first_index + i
        rng = sample_rng(seed, split, index)
        other = int(torch.randint(0, len(sources) - 1, (1,), generator=rng))
        partners.append(other + (other >= index))  # any digit but this one
        first_params.append(draw_params(distortion, rng, len(sources), index))
        second_params.append(draw_params(distortion, rng, len(sources), partners[-1]))
    first, _ = _render(images, distortion, first_params, sources)
    second, _ = _render(sources[partners], distortion, second_params, sources)
    return np.stack([first, second], -1), [{"partner": j, "params": [a, b]}
                                           for j, a, b in zip(partners, first_params, second_params)]


# ---- the command -------------------------------------------------------------------------------

def class_names(option: str, root: Path) -> List[str]:
    if option == "auto":
        return FASHION_CLASSES if "fashion" in str(root.resolve()).lower() else MNIST_CLASSES
    if option == "mnist":
        return MNIST_CLASSES
    if option == "fashion-mnist":
        return FASHION_CLASSES
    names = [n.strip() for n in option.split(",")]
    if len(names) != 10 or not all(names):
        raise DataPrepError(f"--classes {option!r}: expected auto, mnist, fashion-mnist or 10 comma-separated names")
    return names


def _samples(distortion: Optional[str], split: str, seed: int, images: np.ndarray, labels: np.ndarray,
             start: int, stop: int, first_source_index: int, addition: bool = False) -> Iterator[Dict]:
    """Samples start..stop-1 of a split; distortion None stores the digits as they are (--fresh-train);
    `addition` pairs each digit with another one of the split (`distort_pairs`)."""
    if distortion is None:
        canvases, params = images[start:stop], [None] * (stop - start)
    elif addition:
        canvases, params = distort_pairs(images[start:stop], distortion, seed, split, start, images)
    else:
        canvases, params = distort(images[start:stop], distortion, seed, split, first_index=start, sources=images)
    for offset, (canvas, p) in enumerate(zip(canvases, params)):
        index = start + offset
        label = int(labels[index])
        sample = {"__key__": f"{split}_{index:06d}", "png": encode_png(canvas), "cls": label}
        if distortion is not None:  # an undistorted digit needs no record: the key and manifest "sources" locate it
            sample["json"] = {"index": index, "source_index": first_source_index + index, "split": split,
                              "label": label, "distortion": distortion, "seed": seed, "size": list(canvas.shape),
                              "params": p}
        if distortion is not None and addition:
            partner = p["partner"]
            del sample["png"]
            sample["npy"], sample["cls"] = encode_npy(canvas), label + int(labels[partner])
            sample["json"] |= {"label": sample["cls"], "digits": [label, int(labels[partner])],
                               "source_index": [first_source_index + index, first_source_index + partner],
                               "partner": partner, "params": p["params"]}
        yield sample


def prepare(opts: DigitsOptions, job: JobOptions = JobOptions()) -> Optional[Dict]:
    """Write the shards and manifest.json of one distortion; returns the manifest (None while
    other jobs' shards are missing). Resumable and split into pieces like cub and svhn (`job`)."""
    return run_plan(opts.out, make_plan(opts), build_shard, job)


def split_sources(opts: DigitsOptions, root: Path) -> Dict[str, Tuple[str, int, Optional[int]]]:
    """split -> (IDX pair, first digit, end digit or None): the paper's two pairs, or one pair cut at
    --train-count (its first N digits train, the rest test: disjoint by construction)."""
    if opts.train_count is None:
        if opts.source != "auto":
            raise DataPrepError(f"--source {opts.source}: only with --train-count (it names the pair to split)")
        return {"train": ("train", 0, None), "test": ("test", 0, None)}
    present = [split for split in ("train", "test") if _has_pair(root, split)]
    if opts.source != "auto":
        pair = "test" if opts.source == "t10k" else opts.source
    elif len(present) == 1:
        pair = present[0]
    else:
        raise DataPrepError(f"--idx-root {root}: --train-count splits one IDX pair, and "
                            f"{'both train-* and t10k-*' if present else 'none'} are there; "
                            "--source train|t10k names the one to split")
    total = len(read_idx(find_idx(root, pair, "labels"), IDX_LABELS_MAGIC))
    if not 0 < opts.train_count < total:
        raise DataPrepError(f"--train-count {opts.train_count}: must be between 1 and {total - 1} "
                            f"({find_idx(root, pair, 'labels')} holds {total} digits)")
    return {"train": (pair, 0, opts.train_count), "test": (pair, opts.train_count, None)}


def _has_pair(root: Path, split: str) -> bool:
    try:
        return bool(find_idx(root, split, "images") and find_idx(root, split, "labels"))
    except DataPrepError:
        return False


def make_plan(opts: DigitsOptions) -> Plan:
    """Check the options and read the IDX files (nothing is written), then cut each split into shards."""
    if opts.distortion not in DISTORTIONS:
        raise DataPrepError(f"--distortion {opts.distortion!r}: expected one of {', '.join(DISTORTIONS)}")
    if opts.shard_size < 1:
        raise DataPrepError(f"--shard-size {opts.shard_size}: must be at least 1")
    root = Path(opts.idx_root)
    if not root.is_dir():
        raise DataPrepError(f"--idx-root {root}: not a directory")
    root = root.resolve()
    test_seed = opts.seed + 1 if opts.test_seed is None else opts.test_seed
    if test_seed == opts.seed:
        raise DataPrepError(f"--test-seed {test_seed}: must differ from --seed so the splits are distorted apart")
    classes = class_names(opts.classes, root)
    limits = {"train": opts.limit, "test": opts.limit if opts.test_limit is None else opts.test_limit}
    seeds = {"train": opts.seed, "test": test_seed}
    sources = split_sources(opts, root)
    specs, files = [], {}
    _split_arrays.cache_clear()  # read the files as they are now, not as an earlier plan in this process saw them
    for split in ("train", "test"):
        pair, first, end = sources[split]
        images, _ = _split_arrays(str(root), pair, first, end, limits[split])  # read and checked before anything is written
        stored = None if split == "train" and opts.fresh_train else opts.distortion
        context = {"root": str(root), "split": split, "seed": seeds[split], "pair": pair, "first": first, "end": end,
                   "limit": limits[split], "distortion": stored, "addition": opts.addition}
        specs += chunk_specs(split, [(context, index) for index in range(len(images))], opts.shard_size)
        files.update({path.name: file_sha256(path) for path in (find_idx(root, pair, kind) for kind in ("images", "labels"))})
    # the folder's identity: what decides the bytes (the IDX files' contents, not where they are)
    if opts.addition:
        classes = SUM_CLASSES if opts.classes in ("auto", "mnist") else None
        if classes is None:
            raise DataPrepError(f"--classes {opts.classes!r}: --addition labels a sample with the sum of its two "
                                "digits (classes 0..18); use it with MNIST digits (--classes auto or mnist)")
    options = {"distortion": opts.distortion, "seeds": seeds, "limits": limits, "shard_size": opts.shard_size,
               "classes": classes, "sources": sources, "fresh_train": opts.fresh_train, "addition": opts.addition}
    extra = {"task": "classification", "classes": classes, "image_size": OUTPUT_SIZE[opts.distortion],
             "channels": 2 if opts.addition else 1, "addition": opts.addition,
             "distortion": opts.distortion, "seeds": seeds,
             "train_distortion": "fresh" if opts.fresh_train else "stored",
             "sources": {split: {"idx": SPLIT_FILES[pair], "first": first, "end": end}
                         for split, (pair, first, end) in sources.items()}}
    return Plan("digits", specs, ["train", "test"], options, str(root), extra, plan_digest=digest([options, files]))


@functools.lru_cache(maxsize=4)
def _split_arrays(root: str, pair: str, first: int, end: Optional[int],
                  limit: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Digits first..end-1 of an IDX pair, the first `limit` of them; read once per plan and process
    (every shard of a split reads the same arrays; forked workers inherit the planner's copy)."""
    images, labels = load_split(Path(root), pair)
    images, labels = images[first:end], labels[first:end]
    return (images[:limit], labels[:limit]) if limit is not None else (images, labels)


def build_shard(spec: ShardSpec, strict: bool) -> ShardContent:
    c = spec.items[0][0]
    images, labels = _split_arrays(c["root"], c["pair"], c["first"], c["end"], c["limit"])
    start, stop = spec.items[0][1], spec.items[-1][1] + 1
    return _samples(c["distortion"], c["split"], c["seed"], images, labels, start, stop, c["first"],
                    c.get("addition", False)), []


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep digits", description=__doc__.split("\n")[0])
    p.add_argument("--idx-root", required=True, help="folder with train-/t10k- images/labels IDX files (.gz or not)")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--distortion", required=True, choices=DISTORTIONS)
    p.add_argument("--seed", type=int, default=0, help="seed of the training split's distortions")
    p.add_argument("--test-seed", type=int, default=None, help="seed of the test split (default: seed + 1)")
    p.add_argument("--limit", type=int, default=None, help="use the first N training (and test) images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images (default: --limit)")
    p.add_argument("--train-count", type=int, default=None,
                   help="split one IDX pair: its first N digits are the training split, the rest the test split")
    p.add_argument("--source", default="auto", choices=("auto", "train", "t10k"),
                   help="the IDX pair --train-count splits (auto: the only pair in --idx-root)")
    p.add_argument("--fresh-train", action="store_true",
                   help="store the training digits undistorted; training distorts them afresh (data.distortion)")
    p.add_argument("--addition", action="store_true",
                   help="MNIST addition (paper A.1): two digits a sample, each distorted into its own channel, "
                        "labelled with their sum (19 classes)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    p.add_argument("--classes", default="auto", help="auto | mnist | fashion-mnist | 10 comma-separated names")
    add_job_arguments(p)
    args = p.parse_args(list(argv))
    job = job_options(args)
    opts = DigitsOptions(**{k: v for k, v in vars(args).items() if k in DigitsOptions.__dataclass_fields__})
    manifest = prepare(opts, job)
    print_summary(f"digits {opts.distortion}", manifest, opts.out)
    return 0
