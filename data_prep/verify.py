"""Re-read a data-prep output folder and check it against its manifest.

    python -m data_prep verify OUT [--workers 4] [--quick]

Checks: every listed shard exists with the listed size and sha256; it is a plain tar whose members
group into samples; the sample counts per shard and split; keys unique over the folder; each
sample has its dataset's fields, its image decodes (and converts to RGB), its json parses and
agrees with `cls`; no unlisted shards or leftover temporary files. Prints one line per problem
and exits 1 if there is any (2 if there is no readable manifest).
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import DataPrepError
from .contract import (REQUIRED_FIELDS, SHARD_FILE, BadImage, DataError, check_image, file_sha256, load_manifest_json,
                       manifest_task)
CUB_JSON = ("id", "class_id", "class_name", "size", "bbox", "parts")
SVHN_JSON = ("id", "digits", "length", "source")


def verify(out: str | Path, workers: int = 1, decode: bool = True) -> Tuple[List[str], Dict[str, Any]]:
    """(problems, summary) for the folder `out`; problems is empty when all is well."""
    out = Path(out)
    manifest = read_manifest(out)
    problems: List[str] = []
    jobs = []
    for split, info in manifest["splits"].items():
        listed = sum(s.get("num_samples", 0) for s in info.get("shards", []))
        if info.get("num_samples") != listed:
            problems.append(f"manifest.json: split {split!r} says num_samples {info.get('num_samples')}, "
                            f"its shards list {listed}")
        jobs.extend((out, manifest, split, entry, decode) for entry in info.get("shards", []))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_check_shard, *zip(*jobs)))
    else:
        results = [_check_shard(*job) for job in jobs]
    seen: Dict[str, str] = {}
    samples = 0
    for (_, _, _, entry, _), (shard_problems, keys) in zip(jobs, results):
        problems.extend(shard_problems)
        samples += len(keys)
        for key in keys:
            if key in seen:
                problems.append(f"{entry['name']}: key {key!r} also in {seen[key]}")
            seen[key] = entry["name"]
    listed_names = {entry["name"] for _, _, _, entry, _ in jobs}
    for path in sorted(out.iterdir()):
        if SHARD_FILE.match(path.name) and path.name not in listed_names:
            problems.append(f"{path.name}: shard not listed in manifest.json")
        elif ".partial-" in path.name:
            problems.append(f"{path.name}: leftover temporary file of an interrupted job (rerun the job or delete it)")
    summary = {"dataset": manifest["dataset"], "shards": len(jobs), "samples": samples,
               "splits": {s: i.get("num_samples") for s, i in manifest["splits"].items()}}
    return problems, summary


def read_manifest(out: Path) -> Dict[str, Any]:
    path = out / "manifest.json"
    if not path.is_file():
        raise DataPrepError(f"{path}: not found (is {out} a data-prep output folder?)")
    try:
        manifest = load_manifest_json(path)
    except DataError as err:
        raise DataPrepError(str(err)) from None
    if "format_version" not in manifest:
        raise DataPrepError(f"{path}: missing key 'format_version'")
    return manifest


def _check_shard(out: Path, manifest: Dict[str, Any], split: str, entry: Dict[str, Any],
                 decode: bool) -> Tuple[List[str], List[str]]:
    name = entry.get("name", "?")
    path = out / name
    if not path.is_file():
        return [f"{name}: listed in manifest.json (split {split!r}) but missing"], []
    problems = []
    if path.stat().st_size != entry.get("bytes"):
        problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry.get('bytes')}")
    if file_sha256(path) != entry.get("sha256"):
        problems.append(f"{name}: sha256 differs from manifest.json (changed or damaged)")
    try:
        samples = _read_samples(path)
    except (tarfile.TarError, ValueError, OSError) as err:
        return problems + [f"{name}: unreadable tar ({err})"], []
    if len(samples) != entry.get("num_samples"):
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry.get('num_samples')}")
    if decode:
        for key, fields in samples:
            problems.extend(f"{name}: sample {key}: {p}" for p in check_sample(manifest, fields))
    return problems, [key for key, _ in samples]


def _read_samples(path: Path) -> List[Tuple[str, Dict[str, bytes]]]:
    """[(key, {extension: bytes})] in tar order; a sample's files are adjacent, as webdataset needs."""
    samples: List[Tuple[str, Dict[str, bytes]]] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                raise ValueError(f"member {member.name!r} is not a regular file")
            key, dot, ext = member.name.partition(".")
            if not dot:
                raise ValueError(f"member {member.name!r} has no extension")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


def check_sample(manifest: Dict[str, Any], fields: Dict[str, bytes]) -> List[str]:
    """What is wrong with one sample's fields (empty list: nothing)."""
    dataset, task = manifest["dataset"], manifest_task(manifest)
    required = REQUIRED_FIELDS.get((dataset, task), ())
    missing = [f for f in required if f not in fields]
    if missing:
        return [f"missing {', '.join(missing)} (has {', '.join(sorted(fields))})"]
    problems = []
    image_size = None
    for ext in ("jpg", "png"):
        if ext in fields:
            try:
                image_size = list(check_image(fields[ext]))
            except BadImage as err:
                problems.append(f"{ext} does not decode ({err})")
    meta: Dict[str, Any] = {}
    if "json" in fields:
        try:
            meta = json.loads(fields["json"])
        except ValueError:
            return problems + ["json does not parse"]
    if "cls" in fields:
        try:
            cls = int(fields["cls"])
        except ValueError:
            return problems + [f"cls {fields['cls'][:10]!r} is not an integer"]
        if not 0 <= cls < len(manifest.get("classes", [])):
            problems.append(f"cls {cls} outside 0..{len(manifest.get('classes', [])) - 1}")
        if dataset == "cub" and meta.get("label") != cls:
            problems.append(f"cls {cls} but json label {meta.get('label')}")
    wanted = CUB_JSON if dataset == "cub" else SVHN_JSON if dataset == "svhn" else ()
    absent = [k for k in wanted if k not in meta]
    if absent:
        return problems + [f"json lacks {', '.join(absent)}"]
    if dataset == "cub":
        problems.extend(_check_cub(manifest, meta, image_size))
    elif dataset == "svhn":
        problems.extend(_check_svhn(manifest, meta, image_size))
    return problems


def _check_cub(manifest: Dict[str, Any], meta: Dict[str, Any], image_size: Optional[list]) -> List[str]:
    problems = []
    if "parts" in manifest and len(meta["parts"]) != len(manifest["parts"]):
        problems.append(f"{len(meta['parts'])} parts, manifest lists {len(manifest['parts'])}")
    if image_size is not None and meta["size"] != image_size:
        problems.append(f"json size {meta['size']} but the image is {image_size}")
    if len(meta["bbox"]) != 4:
        problems.append(f"bbox {meta['bbox']} is not [x, y, w, h]")
    return problems


def _check_svhn(manifest: Dict[str, Any], meta: Dict[str, Any], image_size: Optional[list]) -> List[str]:
    digits, length = meta["digits"], meta["length"]
    problems = []
    if len(digits) != length or not 1 <= length <= manifest.get("max_length", 5):
        problems.append(f"length {length} with {len(digits)} digits (at most {manifest.get('max_length', 5)})")
    if any(not isinstance(d, int) or not 0 <= d <= 9 for d in digits):
        problems.append(f"digits {digits} not all in 0..9")
    boxes = meta.get("boxes")
    if boxes is not None and image_size is not None:
        if len(boxes) != length:
            problems.append(f"{len(boxes)} boxes for {length} digits")
        w, h = image_size
        outside = [b for b in boxes if b[0] < 0 or b[1] < 0 or b[0] + b[2] > w + 0.01 or b[1] + b[3] > h + 0.01]
        if outside:
            problems.append(f"box {outside[0]} reaches outside the {w}x{h} image")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder holding manifest.json and the shards")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--quick", action="store_true", help="sizes, checksums and counts only; no decoding")
    args = parser.parse_args(argv)
    problems, summary = verify(args.out, workers=args.workers, decode=not args.quick)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"verify: {len(problems)} problem(s) in {args.out}", file=sys.stderr)
        return 1
    print(f"verify: ok: {summary['dataset']}, {summary['shards']} shards, {summary['samples']} samples, "
          f"splits {summary['splits']}")
    return 0
