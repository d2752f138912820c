"""The shard/manifest contract (docs/design.md) in one torch-free module.

What data_prep writes and everything else reads: shard names, the manifest's schema (write, read,
check), sha256, atomic file writes, the tasks and the fields their samples carry, and what counts
as a corrupt image. Prep, `python -m data_prep verify` and the training loaders (pipeline.data) all
import it, so the three agree; it imports neither torch nor pipeline (job scripts' preflight on a
login node reads manifests with it).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

FORMAT_VERSION = 1
SHARD_FILE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")

# Tasks the loaders and evaluation know; a manifest without "task" gets its dataset's.
TASK_OF_DATASET = {"svhn": "sequence"}
DEFAULT_TASK = "classification"
# colocalisation (data_prep coloc): the target is the class (`cls`), as for classification; the boxes
# in the samples' json are read by the evaluation only
TASKS = ("classification", "sequence", "colocalisation")
DEFAULT_MAX_LENGTH = 5  # SVHN sequences (paper A.4): up to 5 digits
# fields every sample must have, by dataset and task (verify checks them)
REQUIRED_FIELDS = {("cub", "classification"): ("jpg", "cls", "json"),
                   ("svhn", "sequence"): ("png", "json"),
                   ("svhn", "classification"): ("png", "cls", "json")}


class DataError(ValueError):
    """Unusable data (manifest, shard or sample); the message is one line naming the file or key."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ---- files ------------------------------------------------------------------------------------

def tmp_path(path: Path) -> Path:
    # host and pid: array jobs on different nodes may share a pid and finalise the same manifest
    return path.with_name(f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}")


def partial_files(folder: str | Path, name: str) -> list:
    """Leftover temporary files of a shard or manifest named `name` (e.g. from a killed job)."""
    return sorted(Path(folder).glob(f".{name}.partial-*"))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: str | Path, text: str, durable: bool = True) -> None:
    """Write `text` to a temporary name beside `path`, then rename: readers never see half a file.
    durable=False skips the fsync (~10 ms on network disks) where a file lost to a power cut is
    harmless, e.g. resume bookkeeping or a run's config.yaml."""
    path = Path(path)
    tmp = tmp_path(path)
    with open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any, durable: bool = True) -> None:
    """write_text_atomic of `obj` as indented JSON."""
    write_text_atomic(path, json.dumps(obj, indent=1), durable)


# ---- manifest ---------------------------------------------------------------------------------

def new_manifest(dataset: str, splits: Dict[str, Any], skipped: List[Dict[str, str]], source: Dict[str, Any],
                 extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The manifest.json object: splits {name: {"num_samples", "shards": [{"name", "num_samples",
    "bytes", "sha256"}]}}, skipped [{"key", "reason"}]; `extra` adds classes, parts, task, ..."""
    return {"dataset": dataset, "format_version": FORMAT_VERSION, "created_by": f"python -m data_prep {dataset}",
            **(extra or {}), "splits": splits, "skipped": skipped, "source": source}


def load_manifest_json(path: Path) -> Dict[str, Any]:
    """The manifest at `path` as a dict, its top level checked: dataset, non-empty splits, a known task."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    _require(raw, "dataset", str, str(path))
    if not _require(raw, "splits", dict, str(path)):
        raise DataError(f"{path}: 'splits' is empty")
    task = manifest_task(raw)
    if task not in TASKS:
        raise DataError(f"{path}: task '{task}' is not one of {', '.join(TASKS)}")
    return raw


def manifest_task(raw: Dict[str, Any]) -> str:
    """The manifest's task; older manifests without one get their dataset's."""
    return raw.get("task") or TASK_OF_DATASET.get(raw.get("dataset"), DEFAULT_TASK)


@dataclass
class Manifest:
    root: Path
    dataset: str
    task: str                                   # one of TASKS
    classes: List[str]
    parts: List[str]                            # part names (CUB); [] when samples carry none
    splits: Dict[str, Dict[str, Any]]           # name -> {"num_samples", "shards": [{"name", "path", ...}]}
    max_length: int = DEFAULT_MAX_LENGTH        # sequence task: digits per target
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def split(self, name: str) -> Dict[str, Any]:
        if name not in self.splits:
            raise DataError(f"{self.root / 'manifest.json'}: unknown split '{name}'; "
                            f"the manifest has {', '.join(sorted(self.splits)) or 'no splits'}")
        return self.splits[name]

    def num_samples(self, split: str) -> int:
        return int(self.split(split)["num_samples"])

    def shard_paths(self, split: str) -> List[str]:
        return [shard["path"] for shard in self.split(split)["shards"]]

    def check_model(self, task: str, num_classes: int) -> None:
        """Raise DataError when a model with this task and class count cannot learn these labels.

        Call it before training or evaluating: otherwise a label beyond the classifier shows up
        as "target out of bounds" (a device-side assert on CUDA) somewhere in the first batches.
        """
        where = self.root / "manifest.json"
        if task != self.task:
            raise DataError(f"{where}: the model's task is '{task}' but dataset '{self.dataset}' is a "
                            f"'{self.task}' task (check model.name against data.root)")
        if task == "classification" and self.classes and num_classes < len(self.classes):
            raise DataError(f"{where}: lists {len(self.classes)} classes but model.num_classes={num_classes}")


def _require(obj: Dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise DataError(f"{where}: missing key '{key}'")
    if not isinstance(obj[key], kind):
        raise DataError(f"{where}: key '{key}' must be a {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _check_split(root: Path, path: Path, name: str, split: Any, verify_checksums: bool) -> Dict[str, Any]:
    where = f"{path}: splits.{name}"
    if not isinstance(split, dict):
        raise DataError(f"{where} must be a mapping with num_samples and shards")
    shards = _require(split, "shards", list, where)
    declared = _require(split, "num_samples", int, where)
    checked = []
    for i, shard in enumerate(shards):
        shard_where = f"{where}.shards[{i}]"
        if not isinstance(shard, dict):
            raise DataError(f"{shard_where} must be a mapping with name and num_samples")
        name_ = _require(shard, "name", str, shard_where)
        _require(shard, "num_samples", int, shard_where)
        shard_path = root / name_
        if not shard_path.is_file():
            raise DataError(f"{path}: shard {name_} of split '{name}' is listed but missing: {shard_path}")
        size = shard_path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            raise DataError(f"{path}: shard {shard_path} has {size} bytes but the manifest says {shard['bytes']} "
                            "(the shards do not match this manifest; re-run data_prep)")
        if verify_checksums and "sha256" in shard and file_sha256(shard_path) != shard["sha256"]:
            raise DataError(f"{path}: shard {shard_path} does not match its sha256 in the manifest")
        checked.append({**shard, "path": str(shard_path)})
    counted = sum(shard["num_samples"] for shard in checked)
    if counted != declared:
        raise DataError(f"{where}: num_samples={declared} but its shards hold {counted}")
    return {**split, "num_samples": declared, "shards": checked}


def read_manifest(root: Optional[str | Path], verify_checksums: bool = False) -> Manifest:
    """Read and check `root`/manifest.json: every listed shard exists with the listed size.

    verify_checksums also hashes every shard (slow on full datasets; data_prep's own check).
    """
    if not root:  # None, or "" from a YAML `root:` or a `data.root=` override
        raise DataError("data.root is not set: point it at a folder holding manifest.json (python -m data_prep ...)")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a directory (expected a folder holding manifest.json)")
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} not found: data.root must hold the manifest.json that data_prep writes")
    raw = load_manifest_json(path)
    return Manifest(
        root=root, dataset=raw["dataset"], task=manifest_task(raw), classes=list(raw.get("classes") or []),
        parts=list(raw.get("parts") or []),
        splits={name: _check_split(root, path, name, split, verify_checksums) for name, split in raw["splits"].items()},
        max_length=int(raw.get("max_length", DEFAULT_MAX_LENGTH)), raw=raw)


# ---- images -----------------------------------------------------------------------------------
#
# An image is whole when OpenCV decodes it and libjpeg reports no corrupt data on the way. A JPEG
# scrambled in the middle still decodes: libjpeg says "Corrupt JPEG data: bad Huffman code" (or
# "premature end of data segment", "N extraneous bytes before marker") on stderr and fills in grey
# or garbage, and PIL says nothing at all (on
# real CUB images with 64 bytes scrambled, PIL rejected 112 of 600, this check 463; the rest decode
# to the right number of blocks, which no decoder can tell from a real image). Those warnings are
# the only signal, so the decode runs with the process's stderr (fd 2) pointed at a scratch file.

BAD_JPEG_MESSAGES = ("Corrupt JPEG data", "Premature end of JPEG file")
_capture_lock = threading.Lock()
_capture: Dict[int, Any] = {}  # pid -> scratch file (a forked child must not share its parent's offset)


def _new_lock_in_child() -> None:
    global _capture_lock
    _capture_lock = threading.Lock()  # forked while another thread decoded: that thread is not here to free it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


class BadImage(DataError):
    """Image bytes that are not a whole, cleanly decodable image; the message says what is wrong."""


def decode_checked(data: bytes, flags: Optional[int] = None):
    """`cv2.imdecode(data, flags)` of whole image bytes (a BGR, or with a grayscale flag a 2-D, uint8
    array), or BadImage when they are truncated, corrupt or not an image. A format OpenCV lacks is
    decoded by PIL instead (into the same layout), and a file neither decodes whole is BadImage."""
    import cv2  # here: reading a manifest needs no OpenCV (~0.1 s)
    import numpy as np

    flags = cv2.IMREAD_COLOR if flags is None else flags
    array, messages = _decode_capturing_stderr(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), flags))
    corrupt = [line for line in messages.splitlines() if line.startswith(BAD_JPEG_MESSAGES)]
    if corrupt:
        raise BadImage(f"corrupt JPEG ({corrupt[0].strip()})")
    if array is None:  # truncated (libjpeg stops), or a format or mode OpenCV lacks: PIL decides
        gray = flags & ~cv2.IMREAD_IGNORE_ORIENTATION in _gray_flags(cv2)
        return _decode_with_pil(data, gray)
    return array


def _gray_flags(cv2) -> Tuple[int, ...]:
    return (cv2.IMREAD_GRAYSCALE, cv2.IMREAD_REDUCED_GRAYSCALE_2, cv2.IMREAD_REDUCED_GRAYSCALE_4,
            cv2.IMREAD_REDUCED_GRAYSCALE_8)


def check_image(data: bytes) -> Tuple[int, int]:
    """(width, height) of whole image bytes, or BadImage. The definition prep, verify and the
    loaders share: `decode_checked`, at 1/8 scale for a JPEG (libjpeg still reads every coefficient,
    so it finds the same corruption; about 0.7 ms a CUB image against 0.95 for a whole decode)."""
    import cv2

    if data[:2] != b"\xff\xd8":
        array = decode_checked(data, cv2.IMREAD_UNCHANGED)
        return array.shape[1], array.shape[0]
    from PIL import Image, UnidentifiedImageError  # the JPEG's own size, from its header

    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise BadImage(f"unreadable JPEG header ({type(err).__name__}: {str(err)[:80]})") from None
    decode_checked(data, cv2.IMREAD_REDUCED_COLOR_8)
    return size


def _decode_with_pil(data: bytes, gray: bool):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if gray:
                return np.asarray(image.convert("L"))
            return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # BGR, as OpenCV's
    except UnidentifiedImageError:
        raise BadImage("not an image in a known format") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        raise BadImage(f"not a whole image ({type(err).__name__}: {str(err)[:80]})") from None


def _decode_capturing_stderr(decode) -> Tuple[Any, str]:
    """(decode(), what the C libraries wrote to fd 2 meanwhile). Text other than libjpeg's corrupt-data
    warnings is written back to stderr. Costs ~5 us; decodes in one process take turns (one lock)."""
    with _capture_lock:
        scratch = _capture.get(os.getpid())
        if scratch is None:
            scratch = _capture[os.getpid()] = tempfile.TemporaryFile()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to capture
            return decode(), ""
        try:
            os.dup2(scratch.fileno(), 2)
            result = decode()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        written = os.lseek(scratch.fileno(), 0, os.SEEK_CUR)
        if not written:
            return result, ""
        os.lseek(scratch.fileno(), 0, os.SEEK_SET)
        text = os.read(scratch.fileno(), written)
        os.lseek(scratch.fileno(), 0, os.SEEK_SET)
        os.ftruncate(scratch.fileno(), 0)
    messages = text.decode("utf-8", "replace")
    others = "".join(line for line in messages.splitlines(keepends=True) if not line.startswith(BAD_JPEG_MESSAGES))
    if others:
        os.write(2, others.encode())
    return result, messages
