"""Atomic shard and manifest writing shared by every data-prep command.

A shard appears under its final name only when complete: it is written to a hidden temporary
name in the same folder, flushed to disk, then renamed (rename is atomic on POSIX).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable

import webdataset as wds

FORMAT_VERSION = 1


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def write_shard(path: str | Path, samples: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """Write webdataset samples ({"__key__": ..., "jpg": bytes, "cls": int, "json": dict}) to `path`.

    Returns the manifest entry {"name", "num_samples", "bytes", "sha256"}.
    """
    path = Path(path)
    tmp = _tmp_path(path)
    count = 0
    try:
        with open(tmp, "wb") as stream:
            with wds.TarWriter(stream) as sink:
                for sample in samples:
                    sink.write(sample)
                    count += 1
            stream.flush()
            os.fsync(stream.fileno())
        digest = file_sha256(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"name": path.name, "num_samples": count, "bytes": size, "sha256": digest}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = _tmp_path(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def encode_png(array) -> bytes:
    """PNG bytes of an HxW or HxWx3 uint8 array (lossless, for generated and cropped images)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
