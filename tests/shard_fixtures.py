"""Tiny real webdataset shards in the CUB and SVHN contracts of docs/design.md, for tests.

    root = write_tiny_cub_shards(tmp_path / "cub")          # manifest.json + train/test tar shards
    root = write_tiny_svhn_shards(tmp_path / "svhn")
    cfg = tiny_config(f"data.root={root}")                   # 32 px, 3 classes, CPU-sized

The images are real JPEG (CUB) / PNG (SVHN) files drawn with PIL, written through
data_prep.shards, so every reader (webdataset, `tar tf`, the pipeline) sees what data_prep writes.
A CUB image is a class-coloured background with a "bird" ellipse of the class's second colour
inside its bounding box, so a tiny model can learn the class from colour alone. Options make
awkward samples on purpose: grayscale and CMYK JPEGs, undecodable bytes.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_prep.shards import FORMAT_VERSION, encode_png, shard_name, write_json_atomic, write_shard

CUB_PART_NAMES = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
                  "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat"]
SPLITS = ("train", "test")


def _class_colours(num_classes: int, rng: random.Random) -> List[tuple]:
    return [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(2 * num_classes)]


def _cub_image(size: int, class_id: int, colours: List[tuple], rng: random.Random):
    """(PIL RGB image, bbox [x, y, w, h], parts [[x, y, visible]] * 15) for one sample."""
    w, h = size + rng.randrange(size // 2 + 1), size  # landscape like most CUB photos
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-20, 21, (h, w, 3))
    img = Image.fromarray(np.clip(np.array(colours[2 * class_id]) + noise, 0, 255).astype(np.uint8))
    bw, bh = rng.randint(w // 4, w // 2), rng.randint(h // 4, h // 2)
    bx, by = rng.randrange(w - bw), rng.randrange(h - bh)
    ImageDraw.Draw(img).ellipse([bx, by, bx + bw - 1, by + bh - 1], fill=colours[2 * class_id + 1])
    parts = []
    for _ in CUB_PART_NAMES:
        if rng.random() < 0.8:  # CUB marks parts hidden in the photo as (0, 0, 0)
            parts.append([round(bx + rng.random() * bw, 1), round(by + rng.random() * bh, 1), 1])
        else:
            parts.append([0.0, 0.0, 0])
    return img, [bx, by, bw, bh], parts


def _jpeg_bytes(img: Image.Image, mode: str) -> bytes:
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_splits(out_dir: Path, samples: Dict[str, List[dict]], shards_per_split: int) -> Dict[str, dict]:
    splits = {}
    for split, items in samples.items():
        chunks = [c for c in np.array_split(np.arange(len(items)), shards_per_split) if len(c)]
        entries = [write_shard(out_dir / shard_name(split, i), [items[j] for j in chunk])
                   for i, chunk in enumerate(chunks)]
        splits[split] = {"num_samples": len(items), "shards": entries}
    return splits


def _counts(per_class: Dict[str, int], num_classes: int, num_samples: Optional[Dict[str, int]]) -> Dict[str, int]:
    counts = {split: per_class[split] * num_classes for split in SPLITS}
    counts.update(num_samples or {})
    return counts


def write_tiny_cub_shards(out_dir, num_classes: int = 3, train_per_class: int = 4, test_per_class: int = 2,
                          size: int = 64, shards_per_split: int = 2, seed: int = 0,
                          num_samples: Optional[Dict[str, int]] = None,
                          grayscale: Sequence[str] = (), cmyk: Sequence[str] = (),
                          corrupt: Sequence[str] = ()) -> Path:
    """Write CUB-contract shards + manifest.json under `out_dir`; returns `out_dir`.

    num_samples overrides a split's size ({"test": 37}); classes are then dealt round-robin.
    grayscale / cmyk / corrupt name sample keys (zero-padded image ids, "000001" is the first
    train image) stored as an L-mode JPEG, a CMYK JPEG, or bytes no decoder can read.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colours = _class_colours(num_classes, rng)
    classes = [f"{i + 1:03d}.Tiny_Bird_{i}" for i in range(num_classes)]
    counts = _counts({"train": train_per_class, "test": test_per_class}, num_classes, num_samples)
    samples: Dict[str, List[dict]] = {}
    image_id = 0
    for split in SPLITS:
        labels = [i % num_classes for i in range(counts[split])]
        rng.shuffle(labels)  # shards hold mixed classes, as in a shuffled real split
        samples[split] = []
        for class_id in labels:
            image_id += 1
            key = f"{image_id:06d}"
            img, bbox, parts = _cub_image(size, class_id, colours, rng)
            mode = "L" if key in grayscale else "CMYK" if key in cmyk else "RGB"
            data = b"\xff\xd8 not a jpeg " + key.encode() if key in corrupt else _jpeg_bytes(img, mode)
            # as data_prep cub: class_id is CUB's 1-based id, label (= cls) the 0-based index
            meta = {"id": image_id, "file": f"{classes[class_id]}/{key}.jpg", "class_id": class_id + 1,
                    "label": class_id, "class_name": classes[class_id], "size": [img.width, img.height],
                    "mode": mode, "bbox": bbox, "parts": parts}
            samples[split].append({"__key__": key, "jpg": data, "cls": class_id, "json": meta})
    manifest = {"dataset": "cub", "task": "classification", "format_version": FORMAT_VERSION,
                "created_by": "tests/shard_fixtures.py", "classes": classes,
                "class_ids": list(range(1, num_classes + 1)), "parts": CUB_PART_NAMES,
                "splits": _write_splits(out_dir, samples, shards_per_split), "skipped": [],
                "source": {"root": None, "options": {"seed": seed, "size": size}}}
    write_json_atomic(out_dir / "manifest.json", manifest)
    return out_dir


def _svhn_image(height: int, digits: List[int], rng: random.Random):
    """(PIL RGB image, digit boxes [x, y, w, h]) with the digits drawn left to right."""
    cell = height // 2
    w = max(height, cell * len(digits) + 8)
    bg = tuple(rng.randrange(128) for _ in range(3))
    fg = tuple(128 + rng.randrange(128) for _ in range(3))
    img = Image.new("RGB", (w, height), bg)
    draw = ImageDraw.Draw(img)
    x0, y0 = (w - cell * len(digits)) // 2, height // 4
    boxes = []
    for i, d in enumerate(digits):
        x = x0 + i * cell
        draw.text((x + cell // 4, y0 + cell // 4), str(d), fill=fg)
        boxes.append([x, y0, cell, cell])
    return img, boxes


def tiny_config(*overrides: str):
    """A config that fits these shards and runs in a blink on CPU (32 px input, 3 classes, no workers)."""
    from pipeline.config import load_config

    return load_config(None, ["model.input_size=32", "model.crop_size=16", "model.num_classes=3",
                              "train.num_workers=0", "train.global_batch_size=8", "data.shuffle_buffer=16",
                              *overrides])


def train_tiny_two_stream_run(root: Path, *overrides: str) -> Path:
    """Train a 2-step 2-stream N x ST-CNN on tiny CUB shards written under `root` (with parts);
    returns the data root. Its checkpoints are in root/run/checkpoints (last.pt, best.pt)."""
    from pipeline.train import run

    data = write_tiny_cub_shards(root / "data")
    run(tiny_config(f"data.root={data}", f"run.dir={root / 'run'}", "model.name=nxst_cnn",
                    "model.backbone=test_resnet", "model.num_streams=2", "model.input_size=64", "model.crop_size=32",
                    "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.device=cpu",
                    *overrides))
    return data


def write_tiny_svhn_shards(out_dir, train_samples: int = 12, test_samples: int = 6, size: int = 64,
                           shards_per_split: int = 2, max_length: int = 5, seed: int = 0) -> Path:
    """Write SVHN-contract shards (png + json {digits, length, boxes, size}) + manifest.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples: Dict[str, List[dict]] = {}
    image_id = 0
    for split, count in (("train", train_samples), ("test", test_samples)):
        samples[split] = []
        for _ in range(count):
            image_id += 1
            digits = [rng.randrange(10) for _ in range(rng.randint(1, max_length))]
            img, boxes = _svhn_image(size, digits, rng)
            meta = {"id": image_id, "digits": digits, "length": len(digits), "boxes": boxes,
                    "size": [img.width, img.height]}
            samples[split].append({"__key__": f"{split}_{image_id:06d}", "png": encode_png(np.array(img)),
                                   "json": meta})
    manifest = {"dataset": "svhn", "task": "sequence", "format_version": FORMAT_VERSION,
                "created_by": "tests/shard_fixtures.py", "classes": [str(d) for d in range(10)],
                "max_length": max_length, "splits": _write_splits(out_dir, samples, shards_per_split),
                "skipped": [], "source": {"root": None, "options": {"seed": seed, "size": size}}}
    write_json_atomic(out_dir / "manifest.json", manifest)
    return out_dir
