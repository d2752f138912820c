"""python -m data_prep digits: IDX reading, the five distortions of paper A.3, shards and manifest."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PYTHON, REPO, SAMPLE_DATA, need, subprocess_env
from data_prep import DataPrepError
from data_prep.__main__ import main as data_prep_main
from data_prep.digits import (CLUTTER_SIZE, DISTORTIONS, OUTPUT_SIZE, distort, draw_params, load_split,
                              read_idx, sample_rng, write_idx, write_synthetic_idx)
from data_prep.distortions import projective_theta, rotation_scale_theta, tps_theta
from pipeline.models.spatial_transformer import control_points

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def idx_root(tmp_path) -> Path:
    return write_synthetic_idx(tmp_path / "idx", num_train=12, num_test=6)


def blob_image(x: float, y: float, radius: float = 2.0) -> np.ndarray:
    """A 28x28 image with a bright disc centred at pixel offset (x, y) from the image centre."""
    ys, xs = np.mgrid[0:28, 0:28] - 13.5
    return (((xs - x) ** 2 + (ys - y) ** 2 <= radius ** 2) * 255).astype(np.uint8)


def centroid(image: np.ndarray) -> np.ndarray:
    """Intensity centroid (x, y) as an offset from the image centre, in pixels."""
    ys, xs = np.mgrid[0:image.shape[0], 0:image.shape[1]] - (image.shape[0] - 1) / 2
    w = image.astype(np.float64)
    return np.array([(xs * w).sum(), (ys * w).sum()]) / w.sum()


def draws(distortion: str, n: int = 1500, seed: int = 0, num_images: int = 100):
    return [draw_params(distortion, sample_rng(seed, "train", i), num_images, i % num_images) for i in range(n)]


# ---- IDX files ----------------------------------------------------------------------------------

def test_idx_round_trip_plain_and_gzipped(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx(tmp_path / name, 0x803), array)


def test_wrong_magic_number_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros(5, dtype=np.uint8))  # a 1-d (labels) file where images belong
    with pytest.raises(DataPrepError, match=r"train-images-idx3-ubyte: wrong magic number 0x00000801"):
        read_idx(path, 0x803)


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(path, np.zeros((3, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataPrepError, match="t10k-images-idx3-ubyte: 2342 data bytes"):
        read_idx(path, 0x803)


def test_missing_idx_file_is_a_one_line_cli_error(idx_root, tmp_path):
    (idx_root / "t10k-labels-idx1-ubyte").unlink()
    out = tmp_path / "out"
    result = subprocess.run([PYTHON, "-m", "data_prep", "digits", "--idx-root", str(idx_root), "--out", str(out),
                             "--distortion", "R"], capture_output=True, text=True, cwd=REPO, env=subprocess_env())
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "t10k-labels-idx1-ubyte" in result.stderr
    assert not out.exists()  # nothing half-written


# ---- the drawn parameters -----------------------------------------------------------------------

def test_r_rotation_is_uniform_in_plus_minus_90():
    angles = np.array([p["rotation_deg"] for p in draws("R")])
    assert angles.min() >= -90 and angles.max() <= 90
    assert abs(angles.mean()) < 5 and abs(angles.std() - 180 / np.sqrt(12)) < 3  # uniform's std
    assert angles.min() < -85 and angles.max() > 85


def test_rts_rotation_scale_and_placement():
    params = draws("RTS")
    angles = np.array([p["rotation_deg"] for p in params])
    scales = np.array([p["scale"] for p in params])
    offsets = np.array([p["center_offset_px"] for p in params])
    assert angles.min() >= -45 and angles.max() <= 45 and abs(angles.std() - 90 / np.sqrt(12)) < 2
    assert scales.min() >= 0.7 and scales.max() <= 1.2 and abs(scales.mean() - 0.95) < 0.02
    # The scaled 28x28 frame stays inside the 42x42 canvas, and placements use the room there is.
    assert np.all(np.abs(offsets) <= (42 - 28 * scales[:, None]) / 2 + 1e-9)
    assert np.abs(offsets).max() > 10


def test_p_corner_shifts_are_normal_with_sigma_5():
    params = draws("P")
    shifts = np.array([p["corner_shift_px"] for p in params])
    assert shifts.shape == (1500, 4, 2)
    assert abs(shifts.mean()) < 0.3 and abs(shifts.std() - 5.0) < 0.25
    scales = np.array([p["scale"] for p in params])
    assert scales.min() >= 0.75 and scales.max() <= 1.0


def test_e_sixteen_control_points_shifted_with_sigma_1_5():
    params = draws("E")
    shifts = np.array([p["control_shift_px"] for p in params])
    assert shifts.shape == (1500, 16, 2)
    assert abs(shifts.mean()) < 0.1 and abs(shifts.std() - 1.5) < 0.08
    scales = np.array([p["scale"] for p in params])
    assert scales.min() >= 0.75 and scales.max() <= 1.0


def test_tc_clutter_comes_from_six_other_digits():
    params = draws("TC", n=300, num_images=20)
    for i, p in enumerate(params):
        assert len(p["clutter"]) == 6
        assert all(c["source_index"] != i % 20 and 0 <= c["source_index"] < 20 for c in p["clutter"])
        assert all(0 <= v <= 60 - CLUTTER_SIZE for c in p["clutter"] for v in c["canvas_xy"])
        assert all(0 <= v <= 28 - CLUTTER_SIZE for c in p["clutter"] for v in c["source_xy"])
        assert all(0 <= v <= 60 - 28 for v in p["digit_xy"])


# ---- geometry of the rendered images ------------------------------------------------------------

def test_zero_distortion_parameters_give_back_the_image():
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    np.testing.assert_allclose(projective_theta(one, torch.zeros(1, 4, 2, dtype=torch.float64))[0], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(tps_theta(one, torch.zeros(1, 16, 2, dtype=torch.float64))[0],
                               control_points(16).numpy(), atol=1e-6)
    np.testing.assert_allclose(rotation_scale_theta(zero, one, torch.zeros(1, 2, dtype=torch.float64), 28)[0],
                               np.eye(2, 3), atol=1e-12)


def test_rotation_moves_a_blob_where_the_recorded_angle_says(monkeypatch):
    # rotation_deg > 0 turns clockwise on screen (y points down): (8, 0) -> (0, 8) at 90 degrees.
    image = blob_image(8, 0)[None]
    monkeypatch.setattr("data_prep.digits.draw_params", lambda *a: {"rotation_deg": 90.0})
    out, _ = distort(image, "R", 0, "train")
    np.testing.assert_allclose(centroid(out[0]), [0, 8], atol=0.5)


def test_rts_places_and_scales_the_digit(monkeypatch):
    image = blob_image(0, 0, radius=5)[None]
    monkeypatch.setattr("data_prep.digits.draw_params",
                        lambda *a: {"rotation_deg": 30.0, "scale": 0.7, "center_offset_px": [6.0, -4.0]})
    out, _ = distort(image, "RTS", 0, "train")
    assert out.shape == (1, 42, 42)
    np.testing.assert_allclose(centroid(out[0]), [6, -4], atol=0.5)
    assert out[0].astype(float).sum() == pytest.approx(image.astype(float).sum() * 0.7 ** 2, rel=0.08)


def test_tc_pastes_the_digit_unchanged_at_its_place(idx_root):
    images, _ = load_split(idx_root, "train")
    out, params = distort(images, "TC", 5, "train")
    for canvas, image, p in zip(out, images, params):
        x, y = p["digit_xy"]
        assert np.all(canvas[y:y + 28, x:x + 28] >= image)  # max blend: clutter never hides the digit
        assert canvas.sum() >= image.sum()


@pytest.mark.parametrize("distortion", DISTORTIONS)
def test_sizes_determinism_and_split_seeds(idx_root, distortion):
    images, _ = load_split(idx_root, "train")
    out, params = distort(images, distortion, 7, "train")
    size = OUTPUT_SIZE[distortion]
    assert out.shape == (len(images), size, size) and out.dtype == np.uint8
    assert all(o.max() > 100 for o in out)  # the digit is still there
    again, params_again = distort(images, distortion, 7, "train")
    np.testing.assert_array_equal(out, again)
    assert params == params_again
    other_seed, _ = distort(images, distortion, 8, "train")
    as_test, test_params = distort(images, distortion, 7, "test")
    assert not np.array_equal(out, other_seed) and test_params != params and not np.array_equal(out, as_test)
    # A sample's distortion does not depend on where the batch starts (--limit, --shard-size).
    tail, _ = distort(images[4:], distortion, 7, "train", first_index=4, sources=images)
    np.testing.assert_array_equal(tail, out[4:])


# ---- the command: shards and manifest -----------------------------------------------------------

def read_tar(path: Path) -> dict:
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_command_writes_shards_and_manifest(idx_root, tmp_path):
    out = tmp_path / "rts"
    assert data_prep_main(["digits", "--idx-root", str(idx_root), "--out", str(out), "--distortion", "RTS",
                           "--seed", "3", "--shard-size", "5", "--classes", "mnist"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "digits" and manifest["task"] == "classification"
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert manifest["source"]["options"]["distortion"] == "RTS"
    assert manifest["seeds"] == {"train": 3, "test": 4}
    train = manifest["splits"]["train"]
    # at most 5 a shard, spread evenly: no last shard of 2
    assert train["num_samples"] == 12 and [s["num_samples"] for s in train["shards"]] == [4, 4, 4]
    samples = {}
    for shard in train["shards"]:
        assert (out / shard["name"]).stat().st_size == shard["bytes"]
        samples.update(read_tar(out / shard["name"]))
    _, labels = load_split(idx_root, "train")
    assert sorted(samples) == [f"train_{i:06d}" for i in range(12)]
    for i in range(12):
        sample = samples[f"train_{i:06d}"]
        image = Image.open(io.BytesIO(sample["png"]))
        meta = json.loads(sample["json"])
        assert image.mode == "L" and image.size == (42, 42)
        assert int(sample["cls"]) == labels[i] == meta["label"]
        assert set(meta["params"]) == {"rotation_deg", "scale", "center_offset_px"}
    # Same seed: the same bytes; the test split has its own seed.
    again = tmp_path / "again"
    data_prep_main(["digits", "--idx-root", str(idx_root), "--out", str(again), "--distortion", "RTS",
                    "--seed", "3", "--shard-size", "5", "--classes", "mnist"])
    assert json.loads((again / "manifest.json").read_text())["splits"] == manifest["splits"]


@pytest.mark.multiprocess
def test_command_resumes_refuses_other_output_and_splits_over_workers(idx_root, tmp_path, capsys):
    """digits runs on the shared job machinery: a rerun keeps complete shards, a folder holding other
    options is refused unless --overwrite, and --workers / --num-jobs write the same shards."""
    out = tmp_path / "rts"
    args = ["digits", "--idx-root", str(idx_root), "--out", str(out), "--distortion", "RTS", "--shard-size", "5"]
    assert data_prep_main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    first = out / manifest["splits"]["train"]["shards"][0]["name"]
    written = first.stat().st_mtime_ns
    (out / manifest["splits"]["test"]["shards"][-1]["name"]).unlink()  # as if killed before the last shard
    assert data_prep_main(args) == 0
    assert "wrote 1 shard(s)" in capsys.readouterr().err
    assert first.stat().st_mtime_ns == written and json.loads((out / "manifest.json").read_text()) == manifest
    assert data_prep_main(args[:-2] + ["--shard-size", "4"]) == 2
    assert "already holds a different data-prep output (options.shard_size: 5 there, 4 now)" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text()) == manifest  # refused: nothing lost
    pieces = tmp_path / "pieces"
    for index in (1, 0):
        assert data_prep_main(args[:4] + [str(pieces)] + args[5:] + ["--num-jobs", "2", "--job-index", str(index)]) == 0
    parallel = tmp_path / "workers"
    assert data_prep_main(args[:4] + [str(parallel)] + args[5:] + ["--workers", "2"]) == 0
    for folder in (pieces, parallel):
        assert json.loads((folder / "manifest.json").read_text())["splits"] == manifest["splits"]


def test_bad_options_are_errors(idx_root, tmp_path, capsys):
    assert data_prep_main(["digits", "--idx-root", str(idx_root), "--out", str(tmp_path / "o"), "--distortion", "E",
                           "--seed", "2", "--test-seed", "2"]) == 2
    assert "--test-seed 2: must differ from --seed" in capsys.readouterr().err
    assert data_prep_main(["digits", "--idx-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                           "--distortion", "E"]) == 2
    assert "nowhere: not a directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- real Fashion-MNIST -------------------------------------------------------------------------

def test_real_fashion_mnist_images_through_every_distortion():
    need(FASHION.is_dir(), f"Fashion-MNIST IDX files in {FASHION} (apt-get install dataset-fashion-mnist)")
    images, labels = load_split(FASHION, "test", limit=8)
    assert images.shape == (8, 28, 28) and labels.max() <= 9
    for distortion in DISTORTIONS:
        out, params = distort(images, distortion, 0, "test")
        assert out.shape == (8, OUTPUT_SIZE[distortion], OUTPUT_SIZE[distortion]) and len(params) == 8
        # Warps move mass around and shrink it (scales down to 0.7, P corners pulled in) but keep a good part.
        ratio = out.reshape(8, -1).sum(1) / images.reshape(8, -1).sum(1)
        assert np.all(ratio > 0.15), (distortion, ratio)


# ---- one IDX pair split in two (--train-count), undistorted training digits (--fresh-train) ------

def one_pair(tmp_path, count: int = 40) -> Path:
    """A folder holding only a t10k pair, as tests/data/mnist does."""
    root = write_synthetic_idx(tmp_path / "pair", num_train=2, num_test=count, seed=3)
    for path in root.glob("train-*"):
        path.unlink()
    return root


@pytest.mark.multiprocess
def test_train_count_splits_one_pair_disjointly_and_deterministically(tmp_path):
    root = one_pair(tmp_path)
    argv = ["digits", "--idx-root", str(root), "--distortion", "RTS", "--train-count", "30", "--fresh-train",
            "--shard-size", "7"]
    assert data_prep_main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert data_prep_main(argv + ["--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("a", "b")]
    assert [m["splits"]["train"]["num_samples"] for m in manifests] == [30, 30]
    assert [m["splits"]["test"]["num_samples"] for m in manifests] == [10, 10]
    # the same bytes however the job ran: the split depends on the file and N only
    assert [[s["sha256"] for s in m["splits"]["test"]["shards"]] for m in manifests][0] == \
           [[s["sha256"] for s in m["splits"]["test"]["shards"]] for m in manifests][1]
    samples = {}
    for tar in sorted((tmp_path / "a").glob("*.tar")):
        samples.update({key: value | {"split": tar.name.split("-")[0]} for key, value in read_tar(tar).items()})
    first = {split: m["first"] for split, m in manifests[0]["sources"].items()}
    source = {key: first[s["split"]] + int(key.split("_")[1]) for key, s in samples.items()}
    sources = {split: sorted(i for key, i in source.items() if samples[key]["split"] == split) for split in first}
    assert sources == {"train": list(range(30)), "test": list(range(30, 40))}  # disjoint, all digits used
    images, labels = load_split(root, "test")
    for key, sample in samples.items():
        assert int(sample["cls"]) == labels[source[key]]
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
        if sample["split"] == "train":  # stored as they are: the trainer distorts them afresh
            assert "json" not in sample and np.array_equal(pixels, images[source[key]])
        else:
            meta = json.loads(sample["json"])
            assert meta["source_index"] == source[key] and pixels.shape == (42, 42) and meta["params"]["scale"] >= 0.7
    assert manifests[0]["train_distortion"] == "fresh" and manifests[0]["sources"]["test"]["first"] == 30


def test_real_mnist_split_8000_2000(tmp_path):
    out = tmp_path / "mnist"
    assert data_prep_main(["digits", "--idx-root", str(SAMPLE_DATA / "mnist"), "--out", str(out), "--distortion",
                           "TC", "--train-count", "8000", "--limit", "64", "--test-limit", "32"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"] == {"train": {"idx": "t10k", "first": 0, "end": 8000},
                                   "test": {"idx": "t10k", "first": 8000, "end": None}}
    _, labels = load_split(SAMPLE_DATA / "mnist", "test")
    test = read_tar(next(out.glob("test-*.tar")))
    metas = sorted((json.loads(s["json"]) for s in test.values()), key=lambda m: m["index"])
    assert [m["source_index"] for m in metas] == list(range(8000, 8032))
    assert [m["label"] for m in metas] == labels[8000:8032].tolist()


def test_train_count_errors_name_the_option(tmp_path, capsys):
    both = write_synthetic_idx(tmp_path / "both", num_train=8, num_test=8)
    assert data_prep_main(["digits", "--idx-root", str(both), "--out", str(tmp_path / "o"), "--distortion", "R",
                           "--train-count", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--source train|t10k names the one to split" in err
    assert data_prep_main(["digits", "--idx-root", str(one_pair(tmp_path)), "--out", str(tmp_path / "o"),
                           "--distortion", "R", "--train-count", "40"]) == 2
    assert "--train-count 40: must be between 1 and 39" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- fresh distortions of every training batch ------------------------------------------------------

@pytest.mark.parametrize("distortion", DISTORTIONS)
def test_fresh_distortion_is_new_every_batch_and_reproducible(distortion):
    from data_prep.distortions import FreshDistortion

    digits = torch.from_numpy(np.stack([blob_image(0, 0, 4), blob_image(3, -2, 5)] * 4))[:, None]
    fresh = FreshDistortion(distortion, seed=5)
    first, second = fresh(digits), fresh(digits)
    size = OUTPUT_SIZE[distortion]
    assert first.shape == (8, 1, size, size) and first.dtype == torch.uint8
    assert not torch.equal(first, second)  # a new distortion each time a digit is drawn
    fresh.reseed(5)
    assert torch.equal(fresh(digits), first)  # the same stream from the same seed (resume)
    assert all(int(image.max()) > 100 for image in first)  # the digit is still there


def test_fresh_and_stored_distortions_share_one_definition(idx_root):
    """A training batch distorted afresh is made as data_prep makes a stored sample from the same parameters."""
    from data_prep.distortions import draw, from_records, render

    images, _ = load_split(idx_root, "train")
    out, records = distort(images, "P", 4, "train")
    again = render(torch.from_numpy(images.copy()), "P", from_records(records)).numpy()
    np.testing.assert_array_equal(again, out)
    drawn = draw("RTS", 4000, torch.Generator().manual_seed(0))
    assert drawn["scale"].min() >= 0.7 and drawn["scale"].max() <= 1.2 and drawn["rotation_deg"].abs().max() <= 45
    assert torch.all(drawn["center_offset_px"].abs() <= (42 - 28 * drawn["scale"][:, None]) / 2 + 1e-9)


def test_homography_maps_moved_corners_with_perspective():
    """P's homography, checked by applying it (not by re-solving): each source corner lands on its target,
    for quads whose fit needs non-zero perspective terms."""
    from data_prep.distortions import CORNERS, homography

    moved = CORNERS * 0.8 + torch.tensor([[0.1, -0.2], [0.25, 0.05], [-0.1, 0.3], [0.05, 0.0]], dtype=torch.float64)
    H = homography(moved[None], CORNERS[None])[0]
    assert H[2, :2].abs().min() > 1e-3  # a real perspective map, not an affine one
    mapped = torch.cat([moved, torch.ones(4, 1, dtype=torch.float64)], 1) @ H.T
    torch.testing.assert_close(mapped[:, :2] / mapped[:, 2:], CORNERS, atol=1e-12, rtol=0)
