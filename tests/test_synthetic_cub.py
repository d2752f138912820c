"""The embedded fine-grained dataset: CUB's on-disk layout, determinism, and the class detail.

    .venv/bin/python -m pytest -q tests/test_synthetic_cub.py
"""
from __future__ import annotations

import filecmp
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import DataPrepError
from data_prep import __main__ as data_prep_cli
from data_prep import synthetic_cub as sc
from tests.conftest import PYTHON, REPO, subprocess_env

SIZE = 96
OPTIONS = dict(classes=4, images_per_class=4, size=SIZE, seed=3, test_fraction=0.5)


def read_table(path: Path) -> list[list[str]]:
    return [line.split(" ") for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return sc.generate(tmp_path_factory.mktemp("synthetic") / "CUB_200_2011", **OPTIONS)


def test_layout_parses_like_cub(root: Path):
    n_images = OPTIONS["classes"] * OPTIONS["images_per_class"]
    classes = read_table(root / "classes.txt")
    assert [int(c[0]) for c in classes] == list(range(1, OPTIONS["classes"] + 1))
    for class_id, name in classes:
        assert re.fullmatch(rf"{int(class_id):03d}\.[A-Za-z_]+", name)

    images = read_table(root / "images.txt")
    labels = dict(read_table(root / "image_class_labels.txt"))
    split = dict(read_table(root / "train_test_split.txt"))
    boxes = {row[0]: [float(v) for v in row[1:]] for row in read_table(root / "bounding_boxes.txt")}
    assert [int(i) for i, _ in images] == list(range(1, n_images + 1))
    assert set(labels) == set(split) == set(boxes) == {i for i, _ in images}
    for image_id, rel in images:
        folder = rel.split("/")[0]
        assert folder == classes[int(labels[image_id]) - 1][1]  # the folder is the labelled class
        with Image.open(root / "images" / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
        x, y, w, h = boxes[image_id]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE

    # each class is split in half: 1 = train, 0 = test
    per_class = {}
    for image_id, flag in split.items():
        per_class.setdefault(labels[image_id], []).append(int(flag))
    assert all(sorted(flags) == [0, 0, 1, 1] for flags in per_class.values())


def test_parts_like_cub(root: Path):
    parts = read_table(root / "parts" / "parts.txt")
    assert [(int(p[0]), " ".join(p[1:])) for p in parts] == list(enumerate(sc.PART_NAMES, start=1))
    boxes = {int(row[0]): [float(v) for v in row[1:]] for row in read_table(root / "bounding_boxes.txt")}
    locs = read_table(root / "parts" / "part_locs.txt")
    assert len(locs) == 15 * len(boxes)
    seen_sides = set()
    for row_index, (image_id, part_id, px, py, visible) in enumerate(locs):
        image_id, part_id, px, py = int(image_id), int(part_id), float(px), float(py)
        assert (image_id, part_id) == (row_index // 15 + 1, row_index % 15 + 1)  # CUB's row order
        name = sc.PART_NAMES[part_id - 1]
        if visible == "0":
            assert (px, py) == (0.0, 0.0), "invisible parts are written as 0 0 0, like CUB"
            assert name.startswith(("left ", "right ")), f"only far-side parts hide, not {name}"
            continue
        assert visible == "1"
        x, y, w, h = boxes[image_id]
        assert x <= px <= x + w and y <= py <= y + h, f"image {image_id}: {name} outside the bird box"
    # per image, exactly one side of the bird shows, and its eye, wing and leg together
    for image_id in boxes:
        rows = locs[(image_id - 1) * 15:image_id * 15]
        visible = {sc.PART_NAMES[int(r[1]) - 1] for r in rows if r[4] == "1"}
        sides = {side for side in ("left", "right") if f"{side} eye" in visible}
        assert len(sides) == 1
        side = sides.pop()
        assert {f"{side} wing", f"{side} leg"} <= visible
        seen_sides.add(side)
        assert len(visible) == 12
    assert seen_sides == {"left", "right"}, "birds face both ways"


def test_formats_match_the_real_cub_files(root: Path, sample_data: Path):
    real = sample_data / "cub" / "CUB_200_2011"
    assert (root / "parts" / "parts.txt").read_text() == (real / "parts" / "parts.txt").read_text()
    number, flt = r"\d+", r"\d+\.\d+"
    line_formats = {
        "images.txt": rf"{number} \d{{3}}\.\w+/\w+\.jpg",
        "classes.txt": rf"{number} \d{{3}}\.\w+",
        "image_class_labels.txt": rf"{number} {number}",
        "train_test_split.txt": rf"{number} [01]",
        "bounding_boxes.txt": rf"{number} {flt} {flt} {flt} {flt}",
        "parts/part_locs.txt": rf"{number} {number} {flt} {flt} [01]",
    }
    for name, pattern in line_formats.items():
        for which in (real, root):
            text = (which / name).read_text()
            assert text.endswith("\n") and "\r" not in text
            first = text.splitlines()[:200]
            bad = [line for line in first if not re.fullmatch(pattern, line)]
            assert not bad, f"{which / name}: {bad[:2]} does not match {pattern}"


def test_same_seed_same_bytes_other_seed_differs(root: Path, tmp_path: Path):
    again = sc.generate(tmp_path / "again", **OPTIONS)
    compare = filecmp.dircmp(root, again)
    files = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    assert len(files) == 9 + OPTIONS["classes"] * OPTIONS["images_per_class"]
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), f"{rel} differs for the same seed"
    assert not compare.left_only and not compare.right_only

    other = sc.generate(tmp_path / "other", **{**OPTIONS, "seed": 4})
    images = sorted(p.relative_to(root) for p in (root / "images").rglob("*.jpg"))
    assert all((root / p).read_bytes() != (other / p).read_bytes() for p in images)
    assert (root / "bounding_boxes.txt").read_text() != (other / "bounding_boxes.txt").read_text()


def high_frequency_energy(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared difference of horizontally and vertically adjacent pixels inside `mask`."""
    grey = image.astype(np.float64).mean(axis=2)
    dx = np.diff(grey, axis=1)[mask[:, 1:] & mask[:, :-1]]
    dy = np.diff(grey, axis=0)[mask[1:, :] & mask[:-1, :]]
    return float(np.mean(np.concatenate([dx, dy]) ** 2))


def disc(centre, radius, size):
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius ** 2


def test_classes_differ_only_in_the_crown_and_wing_detail():
    """The same scene drawn as two classes: only the patterned part changes, and it gains texture."""
    plain, barred_crown, barred_wing = (sc.BirdClass("plain", "plain"), sc.BirdClass("stripes", "plain"),
                                        sc.BirdClass("plain", "stripes"))
    size = 128
    for seed in range(3):
        draw = {c: sc.draw_bird_image(c, size, sc.image_rng(7, seed)) for c in (plain, barred_crown, barred_wing)}
        base = draw[plain]
        crown = np.array(base.parts[sc.PART_NAMES.index("crown")][:2])
        head_radius = 0.62 * base.params["body_half_length"]
        for cls, part in ((barred_crown, "crown"), (barred_wing, "wing")):
            other = draw[cls]
            assert other.bbox == base.bbox and other.parts == base.parts  # same scene, same bird
            assert other.params["head_pattern"] == cls.head and other.params["wing_pattern"] == cls.wing
            changed = np.abs(other.image.astype(int) - base.image.astype(int)).max(axis=2) > 40
            assert changed.sum() > 10, f"class {cls.name} drew no visible {part} detail"
            x, y, w, h = base.bbox
            ys, xs = np.nonzero(changed)
            assert xs.min() >= x - 1 and xs.max() <= x + w and ys.min() >= y - 1 and ys.max() <= y + h
            if part == "crown":
                head = disc(crown, 1.6 * head_radius, size)
                assert changed[head].sum() > 0.9 * changed.sum(), "a crown class changed more than the head"
                eye = next(p[:2] for p, name in zip(base.parts, sc.PART_NAMES) if name.endswith("eye") and p[2])
                inner = disc(crown, 0.5 * head_radius, size) & ~disc(eye, 0.35 * head_radius, size)
                assert high_frequency_energy(other.image, inner) > 4 * high_frequency_energy(base.image, inner)


def test_class_table_and_params_agree(root: Path):
    made = json.loads((root / sc.MANIFEST_NAME).read_text())
    assert made["options"]["seed"] == OPTIONS["seed"]
    table = {c["id"]: (c["head_pattern"], c["wing_pattern"]) for c in made["classes"]}
    assert len(set(table.values())) == len(table), "two classes share a detail pair"
    for line in (root / "synthetic_params.jsonl").read_text().splitlines():
        p = json.loads(line)
        assert (p["head_pattern"], p["wing_pattern"]) == table[p["class_id"]]


def test_class_counts_grow_as_squares():
    pairs = [(c.head, c.wing) for c in sc.bird_classes(9)]
    assert sorted(set(h for h, _ in pairs)) == sorted(set(w for _, w in pairs)) == ["dots", "plain", "stripes"]
    assert len(set(pairs)) == 9
    assert len({c.name for c in sc.bird_classes(sc.MAX_CLASSES)}) == sc.MAX_CLASSES
    with pytest.raises(DataPrepError, match="classes=26"):
        sc.bird_classes(26)


@pytest.mark.parametrize("argv, key", [
    (["--classes", "0"], "classes=0"),
    (["--size", "32"], "size=32"),
    (["--test-fraction", "1.0"], "test_fraction=1.0"),
    (["--images-per-class", "0"], "images_per_class=0"),
    (["--bird-size", "3"], "bird_size=3.0"),
    (["--patterned-distractors", "1.5"], "patterned_distractors=1.5"),
])
def test_bad_options_fail_with_one_line(tmp_path: Path, capsys, argv, key):
    out = tmp_path / "root"
    assert data_prep_cli.main(["synthetic-cub", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and key in err and "\n" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_rerun_keeps_refuses_and_overwrites(tmp_path: Path, capsys):
    out = tmp_path / "root"
    args = ["synthetic-cub", "--out", str(out), "--classes", "2", "--images-per-class", "1", "--size", "64"]
    assert data_prep_cli.main(args) == 0
    before = (out / "bounding_boxes.txt").stat().st_mtime_ns
    assert data_prep_cli.main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "bounding_boxes.txt").stat().st_mtime_ns == before

    assert data_prep_cli.main([*args, "--seed", "1"]) == 2
    assert "other options" in capsys.readouterr().err
    assert data_prep_cli.main([*args, "--seed", "1", "--overwrite"]) == 0
    assert json.loads((out / sc.MANIFEST_NAME).read_text())["options"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"], "no temporary folders left"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert data_prep_cli.main(["synthetic-cub", "--out", str(foreign)]) == 2
    assert "other files" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_command_line_entry_point_and_contact_sheet(tmp_path: Path):
    sheet = tmp_path / "sheet.png"
    done = subprocess.run(
        [PYTHON, "-m", "data_prep", "synthetic-cub", "--out", str(tmp_path / "root"), "--classes", "2",
         "--images-per-class", "2", "--size", "64", "--sheet", str(sheet)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "4 images, 2 classes, 2 train / 2 test" in done.stdout
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width >= 2 * 3 * 64 and im.height >= 64
    assert len(list((tmp_path / "root" / "images").rglob("*.jpg"))) == 4


def test_data_prep_cub_shards_the_generated_root(root: Path, tmp_path: Path, capsys):
    """The real CUB path runs unchanged on the synthetic root, and every sample reads back as drawn."""
    import webdataset as wds

    out = tmp_path / "shards"
    assert data_prep_cli.main(["cub", "--root", str(root), "--out", str(out), "--shard-size", "3"]) == 0
    assert data_prep_cli.main(["verify", str(out)]) == 0, capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    made = json.loads((root / sc.MANIFEST_NAME).read_text())
    assert manifest["classes"] == [c["name"].split(".", 1)[1] for c in made["classes"]]
    assert manifest["parts"] == list(sc.PART_NAMES)

    images = dict(read_table(root / "images.txt"))
    boxes = {row[0]: [float(v) for v in row[1:]] for row in read_table(root / "bounding_boxes.txt")}
    split = dict(read_table(root / "train_test_split.txt"))
    locs = read_table(root / "parts" / "part_locs.txt")
    for name, flag in (("train", "1"), ("test", "0")):
        shards = [str(out / s["name"]) for s in manifest["splits"][name]["shards"]]
        samples = list(wds.WebDataset(shards, shardshuffle=False).decode())  # json and cls decoded, jpg raw
        expected = sorted(i for i, f in split.items() if f == flag)
        assert sorted(str(int(s["__key__"])) for s in samples) == expected
        assert manifest["splits"][name]["num_samples"] == len(expected)
        for sample in samples:
            image_id = str(int(sample["__key__"]))
            meta = sample["json"]
            assert meta["class_name"] == manifest["classes"][sample["cls"]]
            assert images[image_id].startswith(f"{sample['cls'] + 1:03d}.{meta['class_name']}/")
            assert meta["bbox"] == boxes[image_id] and meta["size"] == [SIZE, SIZE]
            rows = locs[(int(image_id) - 1) * 15:int(image_id) * 15]
            assert meta["parts"] == [[float(r[2]), float(r[3]), int(r[4])] for r in rows]
            assert sample["jpg"] == (root / "images" / images[image_id]).read_bytes()  # the bytes, not re-encoded


@pytest.mark.parametrize("per_class, fraction, n_test", [(3, 0.5, 2), (1, 0.5, 1), (5, 0.3, 2), (4, 0.0, 0)])
def test_every_class_gets_the_same_test_share(per_class, fraction, n_test):
    options = sc.SyntheticCubOptions(classes=3, images_per_class=per_class, test_fraction=fraction)
    flags = sc._split_flags(options)
    assert len(flags) == 3 * per_class
    for k in range(3):
        assert flags[k * per_class:(k + 1) * per_class].count(0) == n_test


def test_progress_is_reported_per_image(tmp_path: Path):
    counted = []
    sc.generate(tmp_path / "root", classes=2, images_per_class=3, size=64, progress=counted.append)
    assert sum(counted) == 6 and len(counted) == 6


def test_bird_size_scales_the_bird_and_its_parts():
    """The same draw with --bird-size 1.5: a box 1.5x as large (up to pixel rounding), parts spread alike."""
    cls = sc.bird_classes(1)[0]
    small = sc.draw_bird_image(cls, 128, sc.image_rng(0, 7))
    large = sc.draw_bird_image(cls, 128, sc.image_rng(0, 7), bird_size=1.5)
    assert large.bbox[2] == pytest.approx(1.5 * small.bbox[2], abs=3)
    assert large.bbox[3] == pytest.approx(1.5 * small.bbox[3], abs=3)
    crown, wing = 4, 8 if small.parts[8][2] else 12  # CUB part order: crown, then the visible wing
    span = [abs(s.parts[crown][0] - s.parts[wing][0]) for s in (small, large)]
    assert span[1] == pytest.approx(1.5 * span[0], rel=0.05)


def test_patterned_distractors_change_the_clutter_not_the_bird(tmp_path: Path):
    """--patterned-distractors draws the clutter only: same bird, box and parts; and a root made before
    the option existed (no key in its manifest) counts as made with the default."""
    cls = sc.bird_classes(1)[0]
    plain, patterned = (sc.draw_bird_image(cls, 128, sc.image_rng(0, 3), patterned_distractors=p) for p in (0.0, 1.0))
    assert plain.params["distractors"] > 0
    assert plain.bbox == patterned.bbox and plain.parts == patterned.parts
    assert (plain.image != patterned.image).any()

    root = sc.generate(tmp_path / "root", classes=1, images_per_class=1, size=64)
    manifest = json.loads((root / sc.MANIFEST_NAME).read_text())
    del manifest["options"]["patterned_distractors"]
    (root / sc.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert sc.is_generated(root, sc.SyntheticCubOptions(classes=1, images_per_class=1, size=64))
    assert not sc.is_generated(root, sc.SyntheticCubOptions(classes=1, images_per_class=1, size=64,
                                                            patterned_distractors=0.0))
