"""Distorted digits (paper A.3): IDX files of MNIST or Fashion-MNIST -> distorted webdataset shards.

    python -m data_prep digits --idx-root /usr/share/datasets/fashion-mnist --out data/digits_rts \\
        --distortion RTS --seed 0 --limit 10000

Distortions (paper A.3; every length in pixels of the 28x28 source digit):
  R    rotation uniform in [-90, 90] degrees about the centre (> 0: clockwise on screen); 28x28.
  RTS  rotation in [-45, 45] degrees, scale in [0.7, 1.2], placed at a random location of a 42x42 image.
  P    scale in [0.75, 1.0], then each image corner moved by N(0, 5 px): a projective warp; 28x28.
  E    scale in [0.75, 1.0], then a 16-point (4x4) thin-plate spline whose control points move by
       N(0, 1.5 px); 28x28.
  TC   the digit at a random location of a 60x60 canvas with six 6x6 patches cut at random from
       other digits of the same split, placed at random.

Each sample draws its parameters from its own generator, seeded by (seed, split, index): a sample is
the same whatever --limit or --shard-size, and the test split has its own seed (--test-seed,
default seed + 1). Samples carry `png` (grayscale uint8), `cls` and `json` with the drawn parameters.
The warps run through `pipeline.models.spatial_transformer.warp`, the same sampler the models use.
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

from . import DataPrepError
from ._cli import add_job_arguments, job_options, print_summary
from .jobs import JobOptions, Plan, ShardContent, ShardSpec, chunk_specs, digest, run_plan
from .shards import encode_png, file_sha256

DISTORTIONS = ("R", "RTS", "P", "E", "TC")
OUTPUT_SIZE = {"R": 28, "RTS": 42, "P": 28, "E": 28, "TC": 60}
SPLIT_FILES = {"train": "train", "test": "t10k"}
SPLIT_IDS = {"train": 0, "test": 1}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CLUTTER_PATCHES = 6
CLUTTER_SIZE = 6
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

def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def draw_params(distortion: str, rng: np.random.Generator, num_images: int, index: int) -> Dict:
    """The random parameters of one sample (JSON-ready; lengths in source-digit pixels)."""
    if distortion == "R":
        return {"rotation_deg": float(rng.uniform(-90, 90))}
    if distortion == "RTS":
        scale = float(rng.uniform(0.7, 1.2))
        # Centre offset keeping the scaled 28x28 frame inside the 42x42 canvas.
        room = (OUTPUT_SIZE["RTS"] - 28 * scale) / 2
        return {"rotation_deg": float(rng.uniform(-45, 45)), "scale": scale,
                "center_offset_px": [float(v) for v in rng.uniform(-room, room, size=2)]}
    if distortion == "P":
        return {"scale": float(rng.uniform(0.75, 1.0)),
                "corner_shift_px": rng.normal(0.0, 5.0, size=(4, 2)).round(4).tolist()}
    if distortion == "E":
        return {"scale": float(rng.uniform(0.75, 1.0)),
                "control_shift_px": rng.normal(0.0, 1.5, size=(16, 2)).round(4).tolist()}
    if distortion == "TC":
        canvas = OUTPUT_SIZE["TC"]
        others = rng.integers(0, num_images - 1, size=CLUTTER_PATCHES)
        others = others + (others >= index)  # any digit but this one
        return {"digit_xy": [int(v) for v in rng.integers(0, canvas - 28 + 1, size=2)],
                "clutter": [{"source_index": int(src),
                             "source_xy": [int(v) for v in rng.integers(0, 28 - CLUTTER_SIZE + 1, size=2)],
                             "canvas_xy": [int(v) for v in rng.integers(0, canvas - CLUTTER_SIZE + 1, size=2)]}
                            for src in others]}
    raise DataPrepError(f"--distortion {distortion!r}: expected one of {', '.join(DISTORTIONS)}")


# ---- parameters -> sampling transforms (output coords -> input coords, normalised to [-1, 1]) ----

def _rotation(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def rotation_scale_theta(deg: float, scale: float, offset_px: Sequence[float], out_size: int) -> np.ndarray:
    """Affine theta (2,3) drawing the 28x28 digit rotated by `deg`, scaled, centred at `offset_px`."""
    # A point at output pixel offset p (from the canvas centre) reads the digit at R(-deg)(p - c) / s.
    inverse = _rotation(-deg) / scale
    to_in = (out_size / 2) / 14.0  # output normalised units -> input normalised units
    linear = inverse * to_in
    shift = -inverse @ (np.asarray(offset_px, dtype=np.float64) / 14.0)
    return np.concatenate([linear, shift[:, None]], axis=1)


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 H (H[2,2] = 1) with H @ [src, 1] ~ [dst, 1] for four point pairs (4,2)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    h = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


CORNERS = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])


def projective_theta(scale: float, corner_shift_px: Sequence[Sequence[float]]) -> np.ndarray:
    """Projective theta (3,3): the image corners, scaled about the centre, land moved by the shifts."""
    moved = CORNERS * scale + np.asarray(corner_shift_px) / 14.0
    return homography(moved, CORNERS)  # output -> input: moved corners read the original corners


def tps_theta(scale: float, control_shift_px: Sequence[Sequence[float]]) -> np.ndarray:
    """TPS theta (16,2): each control point reads the (scaled) digit from a randomly shifted place."""
    from pipeline.models.spatial_transformer import control_points

    # Scaling the source positions by 1/scale scales the whole spline: TPS reproduces linear maps.
    return (control_points(16).double().numpy() + np.asarray(control_shift_px) / 14.0) / scale


def warp_params(distortion: str, params: Dict) -> Tuple[str, np.ndarray]:
    """(warp kind, theta) of a sample's parameters, for distortions drawn by a sampler."""
    if distortion == "R":
        return "affine", rotation_scale_theta(params["rotation_deg"], 1.0, (0.0, 0.0), 28)
    if distortion == "RTS":
        return "affine", rotation_scale_theta(params["rotation_deg"], params["scale"],
                                              params["center_offset_px"], OUTPUT_SIZE["RTS"])
    if distortion == "P":
        return "projective", projective_theta(params["scale"], params["corner_shift_px"])
    if distortion == "E":
        return "tps", tps_theta(params["scale"], params["control_shift_px"])
    raise ValueError(f"distortion {distortion} is not a warp")


# ---- rendering ---------------------------------------------------------------------------------

def render_warped(images: np.ndarray, distortion: str, params: List[Dict]) -> np.ndarray:
    """Warp uint8 digits (N,28,28) bilinearly with zero padding -> (N,S,S) uint8."""
    import torch

    from pipeline.models.spatial_transformer import warp

    size = OUTPUT_SIZE[distortion]
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for start in range(0, len(images), WARP_BATCH):
        chunk = slice(start, start + WARP_BATCH)
        kinds_thetas = [warp_params(distortion, p) for p in params[chunk]]
        kind = kinds_thetas[0][0]
        theta = torch.tensor(np.stack([t for _, t in kinds_thetas]), dtype=torch.float32)
        x = torch.from_numpy(images[chunk].astype(np.float32))[:, None]
        with torch.no_grad():
            y = warp(x, theta, kind, (size, size))
        out[chunk] = y[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def render_cluttered(images: np.ndarray, params: List[Dict], sources: np.ndarray) -> np.ndarray:
    """TC: paste clutter patches from `sources` and the digit on a black canvas (max blend, so
    neither hides the other)."""
    size = OUTPUT_SIZE["TC"]
    out = np.zeros((len(images), size, size), dtype=np.uint8)
    for canvas, image, p in zip(out, images, params):
        for patch in p["clutter"]:
            sx, sy = patch["source_xy"]
            cx, cy = patch["canvas_xy"]
            piece = sources[patch["source_index"], sy:sy + CLUTTER_SIZE, sx:sx + CLUTTER_SIZE]
            region = canvas[cy:cy + CLUTTER_SIZE, cx:cx + CLUTTER_SIZE]
            np.maximum(region, piece, out=region)
        x, y = p["digit_xy"]
        region = canvas[y:y + 28, x:x + 28]
        np.maximum(region, image, out=region)
    return out


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
    if distortion == "TC":
        return render_cluttered(images, params, sources), params
    return render_warped(images, distortion, params), params


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


def _samples(distortion: str, split: str, seed: int, images: np.ndarray, labels: np.ndarray,
             start: int, stop: int) -> Iterator[Dict]:
    canvases, params = distort(images[start:stop], distortion, seed, split, first_index=start, sources=images)
    size = OUTPUT_SIZE[distortion]
    for offset, (canvas, p) in enumerate(zip(canvases, params)):
        index = start + offset
        label = int(labels[index])
        yield {"__key__": f"{split}_{index:06d}", "png": encode_png(canvas), "cls": label,
               "json": {"index": index, "split": split, "label": label, "distortion": distortion,
                        "seed": seed, "size": [size, size], "params": p}}


def prepare(opts: DigitsOptions, job: JobOptions = JobOptions()) -> Optional[Dict]:
    """Write the shards and manifest.json of one distortion; returns the manifest (None while
    other jobs' shards are missing). Resumable and split into pieces like cub and svhn (`job`)."""
    return run_plan(opts.out, make_plan(opts), build_shard, job)


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
    specs, files = [], {}
    _split_arrays.cache_clear()  # read the files as they are now, not as an earlier plan in this process saw them
    for split in ("train", "test"):
        images, _ = _split_arrays(str(root), split, limits[split])  # read and checked before anything is written
        context = {"root": str(root), "split": split, "seed": seeds[split], "limit": limits[split],
                   "distortion": opts.distortion}
        specs += chunk_specs(split, [(context, index) for index in range(len(images))], opts.shard_size)
        files.update({path.name: file_sha256(path) for path in (find_idx(root, split, kind) for kind in ("images", "labels"))})
    # the folder's identity: what decides the bytes (the IDX files' contents, not where they are)
    options = {"distortion": opts.distortion, "seeds": seeds, "limits": limits, "shard_size": opts.shard_size,
               "classes": classes}
    extra = {"task": "classification", "classes": classes, "image_size": OUTPUT_SIZE[opts.distortion],
             "distortion": opts.distortion, "seeds": seeds}
    return Plan("digits", specs, ["train", "test"], options, str(root), extra, plan_digest=digest([options, files]))


@functools.lru_cache(maxsize=2)
def _split_arrays(root: str, split: str, limit: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """load_split, once per plan and process: every shard of a split reads the same arrays (forked
    workers inherit the planning process's copy)."""
    return load_split(Path(root), split, limit)


def build_shard(spec: ShardSpec, strict: bool) -> ShardContent:
    context = spec.items[0][0]
    images, labels = _split_arrays(context["root"], context["split"], context["limit"])
    start, stop = spec.items[0][1], spec.items[-1][1] + 1
    return _samples(context["distortion"], context["split"], context["seed"], images, labels, start, stop), []


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep digits", description=__doc__.split("\n")[0])
    p.add_argument("--idx-root", required=True, help="folder with train-/t10k- images/labels IDX files (.gz or not)")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--distortion", required=True, choices=DISTORTIONS)
    p.add_argument("--seed", type=int, default=0, help="seed of the training split's distortions")
    p.add_argument("--test-seed", type=int, default=None, help="seed of the test split (default: seed + 1)")
    p.add_argument("--limit", type=int, default=None, help="use the first N training (and test) images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images (default: --limit)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    p.add_argument("--classes", default="auto", help="auto | mnist | fashion-mnist | 10 comma-separated names")
    add_job_arguments(p)
    args = p.parse_args(list(argv))
    job = job_options(args)
    opts = DigitsOptions(**{k: v for k, v in vars(args).items() if k in DigitsOptions.__dataclass_fields__})
    manifest = prepare(opts, job)
    print_summary(f"digits {opts.distortion}", manifest, opts.out)
    return 0
