"""Data pipeline: manifest checks, train/eval webdataset loaders, decoding, augmentation geometry."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import (DataError, build_eval_loader, build_train_loader, decode_rgb, effective_resize,
                           eval_transform, normalize, read_manifest)

from shard_fixtures import CUB_PART_NAMES, tiny_config, write_tiny_cub_shards, write_tiny_svhn_shards


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


# ----- manifest checks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory):
    return write_tiny_cub_shards(tmp_path_factory.mktemp("cub"), num_classes=3, train_per_class=4,
                                 test_per_class=3, shards_per_split=3, grayscale=["000002"], cmyk=["000003"])


def test_read_manifest(cub_root):
    manifest = read_manifest(cub_root)
    assert (manifest.dataset, manifest.task) == ("cub", "classification")
    assert manifest.num_samples("train") == 12 and len(manifest.shard_paths("train")) == 3
    assert manifest.parts == CUB_PART_NAMES


def _copy(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _edit_manifest(root, edit):
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_errors_name_the_file(cub_root, tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"manifest\.json not found"):
        read_manifest(tmp_path)
    with pytest.raises(DataError, match="data.root is not set"):
        read_manifest(None)

    missing = _copy(cub_root, tmp_path / "missing")
    (missing / "test-000001.tar").unlink()
    with pytest.raises(DataError, match=r"shard test-000001\.tar of split 'test' is listed but missing"):
        read_manifest(missing)

    resized = _copy(cub_root, tmp_path / "resized")
    with open(resized / "train-000002.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DataError, match=r"train-000002\.tar has \d+ bytes but the manifest says \d+"):
        read_manifest(resized)

    miscounted = _copy(cub_root, tmp_path / "miscounted")
    _edit_manifest(miscounted, lambda m: m["splits"]["train"].update(num_samples=13))
    with pytest.raises(DataError, match=r"splits\.train: num_samples=13 but its shards hold 12"):
        read_manifest(miscounted)

    broken = _copy(cub_root, tmp_path / "broken")
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(broken)

    with pytest.raises(DataError, match="unknown split 'val'; the manifest has test, train"):
        read_manifest(cub_root).shard_paths("val")


def test_checksum_verification_catches_same_size_change(cub_root, tmp_path):
    tampered = _copy(cub_root, tmp_path / "tampered")
    data = bytearray((tampered / "test-000000.tar").read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the hash sees it
    (tampered / "test-000000.tar").write_bytes(bytes(data))
    read_manifest(tampered)
    with pytest.raises(DataError, match="sha256"):
        read_manifest(tampered, verify_checksums=True)


# ----- training stream ---------------------------------------------------------------------------

def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.multiprocess
def test_train_loader_is_endless_with_equal_batches(cub_root):
    cfg, manifest = tiny_config("train.num_workers=2"), read_manifest(cub_root)
    batches = _take(build_train_loader(cfg, manifest, rank=0, world_size=2, micro_batch=5, seed=0), 12)
    # 12 batches of 5 = 60 samples from a 12-sample split: it went round the data 5 times
    for images, targets in batches:
        assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
        assert targets.shape == (5,) and targets.dtype == torch.int64 and targets.max() < 3


@pytest.mark.multiprocess
def test_closing_a_stream_stops_its_workers(cub_root):
    import multiprocessing

    before = set(multiprocessing.active_children())
    stream = iter(build_train_loader(tiny_config("train.num_workers=2"), read_manifest(cub_root), 0, 1, 4, seed=0))
    next(stream)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    stream.close()
    assert not any(w.is_alive() for w in workers)


def test_train_ranks_differ_and_seeds_repeat(cub_root):
    cfg, manifest = tiny_config(), read_manifest(cub_root)

    def stream(rank, seed=0):
        return torch.cat([images for images, _ in _take(build_train_loader(cfg, manifest, rank, 2, 4, seed), 3)])

    rank0, rank1 = stream(0), stream(1)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(rank0, stream(0))            # same rank and seed: the same samples and crops
    assert not torch.equal(rank0, stream(0, seed=1))
    loader = build_train_loader(cfg, manifest, 0, 2, 4, seed=0)
    first, second = next(iter(loader))[0], next(iter(loader))[0]  # each iter() is a new epoch
    assert not torch.equal(first, second)


def test_svhn_targets_are_padded_sequences(tmp_path):
    root = write_tiny_svhn_shards(tmp_path, train_samples=6, test_samples=4)
    manifest = read_manifest(root)
    assert manifest.task == "sequence"
    cfg = tiny_config("data.augment=svhn", "model.input_size=54")
    images, targets = next(iter(build_train_loader(cfg, manifest, 0, 1, 6, seed=0)))
    assert images.shape == (6, 3, 54, 54) and targets.shape == (6, 5)
    expected = {}
    for shard in manifest.shard_paths("train"):
        with tarfile.open(shard) as tar:
            for name in tar.getnames():
                if name.endswith(".json"):
                    digits = json.load(tar.extractfile(name))["digits"]
                    expected[name[:-5]] = digits + [10] * (5 - len(digits))
    assert {tuple(t) for t in targets.tolist()} <= {tuple(t) for t in expected.values()}
    scored = {}
    for _, targets, metas in build_eval_loader(cfg, manifest, "train", 0, 1, batch_size=4, num_workers=0):
        scored.update({meta["key"]: t for meta, t in zip(metas, targets.tolist())})
    assert scored == expected


@pytest.mark.multiprocess
def test_eval_split_covers_every_sample_once_for_any_rank_count(tmp_path):
    """Rank r of w reads shards r, r+w, ...: the union over ranks is the split, once, even with more
    ranks than shards (those ranks get nothing) and with loader workers."""
    manifest = read_manifest(write_tiny_cub_shards(tmp_path, num_classes=1, train_per_class=1,
                                                   num_samples={"test": 11}, shards_per_split=4))
    everything = [f"{i:06d}" for i in range(2, 13)]
    for world, workers in [(1, 0), (2, 2), (3, 0), (4, 2), (6, 0)]:
        keys = []
        for rank in range(world):
            for _, _, metas in build_eval_loader(tiny_config(), manifest, "test", rank, world, 3, workers):
                keys += [meta["key"] for meta in metas]
        assert sorted(keys) == everything, (world, workers)


# ----- corrupt samples ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory):
    return write_tiny_cub_shards(tmp_path_factory.mktemp("corrupt"), num_classes=2, train_per_class=3,
                                 test_per_class=3, shards_per_split=2, corrupt=["000002", "000009"])


def test_corrupt_sample_skipped_and_counted(corrupt_root):
    manifest = read_manifest(corrupt_root)
    cfg = tiny_config("data.on_corrupt=skip")
    loader = build_train_loader(cfg, manifest, 0, 1, 4, seed=0)
    stream = iter(loader)
    batches = [next(stream) for _ in range(6)]  # 24 samples drawn from shards holding 1 bad sample in 6
    assert all(images.shape[0] == 4 for images, _ in batches)
    assert loader.num_skipped >= 1 and stream.num_skipped == loader.num_skipped
    keys = []
    evaluation = build_eval_loader(cfg, manifest, "test", 0, 1, batch_size=4, num_workers=0)
    for _, _, metas in evaluation:
        keys += [meta["key"] for meta in metas]
    assert evaluation.num_skipped == 1 and "000009" not in keys and len(keys) == 5


@pytest.mark.multiprocess
def test_corrupt_sample_error_names_shard_and_key(corrupt_root):
    manifest = read_manifest(corrupt_root)
    cfg = tiny_config("data.on_corrupt=error")
    with pytest.raises(DataError, match=r"test-000000\.tar key 000009: not an image"):
        list(build_eval_loader(cfg, manifest, "test", 0, 1, batch_size=4, num_workers=0))
    with pytest.raises(DataError, match=r"train-000000\.tar key 000002") as raised:
        _take(build_train_loader(tiny_config("data.on_corrupt=error", "train.num_workers=2"), manifest, 0, 1, 4, 0), 20)
    assert "\n" not in str(raised.value)  # one line, not the worker's traceback


def test_all_corrupt_stream_fails_instead_of_hanging(tmp_path):
    keys = [f"{i:06d}" for i in range(1, 5)]
    manifest = read_manifest(write_tiny_cub_shards(tmp_path, num_classes=1, train_per_class=4, test_per_class=1,
                                                   shards_per_split=1, corrupt=keys))
    with pytest.raises(DataError, match="in a row could not be decoded"):
        next(iter(build_train_loader(tiny_config(), manifest, 0, 1, 2, seed=0)))


# ----- decoding and geometry ---------------------------------------------------------------------

def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA"])
def test_any_image_mode_decodes_to_rgb(mode):
    img = Image.new("RGB", (40, 30), (200, 30, 60)).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    array, size = decode_rgb(_encode(img, fmt))
    assert array.shape == (30, 40, 3) and array.dtype == np.uint8 and size == (40, 30)
    if mode == "L":
        assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    reference = np.asarray(Image.open(io.BytesIO(_encode(img, fmt))).convert("RGB"), dtype=np.int16)
    assert np.abs(array - reference).max() <= 2  # PIL's own conversion (CMYK: decoders round differently)


def test_grayscale_and_cmyk_samples_reach_the_batch_as_rgb(cub_root):
    manifest = read_manifest(cub_root)
    loader = build_eval_loader(tiny_config(), manifest, "train", 0, 1, batch_size=12, num_workers=0)
    images, _, metas = next(iter(loader))
    by_key = {meta["key"]: image for meta, image in zip(metas, images)}
    gray = by_key["000002"]
    assert gray.shape == (3, 32, 32) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert not torch.equal(by_key["000003"][0], by_key["000003"][1])  # CMYK kept its colour


def _spot_image(width, height, x, y, half):
    array = np.zeros((height, width, 3), np.uint8)
    array[y - half:y + half, x - half:x + half] = 255
    return Image.fromarray(array)


@pytest.mark.parametrize("augment,width,height,fmt", [("cub", 120, 80, "PNG"), ("none", 120, 80, "PNG"),
                                                      ("svhn", 70, 60, "PNG"), ("svhn_crop", 70, 60, "PNG"),
                                                      ("svhn_shift", 70, 60, "PNG"), ("cub", 960, 640, "JPEG")])
def test_eval_view_maps_original_pixels_to_input_pixels(augment, width, height, fmt):
    """A bright square at a known original position lands where View.to_input says."""
    cfg = tiny_config(f"data.augment={augment}", "model.input_size=32")
    x, y, half = width * 9 // 16, height * 7 // 16, max(2, width // 40)
    data = _encode(_spot_image(width, height, x, y, half), fmt)
    image, size = decode_rgb(data, effective_resize(cfg))
    if fmt == "JPEG":
        assert image.shape[1] < width  # decoded at reduced size (DCT scaling)
    view_image, view = eval_transform(image, size, cfg)
    assert view_image.shape == (32, 32, 3)
    weight = view_image[..., 0].astype(np.float64)
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    centroid = np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()
    expected = view.to_input([[x, y]])[0]
    assert np.abs(centroid - expected).max() < 0.6
    assert np.allclose(view.to_normalized([[x, y]])[0], expected / 32 * 2 - 1)


def test_effective_resize_follows_the_paper_ratios():
    assert effective_resize(tiny_config("model.input_size=448")) == 512
    assert effective_resize(tiny_config("model.input_size=224")) == 256
    assert effective_resize(tiny_config("model.input_size=54", "data.augment=svhn_crop")) == 64
    assert effective_resize(tiny_config("model.input_size=64", "data.augment=svhn_shift")) == 74
    assert effective_resize(tiny_config("model.input_size=64", "data.augment=svhn")) == 64
    assert effective_resize(tiny_config("model.input_size=224", "data.resize=300")) == 300
    assert effective_resize(tiny_config("model.input_size=224", "data.augment=none")) == 224
    with pytest.raises(DataError, match="data.resize=100 is smaller than model.input_size=224"):
        effective_resize(tiny_config("model.input_size=224", "data.resize=100"))


def test_normalize_on_device_matches_float_reference():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    reference = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = normalize(images, mean, std, channels_last=True)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    loader_layout = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # how batches arrive
    out = normalize(loader_layout, mean, std, channels_last=False)
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        normalize(images.float(), mean, std)
    # the constants are kept per device; ones first made in inference mode serve a training step
    other_mean = [0.5, 0.25, 0.125]
    with torch.inference_mode():
        normalize(images, other_mean, std)
    weight = torch.ones(1, 3, 1, 1, requires_grad=True)
    (normalize(images, other_mean, std) * weight).sum().backward()
    expected = ((images.float() / 255 - torch.tensor(other_mean).view(1, 3, 1, 1))
                / torch.tensor(std).view(1, 3, 1, 1)).sum((0, 2, 3))
    torch.testing.assert_close(weight.grad.view(3), expected, rtol=1e-4, atol=1e-3)


def test_truncated_jpeg_is_a_corrupt_sample():
    from pipeline.data.decode import CorruptSample

    data = _encode(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
    with pytest.raises(CorruptSample, match="(?i)truncated"):
        decode_rgb(data[: len(data) // 2])


def test_in_memory_training_split_serves_each_sample_once_per_epoch(tmp_path):
    from data_prep.digits import DigitsOptions, load_split, prepare, write_synthetic_idx
    from pipeline.config import ConfigError, load_config

    idx = write_synthetic_idx(tmp_path / "idx", num_train=20, num_test=4)
    prepare(DigitsOptions(idx_root=str(idx), out=str(tmp_path / "r"), distortion="R", fresh_train=True, shard_size=6))
    cfg = load_config("configs/digits/cnn.yaml", [f"data.root={tmp_path / 'r'}", "data.distortion=R",
                                                   "model.input_size=28"])
    assert cfg.data.in_memory
    manifest = read_manifest(cfg.data.root)
    stream = iter(build_train_loader(cfg, manifest, rank=0, world_size=1, micro_batch=5, seed=3))
    batches = [next(stream) for _ in range(8)]  # two epochs of 4 batches
    assert all(images.shape == (5, 1, 28, 28) and images.dtype == torch.uint8 for images, _ in batches)
    digits, labels = load_split(idx, "train")
    for epoch in (batches[:4], batches[4:]):
        images = torch.cat([b[0] for b in epoch])[:, 0]
        # every stored digit exactly once per epoch, with its own label
        found = sorted(int(np.flatnonzero((digits == image.numpy()).all(axis=(1, 2)))[0]) for image in images)
        assert found == list(range(20))
        targets = torch.cat([b[1] for b in epoch])
        order = [int(np.flatnonzero((digits == image.numpy()).all(axis=(1, 2)))[0]) for image in images]
        assert targets.tolist() == labels[order].tolist()
    assert not torch.equal(batches[0][0], batches[4][0])  # a new permutation each epoch
    again = iter(build_train_loader(cfg, manifest, rank=0, world_size=1, micro_batch=5, seed=3))
    assert torch.equal(next(again)[0], batches[0][0])  # seeded: a resumed segment draws the same batches
    other_rank = iter(build_train_loader(cfg, manifest, rank=1, world_size=2, micro_batch=5, seed=3))
    assert not torch.equal(next(other_rank)[0], batches[0][0])
    with pytest.raises(ConfigError, match="data.in_memory=true .* data.augment=cub"):
        load_config(None, ["data.in_memory=true", "data.augment=cub"])
