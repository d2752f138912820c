"""Reading and checking a shard folder's manifest.json (the data_prep contract in docs/design.md).

The checks run before any rank starts streaming: a listed shard that is missing or whose size
differs from the manifest would otherwise surface as a hang or a short evaluation much later.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from data_prep.shards import file_sha256

# Tasks the loaders and evaluation know; a manifest without "task" gets its dataset's.
TASK_OF_DATASET = {"svhn": "sequence"}
DEFAULT_TASK = "classification"
# colocalisation (data_prep coloc): the target is the class (`cls`), as for classification; the boxes
# in the samples' json are read by the evaluation only
TASKS = ("classification", "sequence", "colocalisation")
DEFAULT_MAX_LENGTH = 5  # SVHN sequences (paper A.4): up to 5 digits


class DataError(ValueError):
    """Unusable data (manifest, shard or sample); the message is one line naming the file or key."""


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
        shard_name = _require(shard, "name", str, shard_where)
        _require(shard, "num_samples", int, shard_where)
        shard_path = root / shard_name
        if not shard_path.is_file():
            raise DataError(f"{path}: shard {shard_name} of split '{name}' is listed but missing: {shard_path}")
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
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    dataset = _require(raw, "dataset", str, str(path))
    splits = _require(raw, "splits", dict, str(path))
    if not splits:
        raise DataError(f"{path}: 'splits' is empty")
    task = raw.get("task") or TASK_OF_DATASET.get(dataset, DEFAULT_TASK)
    if task not in TASKS:
        raise DataError(f"{path}: task '{task}' is not one of {', '.join(TASKS)}")
    return Manifest(
        root=root, dataset=dataset, task=task, classes=list(raw.get("classes") or []),
        parts=list(raw.get("parts") or []),
        splits={name: _check_split(root, path, name, split, verify_checksums) for name, split in splits.items()},
        max_length=int(raw.get("max_length", DEFAULT_MAX_LENGTH)), raw=raw)
