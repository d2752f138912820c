"""SVHN (Street View House Numbers) -> webdataset shards, format 1 (digit sequences) or 2 (32x32 digits).

    python -m data_prep svhn --root data/svhn --split train+extra,test --val-from-train 5000 --out shards/svhn

`--root` holds what the download unpacks to: `train/`, `test/`, `extra/` (format 1: N.png +
digitStruct.mat, MATLAB v7.3) and/or `train_32x32.mat` ... (format 2, MATLAB v5).

`--split`: comma-separated output splits; `a+b` merges sources into one split named after the
first (`train+extra` is the paper's training set). `--val-from-train K` moves K train images
(a seeded random choice, `--seed`) into a `val` split.

Format 1 sample (following Goodfellow et al. 2014, as the STN paper does): the union box of the
digits (each clamped to the image), grown by 30% in x and y, clamped to the image, resized to
64x64. `--size 128` grows the box twice as much again and resizes to 128x128: the digits keep
their 64-crop resolution with more background around them (the paper's looser crops).
`png` (RGB crop) + `json` {"id", "name", "digits" [0-9 each], "length", "boxes" [[x, y, w, h]
in crop pixels], "source" (raw split), "crop" [x0, y0, x1, y1] in the original image}.
Sequences of more than 5 digits are left out and listed in manifest "skipped".
Format 2 sample: `png` 32x32 RGB, `cls` (0-9) and `json` {"id", "index", "digits", "length": 1, "source"}.
"""
from __future__ import annotations

import argparse
import io
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from . import DataPrepError
from ._cli import add_job_arguments, job_kwargs, print_summary
from .contract import BadImage, check_image
from .jobs import ExistsCheck, JobOptions, Plan, ShardContent, ShardSpec, chunk_specs, digest, run_plan
from .shards import encode_png

SOURCES = ("train", "test", "extra")
SIZES = (64, 128)
MAX_DIGITS = 5
EXPAND = 1.3  # Goodfellow et al.: the union box grown by 30% in x and y
MAX_SHARD_SIZE = 1000
MIN_TRAIN_SHARDS = 64
# A small set gets fewer shards rather than one-sample ones (each costs a tar header, an open and a
# draw of the resampler; training resamples shards, so no rank needs a shard of its own).
MIN_SHARD_SIZE = 16
FIELDS = ("left", "top", "width", "height", "label")


@dataclass(frozen=True)
class SvhnOptions:
    """What goes into the output (the folder's identity)."""

    splits: Tuple[Tuple[str, Tuple[str, ...]], ...]  # (output split, raw sources)
    size: int = 64
    val_from_train: int = 0
    seed: int = 0
    limit: Optional[int] = None  # at most this many entries per raw source (the first ones)
    shard_size: int = MAX_SHARD_SIZE
    skip_missing: bool = False
    formats: Tuple[Tuple[str, int], ...] = ()  # raw source -> 1 or 2, as found


def prepare(root: str | Path, out: str | Path, split: Any = "train", size: int = 64, val_from_train: int = 0,
            seed: int = 0, limit: Optional[int] = None, shard_size: Optional[int] = None, fmt: str = "auto",
            workers: int = 1, num_jobs: int = 1, job_index: Optional[int] = None, finalize: bool = True,
            overwrite: bool = False, skip_missing: bool = False, strict: bool = False,
            finalize_only: bool = False) -> Optional[Dict[str, Any]]:
    """Write SVHN shards + manifest into `out`; returns the manifest (None if other jobs' shards are missing).

    `split`: "train+extra,test", or a list of such strings.
    """
    plan = make_plan(root, split=split, size=size, val_from_train=val_from_train, seed=seed, limit=limit,
                     shard_size=shard_size, fmt=fmt, skip_missing=skip_missing)
    opts = JobOptions(workers=workers, num_jobs=num_jobs, job_index=job_index, finalize=finalize,
                      finalize_only=finalize_only, overwrite=overwrite, strict=strict)
    return run_plan(out, plan, build_shard, opts)


def parse_splits(spec: Any) -> List[Tuple[str, Tuple[str, ...]]]:
    """'train+extra,test' (or a list of such strings) -> [("train", ("train", "extra")), ("test", ("test",))]."""
    texts = [spec] if isinstance(spec, str) else list(spec)
    groups, seen = [], set()
    for text in texts:
        for group in str(text).split(","):
            sources = tuple(s.strip() for s in group.split("+") if s.strip())
            if not sources:
                raise DataPrepError(f"--split: empty split in {text!r}")
            for source in sources:
                if source not in SOURCES:
                    raise DataPrepError(f"--split: unknown split {source!r}; expected {', '.join(SOURCES)}")
                if source in seen:
                    raise DataPrepError(f"--split: {source!r} given twice")
                seen.add(source)
            groups.append((sources[0], sources))
    return groups


def find_format(root: Path, source: str, fmt: str) -> Tuple[int, Path]:
    """(1, <root>/<source>/digitStruct.mat) or (2, <root>/<source>_32x32.mat), whichever is there."""
    one, two = root / source / "digitStruct.mat", root / f"{source}_32x32.mat"
    if fmt in ("auto", "1") and one.is_file():
        return 1, one
    if fmt in ("auto", "2") and two.is_file():
        return 2, two
    wanted = {"auto": f"{one} (format 1) or {two} (format 2)", "1": str(one), "2": str(two)}[fmt]
    raise DataPrepError(f"{wanted}: not found for split {source!r}")


def make_plan(root: str | Path, split: Any = "train", size: int = 64, val_from_train: int = 0, seed: int = 0,
              limit: Optional[int] = None, shard_size: Optional[int] = None, fmt: str = "auto",
              skip_missing: bool = False) -> Plan:
    """Check the inputs and list every sample of every output split (nothing is written)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataPrepError(f"{root}: SVHN root folder not found")
    if size not in SIZES:
        raise DataPrepError(f"--size must be one of {SIZES}, got {size}")
    if fmt not in ("auto", "1", "2"):
        raise DataPrepError(f"--format must be auto, 1 or 2, got {fmt!r}")
    if limit is not None and limit < 1:
        raise DataPrepError(f"--limit must be >= 1, got {limit}")
    groups = parse_splits(split)
    sources = [s for _, group in groups for s in group]
    if val_from_train and "train" not in sources:
        raise DataPrepError("--val-from-train needs 'train' among --split")
    formats = {s: find_format(root, s, fmt) for s in sources}
    if len({f for f, _ in formats.values()}) > 1:  # 32x32 single digits and sequence crops differ in kind
        found = ", ".join(f"{s}: format {f}" for s, (f, _) in formats.items())
        raise DataPrepError(f"--split mixes SVHN formats ({found}); pass --format 1 or 2, or use separate --out folders")
    entries = {s: _list_entries(root, s, *formats[s], limit) for s in sources}
    val_keys = set()
    if val_from_train:
        train = entries["train"]
        if not 0 < val_from_train < len(train):
            raise DataPrepError(f"--val-from-train {val_from_train}: train has {len(train)} entries")
        val_keys = {e["key"] for e in random.Random(seed).sample(train, val_from_train)}
    out_splits: List[Tuple[str, List[Dict[str, Any]]]] = []
    for name, group in groups:
        items = [e for s in group for e in entries[s] if e["key"] not in val_keys]
        out_splits.append((name, items))
        if "train" in group and val_keys:
            out_splits.append(("val", [e for e in entries["train"] if e["key"] in val_keys]))
    skipped = []
    exists = ExistsCheck(str(root))
    for name, items in out_splits:
        present = []
        for e in items:
            if e["format"] == 1 and not exists(f"{e['source']}/{e['name']}"):
                if not skip_missing:
                    raise DataPrepError(f"{root / e['source'] / e['name']}: image of entry {e['index'] + 1} in "
                                        "digitStruct.mat is missing (pass --skip-missing to leave it out)")
                skipped.append({"key": e["key"], "reason": f"missing: {e['source']}/{e['name']}"})
                continue
            present.append(e)
        items[:] = present
    if shard_size is None:
        largest = max(len(items) for _, items in out_splits)
        shard_size = max(MIN_SHARD_SIZE, min(MAX_SHARD_SIZE, largest // MIN_TRAIN_SHARDS))
    options = SvhnOptions(tuple((n, tuple(g)) for n, g in groups), size, val_from_train, seed, limit,
                          shard_size, skip_missing, tuple((s, formats[s][0]) for s in sources))
    context = {"root": str(root), "size": size}
    specs = [spec for name, items in out_splits
             for spec in chunk_specs(name, [(context, e) for e in items], shard_size)]
    all_format2 = formats[sources[0]][0] == 2
    extra = {"task": "classification" if all_format2 else "sequence",
             "classes": [str(d) for d in range(10)], "max_length": 1 if all_format2 else MAX_DIGITS,
             "image_size": 32 if all_format2 else size}
    # the root is not part of the identity; format-2 pixels are summarised by the files' sizes
    files = {s: formats[s][1].stat().st_size for s in sources}
    plan_digest = digest([[[s.split, s.index, [_public(e) for _, e in s.items]] for s in specs], skipped, files])
    return Plan("svhn", specs, [name for name, _ in out_splits], asdict(options), str(root), extra, skipped,
                plan_digest=plan_digest)


def _public(entry: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "pixels"}


def _list_entries(root: Path, source: str, fmt: int, path: Path, limit: Optional[int]) -> List[Dict[str, Any]]:
    if fmt == 1:
        names = read_names(path)
        count = len(names) if limit is None else min(limit, len(names))
        return [{"key": f"{source}_{i + 1:06d}", "source": source, "index": i, "name": names[i], "format": 1}
                for i in range(count)]
    pixels, labels = read_format2(path)
    count = len(labels) if limit is None else min(limit, len(labels))
    return [{"key": f"{source}_{i + 1:06d}", "source": source, "index": i, "format": 2,
             "digit": labels[i], "pixels": pixels[:, :, :, i].copy()} for i in range(count)]


# ---- format 1: digitStruct.mat (MATLAB v7.3 = HDF5) ---------------------------------------------

def _open_digit_struct(path: Path):
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataPrepError(f"{path}: not a MATLAB v7.3 (HDF5) file ({str(err)[:80]})") from None
    if "digitStruct/name" not in f or "digitStruct/bbox" not in f:
        f.close()
        raise DataPrepError(f"{path}: no digitStruct/name and digitStruct/bbox datasets")
    return f


def read_names(path: Path) -> List[str]:
    with _open_digit_struct(path) as f:
        refs = f["digitStruct/name"][()].ravel()
        return ["".join(map(chr, _read_ref(f, ref, np.uint16).ravel())) for ref in refs]


# h5py's low-level calls below: SVHN extra has ~200k entries of ~10 references each, and
# `f[ref][()]` costs about 4x as much per reference (it builds Dataset and Group objects).

def _read_ref(f, ref, dtype) -> np.ndarray:
    import h5py

    dataset = h5py.h5r.dereference(ref, f.id)
    values = np.empty(dataset.shape, dtype)
    dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, values)  # HDF5 converts the stored type to `dtype`
    return values


def read_boxes(f, path: Path, indices: Sequence[int]) -> Dict[int, Dict[str, List[float]]]:
    """Digit fields of the given entries: one digit is stored inline, several as references."""
    import h5py

    refs = f["digitStruct/bbox"][()].ravel()
    boxes = {}
    for i in indices:
        group = h5py.h5r.dereference(refs[i], f.id)
        fields = {}
        for key in FIELDS:
            try:
                data = h5py.h5d.open(group, key.encode())
            except (KeyError, ValueError, OSError):
                raise DataPrepError(f"{path}: entry {i + 1} has no '{key}' in its bbox") from None
            if data.get_type().get_class() == h5py.h5t.REFERENCE:
                stored = np.empty(data.shape, h5py.ref_dtype)
                data.read(h5py.h5s.ALL, h5py.h5s.ALL, stored)
                fields[key] = [float(_read_ref(f, ref, np.float64).ravel()[0]) for ref in stored.ravel()]
            else:
                values = np.empty(data.shape, np.float64)
                data.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
                fields[key] = [float(v) for v in values.ravel()]
        if len({len(v) for v in fields.values()}) != 1:
            raise DataPrepError(f"{path}: entry {i + 1} has bbox fields of different lengths")
        boxes[i] = fields
    return boxes


def crop_box(digit_boxes: List[List[float]], width: int, height: int, size: int) -> Optional[List[float]]:
    """The sample's crop [x0, y0, x1, y1] in the image, from clamped digit boxes [x0, y0, x1, y1]."""
    x0 = min(b[0] for b in digit_boxes)
    y0 = min(b[1] for b in digit_boxes)
    x1 = max(b[2] for b in digit_boxes)
    y1 = max(b[3] for b in digit_boxes)
    grow = EXPAND * size / SIZES[0]
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * grow, (y1 - y0) * grow
    box = [max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(float(width), cx + w / 2), min(float(height), cy + h / 2)]
    return box if box[2] > box[0] and box[3] > box[1] else None


def _sequence_sample(context: Dict[str, Any], entry: Dict[str, Any], fields: Dict[str, List[float]],
                     strict: bool, skipped: List[Dict[str, str]]) -> Optional[Dict[str, Any]]:
    key, rel = entry["key"], f"{entry['source']}/{entry['name']}"
    labels = fields["label"]
    if len(labels) > MAX_DIGITS:
        skipped.append({"key": key, "reason": f"too many digits: {len(labels)} > {MAX_DIGITS}"})
        return None
    if any(v != int(v) or not 0 <= v <= 10 for v in labels):
        raise DataPrepError(f"{rel}: digit labels {labels} are not all in 1..10 (entry {entry['index'] + 1})")
    path = Path(context["root"]) / rel
    try:
        data = path.read_bytes()
        check_image(data)  # the contract's definition of a whole image, as verify and the loader apply it
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except (BadImage, OSError) as err:
        if strict:
            raise DataPrepError(f"{path}: unreadable image ({err}); drop --strict to skip it") from None
        skipped.append({"key": key, "reason": f"corrupt: {rel}: {str(err)[:100]}"})
        return None
    width, height = image.size
    digits = []  # clamped to the image: some SVHN boxes reach past its edges
    for left, top, w, h in zip(fields["left"], fields["top"], fields["width"], fields["height"]):
        digits.append([max(0.0, left), max(0.0, top), min(float(width), left + w), min(float(height), top + h)])
    if any(b[2] <= b[0] or b[3] <= b[1] for b in digits):
        skipped.append({"key": key, "reason": "digit box outside the image"})
        return None
    size = context["size"]
    box = crop_box(digits, width, height, size)
    crop = image.resize((size, size), Image.BILINEAR, box=tuple(box))
    sx, sy = size / (box[2] - box[0]), size / (box[3] - box[1])
    boxes = [[round((b[0] - box[0]) * sx, 2), round((b[1] - box[1]) * sy, 2),
              round((b[2] - b[0]) * sx, 2), round((b[3] - b[1]) * sy, 2)] for b in digits]
    meta = {"id": key, "name": entry["name"], "digits": [int(v) % 10 for v in labels], "length": len(labels),
            "boxes": boxes, "source": entry["source"], "size": [width, height],
            "crop": [round(v, 2) for v in box]}
    return {"__key__": key, "png": encode_png(np.asarray(crop)), "json": meta}


# ---- format 2: *_32x32.mat (MATLAB v5) ----------------------------------------------------------

def read_format2(path: Path):
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as err:  # scipy raises ValueError/TypeError/NotImplementedError on bad files
        raise DataPrepError(f"{path}: not a MATLAB v5 file with X and y ({type(err).__name__}: {str(err)[:60]})") from None
    if "X" not in mat or "y" not in mat:
        raise DataPrepError(f"{path}: expected variables X and y, found {sorted(k for k in mat if not k.startswith('_'))}")
    pixels, labels = mat["X"], np.asarray(mat["y"]).ravel()
    if pixels.ndim != 4 or pixels.shape[:3] != (32, 32, 3) or pixels.shape[3] != len(labels):
        raise DataPrepError(f"{path}: X has shape {pixels.shape}, expected (32, 32, 3, {len(labels)})")
    bad = [v for v in labels if v != int(v) or not 0 <= v <= 10]
    if bad:
        raise DataPrepError(f"{path}: y holds {bad[0]}, expected labels 1..10 (10 = digit 0)")
    return pixels.astype(np.uint8), [int(v) % 10 for v in labels]


def _digit_sample(entry: Dict[str, Any]) -> Dict[str, Any]:
    meta = {"id": entry["key"], "index": entry["index"] + 1, "digits": [entry["digit"]], "length": 1,
            "source": entry["source"]}
    return {"__key__": entry["key"], "png": encode_png(entry["pixels"]), "cls": entry["digit"], "json": meta}


# ---- shards -------------------------------------------------------------------------------------

def build_shard(spec: ShardSpec, strict: bool) -> ShardContent:
    skipped: List[Dict[str, str]] = []

    def samples():
        by_source: Dict[str, List[int]] = {}
        for _, e in spec.items:
            if e["format"] == 1:
                by_source.setdefault(e["source"], []).append(e["index"])
        fields = {}
        for source, indices in by_source.items():  # one read of this shard's annotations per source
            path = Path(spec.items[0][0]["root"]) / source / "digitStruct.mat"
            with _open_digit_struct(path) as f:
                fields[source] = read_boxes(f, path, indices)
        for context, e in spec.items:
            if e["format"] == 2:
                yield _digit_sample(e)
                continue
            sample = _sequence_sample(context, e, fields[e["source"]][e["index"]], strict, skipped)
            if sample is not None:
                yield sample

    return samples(), skipped


# ---- CLI ----------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep svhn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder holding train/ test/ extra/ or *_32x32.mat")
    parser.add_argument("--out", required=True, help="output folder for <split>-NNNNNN.tar + manifest.json")
    parser.add_argument("--split", action="append", default=None,
                        help="output splits, e.g. train+extra,test (repeatable; default train)")
    parser.add_argument("--size", type=int, choices=SIZES, default=64, help="format 1 crop size (default 64)")
    parser.add_argument("--val-from-train", type=int, default=0, metavar="K",
                        help="move K train images (seeded choice) into a 'val' split, e.g. 5000")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --val-from-train choice")
    parser.add_argument("--format", dest="fmt", choices=("auto", "1", "2"), default="auto",
                        help="1: <split>/digitStruct.mat; 2: <split>_32x32.mat (default: whichever is there)")
    parser.add_argument("--limit", type=int, default=None, help="at most N entries per raw split (the first ones)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help=f"most samples per shard (default: largest split/{MIN_TRAIN_SHARDS}, {MIN_SHARD_SIZE} to {MAX_SHARD_SIZE})")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out (and list in manifest 'skipped') entries whose image is not on disk")
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    manifest = prepare(args.root, args.out, split=args.split or ["train"], size=args.size,
                       val_from_train=args.val_from_train, seed=args.seed, limit=args.limit,
                       shard_size=args.shard_size, fmt=args.fmt, skip_missing=args.skip_missing, **job_kwargs(args))
    print_summary("svhn", manifest, args.out)
    return 0
