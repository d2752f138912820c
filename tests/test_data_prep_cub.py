"""data_prep cub on the real CUB-200-2011 samples in tests/data: round trip, counts, manifest, CLI."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_DATA, need_program
from data_prep import DataPrepError, cub
from data_prep.__main__ import main as data_prep_main

METADATA = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
            "parts/part_locs.txt")


def make_cub_root(samples: Path, dest: Path) -> Path:
    """A complete CUB root: the sample images, metadata filtered to the ids whose image is present."""
    src = samples / "cub" / "CUB_200_2011"
    root = dest / "CUB_200_2011"
    shutil.copytree(src / "images", root / "images")
    (root / "parts").mkdir()
    shutil.copy(src / "classes.txt", root / "classes.txt")
    shutil.copy(src / "parts" / "parts.txt", root / "parts" / "parts.txt")
    present = {line.split()[0] for line in (src / "images.txt").read_text().splitlines()
               if line.strip() and (src / "images" / line.split(maxsplit=1)[1]).exists()}
    for name in METADATA:
        lines = [l for l in (src / name).read_text().splitlines(keepends=True) if l.strip() and l.split()[0] in present]
        (root / name).write_text("".join(lines))
    return root


def raw_records(root: Path) -> dict:
    """What the raw files say, parsed here independently of data_prep: id -> record."""
    def table(name):
        return [l.split() for l in (root / name).read_text().splitlines() if l.strip()]
    images = {int(r[0]): r[1] for r in table("images.txt")}
    records = {i: {"file": f, "parts": []} for i, f in images.items()}
    for i, c in table("image_class_labels.txt"):
        records[int(i)]["class_id"] = int(c)
    for i, t in table("train_test_split.txt"):
        records[int(i)]["split"] = "train" if t == "1" else "test"
    for i, *box in table("bounding_boxes.txt"):
        records[int(i)]["bbox"] = [float(v) for v in box]
    for i, _, x, y, v in table("parts/part_locs.txt"):
        records[int(i)]["parts"].append([float(x), float(y), int(v)])
    return records


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    return make_cub_root(SAMPLE_DATA, tmp_path_factory.mktemp("cub_raw"))


@pytest.fixture(scope="module")
def cub_out(cub_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cub_shards")
    manifest = cub.prepare(cub_root, out, shard_size=7)
    return out, manifest


def read_back(out: Path, manifest: dict) -> dict:
    """Every sample of every split, read with webdataset: split -> [sample dict]."""
    import webdataset as wds

    result = {}
    for split, info in manifest["splits"].items():
        urls = [str(out / s["name"]) for s in info["shards"]]
        result[split] = list(wds.WebDataset(urls, shardshuffle=False)) if urls else []
    return result


def test_round_trip_equals_raw_files(cub_root, cub_out):
    out, manifest = cub_out
    raw = raw_records(cub_root)
    seen = set()
    for split, samples in read_back(out, manifest).items():
        for sample in samples:
            meta = json.loads(sample["json"])
            rec = raw[meta["id"]]
            assert sample["__key__"] == f"{meta['id']:06d}"
            assert rec["split"] == split
            assert sample["jpg"] == (cub_root / "images" / rec["file"]).read_bytes()  # original bytes
            assert int(sample["cls"]) == rec["class_id"] - 1 == meta["label"]
            assert meta["class_id"] == rec["class_id"]
            assert meta["class_name"] == manifest["classes"][rec["class_id"] - 1] == "Black_footed_Albatross"
            assert meta["bbox"] == rec["bbox"]
            assert meta["parts"] == rec["parts"] and len(meta["parts"]) == 15
            assert meta["size"] == list(Image.open(io.BytesIO(sample["jpg"])).size)
            seen.add(meta["id"])
    assert seen == set(raw)


def test_counts_follow_official_split(cub_root, cub_out):
    out, manifest = cub_out
    raw = raw_records(cub_root)
    for split in ("train", "test"):
        expected = sum(r["split"] == split for r in raw.values())
        assert manifest["splits"][split]["num_samples"] == expected == 30
        # 30 in shards of at most 7: five of 6, not 7, 7, 7, 7 and a shard of 2
        assert [s["num_samples"] for s in manifest["splits"][split]["shards"]] == [6, 6, 6, 6, 6]
    assert manifest["dataset"] == "cub" and manifest["format_version"] == 1
    assert len(manifest["classes"]) == 200 and manifest["skipped"] == []
    assert len(manifest["parts"]) == 15 and "left eye" in manifest["parts"]


def test_manifest_checksums_and_tar_listing(cub_out):
    out, manifest = cub_out
    tar = need_program("tar")
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == sorted(s["name"] for v in manifest["splits"].values() for s in v["shards"])
    assert names[0] == "test-000000.tar" and names[-1] == "train-000004.tar"
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            data = (out / shard["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
            members = subprocess.run([tar, "tf", str(out / shard["name"])], check=True, capture_output=True,
                                     text=True).stdout.split()
            assert len(members) == 3 * shard["num_samples"]
            assert {m.rsplit(".", 1)[1] for m in members} == {"cls", "jpg", "json"}


def test_output_decodes_to_rgb(cub_out):
    out, manifest = cub_out
    from pipeline.data import decode_rgb

    for sample in read_back(out, manifest)["test"][:3]:  # through the training pipeline's own decoder
        array, size = decode_rgb(sample["jpg"])
        reference = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float64)
        assert array.dtype == np.uint8 and array.shape == (size[1], size[0], 3)
        assert list(size) == json.loads(sample["json"])["size"]
        assert np.abs(array - reference).mean() < 2.0  # the same picture as PIL reads, in RGB order


def test_class_subset_relabels_from_zero_and_limit(cub_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(cub_root, root)
    labels = root / "image_class_labels.txt"  # move ids 1-20 to class 5 to get a second class
    labels.write_text("".join(f"{i} {5 if int(i) <= 20 else c}\n" for i, c in
                              (l.split() for l in labels.read_text().splitlines())))
    manifest = cub.prepare(root, tmp_path / "out", classes="5", limit=4, shard_size=3)
    assert manifest["classes"] == ["Crested_Auklet"] and manifest["class_ids"] == [5]
    samples = read_back(tmp_path / "out", manifest)
    assert [len(samples[s]) for s in ("train", "test")] == [4, 4]
    for sample in samples["train"] + samples["test"]:
        meta = json.loads(sample["json"])
        assert int(sample["cls"]) == 0 and meta["class_id"] == 5 and meta["id"] <= 20
    ids = [json.loads(s["json"])["id"] for s in samples["train"]]
    assert ids == sorted(ids)  # the lowest ids, in order
    whole = cub.prepare(root, tmp_path / "whole", classes="5", shard_size=3)
    raw = raw_records(root)
    for split in ("train", "test"):  # the official split restricted to the subset
        expected = sum(r["split"] == split and r["class_id"] == 5 for r in raw.values())
        assert whole["splits"][split]["num_samples"] == expected > 4
    with pytest.raises(DataPrepError, match="--classes: '0-3'"):
        cub.prepare(root, tmp_path / "out2", classes="0-3")


@pytest.mark.slow
def test_default_shard_size_gives_64_train_shards_on_full_cub(sample_data, tmp_path):
    """The full official metadata (11,788 ids), with empty stand-in image files: plan only."""
    src = sample_data / "cub" / "CUB_200_2011"
    root = tmp_path / "CUB_200_2011"
    (root / "parts").mkdir(parents=True)
    for name in METADATA + ("classes.txt", "parts/parts.txt"):
        shutil.copy(src / name, root / name)
    for line in (src / "images.txt").read_text().splitlines():
        path = root / "images" / line.split()[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    plan = cub.make_plan(root)
    by_split = {s: [spec for spec in plan.specs if spec.split == s] for s in ("train", "test")}
    assert sum(len(s.items) for s in by_split["train"]) == 5994
    assert sum(len(s.items) for s in by_split["test"]) == 5794
    assert len(by_split["train"]) >= 64 and plan.options["shard_size"] == 90
    subset = cub.make_plan(root, classes="1-50")
    assert len([s for s in subset.specs if s.split == "train"]) >= 64


@pytest.mark.multiprocess  # --workers 2: a process pool
def test_cli_writes_and_verify_passes(cub_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert data_prep_main(["cub", "--root", str(cub_root), "--out", str(out), "--limit", "5",
                           "--shard-size", "2", "--workers", "2"]) == 0
    assert "train: 5 in 3 shards" in capsys.readouterr().out
    assert data_prep_main(["verify", str(out)]) == 0
    assert "verify: ok: cub, 6 shards, 10 samples" in capsys.readouterr().out
    # same flags again: everything is already complete, nothing rewritten
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert data_prep_main(["cub", "--root", str(cub_root), "--out", str(out), "--limit", "5",
                           "--shard-size", "2"]) == 0
    assert "wrote 0 shard(s), 6 already complete" in capsys.readouterr().err
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}


def test_a_small_set_gets_fewer_shards_not_one_sample_ones(cub_root, tmp_path):
    manifest = cub.prepare(cub_root, tmp_path / "out")  # default shard size: train / 64, at least 16
    for split in manifest["splits"].values():
        sizes = [shard["num_samples"] for shard in split["shards"]]
        assert all(size == cub.MIN_SHARD_SIZE for size in sizes[:-1]) and 0 < sizes[-1] <= cub.MIN_SHARD_SIZE
    assert sum(s["num_samples"] for s in manifest["splits"]["train"]["shards"]) > cub.MIN_SHARD_SIZE  # several shards


def test_small_sets_get_no_one_sample_shards(cub_root):
    """17 images at the default size (16): two shards of 8 and 9, not 16 and 1; an explicit size
    stays the most a shard holds."""
    plan = cub.make_plan(cub_root, limit=17)
    assert plan.options["shard_size"] == cub.MIN_SHARD_SIZE == 16
    for split in ("train", "test"):
        assert [len(s.items) for s in plan.specs if s.split == split] == [8, 9]
    sizes = [len(s.items) for s in cub.make_plan(cub_root, shard_size=4).specs if s.split == "train"]
    assert sizes == [4, 4, 4, 4, 4, 4, 4, 2]  # a last shard of half a shard or more stays as it is
    assert chunk_specs_sizes(33, 16) == [11, 11, 11] and chunk_specs_sizes(40, 16) == [16, 16, 8]
    assert chunk_specs_sizes(1, 16) == [1] and chunk_specs_sizes(0, 16) == []


def chunk_specs_sizes(count: int, shard_size: int) -> list:
    from data_prep.jobs import chunk_specs

    return [len(spec.items) for spec in chunk_specs("train", list(range(count)), shard_size)]
