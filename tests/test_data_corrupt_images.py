"""One definition of a corrupt image (data_prep.contract.check_image), shared by prep, verify and the
loaders, on real CUB JPEGs cut short and scrambled in the middle."""
from __future__ import annotations

import io
import json
import random
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from data_prep import cub
from data_prep.__main__ import main as data_prep_main
from data_prep.contract import BadImage, check_image
from data_prep.verify import verify
from pipeline.data import DataError, build_eval_loader, build_train_loader, decode_rgb, read_manifest
from pipeline.data.decode import CorruptSample
from shard_fixtures import tiny_config
from test_data_prep_cub import cub_root  # noqa: F401 (the fixture)
from test_data_prep_robustness import image_path, light_copy

TRUNCATED, SCRAMBLED = 4, 9  # CUB image ids of the sample in tests/data


def scrambled(data: bytes) -> bytes:
    """64 random bytes in place of the JPEG's own at 70 % of the file: still a JPEG to PIL and OpenCV."""
    damaged = bytearray(data)
    at = int(len(data) * 0.7)
    damaged[at:at + 64] = random.Random(0).randbytes(64)
    return bytes(damaged)


@pytest.fixture()
def damaged_root(cub_root, tmp_path):
    root = light_copy(cub_root, tmp_path / "raw", copy_images=True)
    truncated, mixed = image_path(root, TRUNCATED), image_path(root, SCRAMBLED)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    mixed.write_bytes(scrambled(mixed.read_bytes()))
    return root


def test_the_scrambled_jpeg_is_what_slipped_through_and_the_check_rejects_both(cub_root, capfd):
    data = image_path(cub_root, SCRAMBLED).read_bytes()
    bad = scrambled(data)
    with Image.open(io.BytesIO(bad)) as image:
        image.load()  # PIL decodes it without a word
    cub.inspect_jpeg(bad, full=False)  # the header walk passes it
    assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR) is not None  # a bare OpenCV decode too,
    assert "Corrupt JPEG data" in capfd.readouterr().err  # with a warning on stderr
    assert check_image(data) == Image.open(io.BytesIO(data)).size
    with pytest.raises(BadImage, match="Corrupt JPEG data"):
        check_image(bad)
    with pytest.raises(BadImage, match="truncated"):
        check_image(data[: len(data) // 2])
    for broken, reason in ((bad, "Corrupt JPEG data"), (data[: len(data) // 2], "truncated")):
        with pytest.raises(CorruptSample, match=reason):  # the loader's decode, at full and reduced scale
            decode_rgb(broken)
        with pytest.raises(CorruptSample, match=reason):
            decode_rgb(broken, min_side=64)
    assert "Corrupt JPEG" not in capfd.readouterr().err  # libjpeg's warning became the error, not noise


def test_prep_skips_both_or_strict_names_the_file(cub_root, damaged_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert data_prep_main(["cub", "--root", str(damaged_root), "--out", str(out), "--shard-size", "8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {f"{TRUNCATED:06d}", f"{SCRAMBLED:06d}"}
    assert "truncated" in reasons[f"{TRUNCATED:06d}"] and "Corrupt JPEG data" in reasons[f"{SCRAMBLED:06d}"]
    assert verify(out)[0] == []

    # with the truncated image mended, --strict stops at the scrambled one and names its file
    shutil.copy(image_path(cub_root, TRUNCATED), image_path(damaged_root, TRUNCATED))
    strict = tmp_path / "strict"
    assert data_prep_main(["cub", "--root", str(damaged_root), "--out", str(strict), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and image_path(damaged_root, SCRAMBLED).name in err and "Corrupt JPEG" in err
    assert not (strict / "manifest.json").exists()


@pytest.fixture()
def shards_with_a_scrambled_jpeg(damaged_root, tmp_path):
    """--check fast (header and end marker only) lets the scrambled JPEG into a shard; the truncated
    one lacks its end marker, so even that check decodes and drops it."""
    out = tmp_path / "fast"
    manifest = cub.prepare(damaged_root, out, shard_size=8, check="fast")
    assert [s["key"] for s in manifest["skipped"]] == [f"{TRUNCATED:06d}"]
    return out


def test_verify_rejects_the_scrambled_jpeg(shards_with_a_scrambled_jpeg):
    problems, _ = verify(shards_with_a_scrambled_jpeg)
    assert len(problems) == 1
    assert f"sample {SCRAMBLED:06d}: jpg does not decode (corrupt JPEG (Corrupt JPEG data" in problems[0]


def test_loader_counts_it_with_skip_and_raises_with_error(shards_with_a_scrambled_jpeg):
    manifest = read_manifest(shards_with_a_scrambled_jpeg)
    key = f"{SCRAMBLED:06d}"
    cfg = tiny_config("data.on_corrupt=skip")
    evaluation = build_eval_loader(cfg, manifest, "train", 0, 1, batch_size=4, num_workers=0)  # image 9 is train
    keys = [meta["key"] for _, _, metas in evaluation for meta in metas]
    assert evaluation.num_skipped == 1 and key not in keys and len(keys) == manifest.num_samples("train") - 1
    stream = iter(build_train_loader(cfg, manifest, 0, 1, 4, seed=0))
    for _ in range(20):  # 80 draws from 4 shards of about 7: its shard comes up
        next(stream)
    assert stream.num_skipped >= 1

    with pytest.raises(DataError, match=rf"key {key}: corrupt JPEG \(Corrupt JPEG data"):
        list(build_eval_loader(tiny_config("data.on_corrupt=error"), manifest, "train", 0, 1, batch_size=4,
                               num_workers=0))
