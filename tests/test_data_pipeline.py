"""Data pipeline: manifest checks, train/eval webdataset loaders, decoding, augmentation geometry."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile

import pytest
from PIL import Image

from shard_fixtures import CUB_PART_NAMES, write_tiny_cub_shards, write_tiny_svhn_shards


def _tar_members(path):
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_fixture_writes_cub_contract(tmp_path):
    root = write_tiny_cub_shards(tmp_path, num_classes=2, train_per_class=3, test_per_class=2, grayscale=["000002"])
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["dataset"] == "cub" and manifest["task"] == "classification"
    assert manifest["parts"] == CUB_PART_NAMES and len(manifest["classes"]) == 2
    assert manifest["splits"]["train"]["num_samples"] == 6
    shard = manifest["splits"]["train"]["shards"][0]
    assert (root / shard["name"]).stat().st_size == shard["bytes"]
    names = _tar_members(root / shard["name"])
    assert names[:3] == ["000001.cls", "000001.jpg", "000001.json"]
    with tarfile.open(root / shard["name"]) as tar:
        meta = json.load(tar.extractfile("000001.json"))
        img = Image.open(io.BytesIO(tar.extractfile("000001.jpg").read()))
        gray = Image.open(io.BytesIO(tar.extractfile("000002.jpg").read()))
    assert img.format == "JPEG" and list(img.size) == meta["size"] and img.mode == "RGB"
    assert gray.mode == "L"
    assert len(meta["parts"]) == 15 and len(meta["bbox"]) == 4


def test_fixture_writes_svhn_contract(tmp_path):
    root = write_tiny_svhn_shards(tmp_path, train_samples=5, test_samples=3)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["dataset"] == "svhn" and manifest["task"] == "sequence"
    listed = subprocess.run(["tar", "tf", str(root / "test-000000.tar")], capture_output=True, text=True, check=True)
    assert listed.stdout.split()[:2] == ["test_000006.json", "test_000006.png"]
    with tarfile.open(root / "test-000000.tar") as tar:
        meta = json.load(tar.extractfile("test_000006.json"))
    assert meta["length"] == len(meta["digits"]) == len(meta["boxes"]) and 1 <= meta["length"] <= 5
