"""data_prep svhn: real format-1 test samples, and fixtures written in the true formats
(h5py for the MATLAB v7.3 digitStruct.mat, scipy.io.savemat for the v5 *_32x32.mat files)."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from conftest import SAMPLE_DATA
from data_prep import DataPrepError, svhn
from data_prep.__main__ import main as data_prep_main
from data_prep.verify import verify
from test_data_prep_cub import read_back


def write_digit_struct(path: Path, entries) -> None:
    """digitStruct.mat as MATLAB v7.3 writes it: (N,1) references to names (uint16 codes) and bbox
    groups whose fields are an inline (1,1) double for one digit, (k,1) references for k digits."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        names, boxes = [], []
        for i, (name, digit_boxes) in enumerate(entries):
            names.append(refs.create_dataset(f"n{i}", data=np.array([[ord(c)] for c in name], np.uint16)).ref)
            group = refs.create_group(f"b{i}")
            for field, values in zip(svhn.FIELDS, zip(*digit_boxes)):
                if len(values) == 1:
                    group.create_dataset(field, data=np.array([[values[0]]], np.float64))
                else:
                    value_refs = [refs.create_dataset(f"v{i}_{field}_{j}", data=np.array([[v]], np.float64)).ref
                                  for j, v in enumerate(values)]
                    group.create_dataset(field, data=np.array(value_refs, dtype=h5py.ref_dtype).reshape(-1, 1))
            boxes.append(group.ref)
        struct = f.create_group("digitStruct")
        struct.create_dataset("name", data=np.array(names, dtype=h5py.ref_dtype).reshape(-1, 1))
        struct.create_dataset("bbox", data=np.array(boxes, dtype=h5py.ref_dtype).reshape(-1, 1))
    with open(path, "r+b") as f:  # the MATLAB header in the user block
        f.write(b"MATLAB 7.3 MAT-file, Platform: test, Created by h5py".ljust(128, b" "))


def write_format1(folder: Path, entries, size=(80, 40), seed=0) -> None:
    """entries: [(name, [(left, top, width, height, label), ...])]; images are random RGB PNGs."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, _ in entries:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    write_digit_struct(folder / "digitStruct.mat", entries)


TRAIN = [
    ("1.png", [(30, 5, 10, 20, 10)]),                                      # one digit, stored inline; 10 = 0
    ("2.png", [(10, 8, 9, 22, 1), (20, 9, 9, 22, 2), (30, 8, 9, 21, 3)]),  # three digits, by reference
    ("3.png", [(2 + 10 * k, 5, 9, 20, 1 + k) for k in range(6)]),           # six digits: left out
    ("4.png", [(-5, 25, 12, 30, 4), (60, 10, 30, 12, 5)]),                  # boxes past the left/bottom/right edges
    ("5.png", [(2 + 10 * k, 5, 9, 20, 1 + k) for k in range(5)]),           # five digits: kept
    ("6.png", [(35, 12, 8, 14, 7)]),
    ("7.png", [(30, 10, 10, 18, 8), (41, 10, 10, 18, 9)]),
    ("8.png", [(33, 11, 9, 16, 6)]),
]


@pytest.fixture
def svhn_root(tmp_path) -> Path:
    root = tmp_path / "svhn"
    write_format1(root / "train", TRAIN)
    write_format1(root / "extra", TRAIN[:3], seed=1)
    return root


def samples_by_key(out: Path, manifest: dict) -> dict:
    return {s["__key__"]: s for samples in read_back(out, manifest).values() for s in samples}


def test_real_test_samples_digits_boxes_and_crop(tmp_path):
    root = tmp_path / "svhn"
    shutil.copytree(SAMPLE_DATA / "svhn" / "test", root / "test")
    out = tmp_path / "out"
    manifest = svhn.prepare(root, out, split="test", skip_missing=True, shard_size=2)
    assert manifest["dataset"] == "svhn" and manifest["task"] == "sequence"
    assert manifest["splits"]["test"]["num_samples"] == 3 and len(manifest["skipped"]) == 37
    assert {"key": "test_000004", "reason": "missing: test/4.png"} in manifest["skipped"]
    sample = samples_by_key(out, manifest)["test_000002"]
    meta = json.loads(sample["json"])
    assert meta["name"] == "2.png" and meta["digits"] == [2, 1, 0] and meta["length"] == 3  # "210"
    original = Image.open(root / "test" / "2.png").convert("RGB")
    assert meta["size"] == list(original.size) == [182, 48]
    # raw boxes (left, top, width, height): 99,5,14,23 / 114,8,8,23 / 121,6,12,23; union x 99..133, y 5..31
    x0, y0, x1, y1 = 99, 5, 133, 31
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * 1.3, (y1 - y0) * 1.3
    crop = [cx - w / 2, max(0, cy - h / 2), cx + w / 2, min(48, cy + h / 2)]
    assert meta["crop"] == pytest.approx(crop, abs=0.01)
    sx, sy = 64 / (crop[2] - crop[0]), 64 / (crop[3] - crop[1])
    assert meta["boxes"][0] == pytest.approx([(99 - crop[0]) * sx, (5 - crop[1]) * sy, 14 * sx, 23 * sy], abs=0.01)
    assert meta["boxes"][1][0] == pytest.approx((114 - crop[0]) * sx, abs=0.01)
    image = Image.open(io.BytesIO(sample["png"]))
    assert image.size == (64, 64) and image.mode == "RGB"
    expected = original.resize((64, 64), Image.BILINEAR, box=tuple(meta["crop"]))
    assert np.abs(np.asarray(image, int) - np.asarray(expected, int)).max() <= 1


def test_inline_and_referenced_entries_clamping_and_long_sequences(svhn_root, tmp_path):
    out = tmp_path / "out"
    manifest = svhn.prepare(svhn_root, out, split="train", shard_size=3)
    assert manifest["skipped"] == [{"key": "train_000003", "reason": "too many digits: 6 > 5"}]
    assert manifest["splits"]["train"]["num_samples"] == 7
    samples = samples_by_key(out, manifest)
    meta = {k: json.loads(s["json"]) for k, s in samples.items()}
    assert meta["train_000001"]["digits"] == [0] and meta["train_000001"]["length"] == 1
    assert meta["train_000002"]["digits"] == [1, 2, 3] and len(meta["train_000002"]["boxes"]) == 3
    assert meta["train_000005"]["digits"] == [1, 2, 3, 4, 5]
    clamped = meta["train_000004"]
    # clamped digit boxes x 0..7 / 60..80, y 25..40 / 10..22: union y 10..40 grown to 5.5..44.5, clamped
    assert clamped["digits"] == [4, 5] and clamped["crop"] == [0.0, 5.5, 80.0, 40.0]
    for m in meta.values():
        for x, y, w, h in m["boxes"]:
            assert 0 <= x and 0 <= y and x + w <= 64.01 and y + h <= 64.01 and w > 0 and h > 0
    sx, sy = 64 / 80, 64 / 34.5  # the 80 x 34.5 crop resized to 64 x 64
    assert clamped["boxes"][0] == pytest.approx([0, 19.5 * sy, 7 * sx, 15 * sy], abs=0.01)
    assert clamped["boxes"][1] == pytest.approx([60 * sx, 4.5 * sy, 20 * sx, 12 * sy], abs=0.01)


def test_size_128_keeps_digit_scale_with_more_background(tmp_path):
    root = tmp_path / "svhn"
    write_format1(root / "test", [("1.png", [(90, 90, 10, 20, 3)])], size=(200, 200))
    small = svhn.prepare(root, tmp_path / "s64", split="test")
    large = svhn.prepare(root, tmp_path / "s128", split="test", size=128)
    m64 = json.loads(samples_by_key(tmp_path / "s64", small)["test_000001"]["json"])
    m128 = json.loads(samples_by_key(tmp_path / "s128", large)["test_000001"]["json"])
    w64, w128 = m64["crop"][2] - m64["crop"][0], m128["crop"][2] - m128["crop"][0]
    assert w64 == pytest.approx(13) and w128 == pytest.approx(26)
    assert m128["boxes"][0][2] == pytest.approx(m64["boxes"][0][2], abs=0.01)  # same pixels per digit
    assert Image.open(io.BytesIO(samples_by_key(tmp_path / "s128", large)["test_000001"]["png"])).size == (128, 128)


def test_format2_single_digits_round_trip(tmp_path):
    root = tmp_path / "svhn"
    root.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3, 7), dtype=np.uint8)
    labels = np.array([[10], [1], [2], [3], [9], [10], [5]], np.uint8)
    scipy.io.savemat(root / "test_32x32.mat", {"X": pixels, "y": labels})
    out = tmp_path / "out"
    manifest = svhn.prepare(root, out, split="test", shard_size=3)
    assert manifest["task"] == "classification" and manifest["splits"]["test"]["num_samples"] == 7
    for i, sample in enumerate(read_back(out, manifest)["test"]):
        assert sample["__key__"] == f"test_{i + 1:06d}"
        assert int(sample["cls"]) == labels[i, 0] % 10 == json.loads(sample["json"])["digits"][0]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), pixels[:, :, :, i])
    assert verify(out)[0] == []
    (root / "train_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataPrepError, match="train_32x32.mat: not a MATLAB v5 file"):
        svhn.prepare(root, tmp_path / "bad", split="train", fmt="2")


@pytest.mark.multiprocess  # --workers 2: a process pool
def test_train_extra_merged_with_seeded_validation_split(svhn_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert data_prep_main(["svhn", "--root", str(svhn_root), "--out", str(out), "--split", "train+extra",
                           "--val-from-train", "2", "--shard-size", "2", "--workers", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["train", "val"]
    samples = read_back(out, manifest)
    val_keys = [s["__key__"] for s in samples["val"]]
    train_keys = [s["__key__"] for s in samples["train"]]
    assert len(val_keys) == 2 and all(k.startswith("train_") for k in val_keys)
    assert not set(val_keys) & set(train_keys)
    # 8 train - 2 val + 3 extra, minus the six-digit entries (one per source unless it went to val)
    assert len(train_keys) + len(val_keys) == 11 - 2
    assert {json.loads(s["json"])["source"] for s in samples["train"]} == {"train", "extra"}
    assert data_prep_main(["verify", str(out)]) == 0
    again = svhn.make_plan(svhn_root, split="train+extra", val_from_train=2, shard_size=2)
    assert [e["key"] for s in again.specs if s.split == "val" for _, e in s.items] == sorted(val_keys)
    other = svhn.make_plan(svhn_root, split="train+extra", val_from_train=2, seed=3, shard_size=2)
    assert [e["key"] for s in other.specs if s.split == "val" for _, e in s.items] != sorted(val_keys)


@pytest.mark.parametrize("argv, message", [
    (["--split", "train,bogus"], "unknown split 'bogus'"),
    (["--split", "test"], "test/digitStruct.mat (format 1) or"),
    (["--split", "train", "--val-from-train", "50"], "--val-from-train 50: train has 8 entries"),
    (["--split", "extra", "--val-from-train", "2"], "needs 'train'"),
    (["--split", "train,test"], "mixes SVHN formats (train: format 1, test: format 2)"),
])
def test_bad_svhn_input_is_one_line_error(svhn_root, tmp_path, capsys, argv, message):
    if "train,test" in argv:
        scipy.io.savemat(svhn_root / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1))})
    out = tmp_path / "out"
    assert data_prep_main(["svhn", "--root", str(svhn_root), "--out", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not out.exists()


def test_missing_and_corrupt_pictures(svhn_root, tmp_path, capsys):
    (svhn_root / "train" / "8.png").unlink()
    (svhn_root / "train" / "6.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "out"
    assert data_prep_main(["svhn", "--root", str(svhn_root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "train/8.png: image of entry 8" in err and "--skip-missing" in err and not out.exists()
    manifest = svhn.prepare(svhn_root, out, skip_missing=True, shard_size=4)
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert reasons["train_000008"] == "missing: train/8.png" and reasons["train_000006"].startswith("corrupt: train/6.png")
    assert manifest["splits"]["train"]["num_samples"] == 8 - 3  # missing, corrupt, six digits
    with pytest.raises(DataPrepError, match="6.png: unreadable image"):
        svhn.prepare(svhn_root, tmp_path / "strict", skip_missing=True, strict=True)
    assert not (tmp_path / "strict" / "manifest.json").exists()



def test_verify_checks_svhn_labels_and_boxes(svhn_root, tmp_path):
    from data_prep.shards import encode_png, write_json_atomic, write_shard

    out = tmp_path / "out"
    manifest = svhn.prepare(svhn_root, out, split="train", shard_size=4)
    assert verify(out)[0] == []
    png = encode_png(np.zeros((64, 64, 3), np.uint8))
    bad = [{"__key__": "bad_1", "png": png, "json": {"id": "bad_1", "digits": [1, 12], "length": 2, "source": "train",
                                                       "boxes": [[0, 0, 10, 10], [60, 0, 10, 10]]}},
           {"__key__": "bad_2", "png": png, "json": {"id": "bad_2", "digits": [1], "length": 3, "source": "train",
                                                       "boxes": [[0, 0, 10, 10]]}}]
    manifest["splits"]["train"]["shards"][0] = write_shard(out / "train-000000.tar", bad)
    manifest["splits"]["train"]["num_samples"] = sum(s["num_samples"] for s in manifest["splits"]["train"]["shards"])
    write_json_atomic(out / "manifest.json", manifest)
    problems = "\n".join(verify(out)[0])
    assert "sample bad_1: digits [1, 12] not all in 0..9" in problems
    assert "sample bad_1: box [60, 0, 10, 10] reaches outside the 64x64 image" in problems
    assert "sample bad_2: length 3 with 1 digits" in problems


def test_digit_struct_without_a_field_is_one_line_error(svhn_root, tmp_path, capsys):
    path = svhn_root / "train" / "digitStruct.mat"
    with h5py.File(path, "r+") as f:
        del f[f["digitStruct/bbox"][1, 0]]["top"]  # entry 2 (three digits) loses its 'top'
    assert data_prep_main(["svhn", "--root", str(svhn_root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: entry 2 has no 'top' in its bbox"
    assert not (tmp_path / "out" / "manifest.json").exists()
    # shards before the bad entry are complete (a rerun keeps them); its own never appears
    assert not (tmp_path / "out" / "train-000001.tar").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if ".partial-" in p.name]
