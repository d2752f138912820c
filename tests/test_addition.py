"""MNIST addition (paper A.1, Table 4): the data, the fresh pairs, the models and the runner."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE_DATA
from data_prep.__main__ import main as data_prep_main
from data_prep.digits import load_split
from data_prep.distortions import FreshPairs, from_records, render

MNIST = SAMPLE_DATA / "mnist"


def prepare(out: Path, *extra: str) -> dict:
    argv = ["digits", "--idx-root", str(MNIST), "--train-count", "8000", "--distortion", "RTS", "--addition",
            "--fresh-train", "--limit", "64", "--test-limit", "24", "--out", str(out), *extra]
    assert data_prep_main(argv) == 0
    return json.loads((out / "manifest.json").read_text())


def test_samples(out: Path, split: str) -> list:
    with tarfile.open(out / f"{split}-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.rsplit(".", 1)[0] for name in members})
    return [{ext: members[f"{key}.{ext}"] for ext in ("npy", "cls", "json", "png") if f"{key}.{ext}" in members}
            for key in keys]


test_samples.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def addition_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("addition") / "data"
    prepare(out)
    return out


def test_pairs_are_two_independently_distorted_digits_labelled_with_their_sum(addition_data):
    manifest = json.loads((addition_data / "manifest.json").read_text())
    assert manifest["classes"] == [str(s) for s in range(19)] and manifest["channels"] == 2
    assert manifest["addition"] and manifest["train_distortion"] == "fresh"
    images, labels = load_split(MNIST, "test")
    test_digits, test_labels = images[8000:], labels[8000:]
    samples = test_samples(addition_data, "test")
    assert len(samples) == 24
    partners = []
    for index, sample in enumerate(samples):
        pair = np.load(io.BytesIO(sample["npy"]))
        meta = json.loads(sample["json"])
        assert pair.shape == (42, 42, 2) and pair.dtype == np.uint8
        first, second = meta["digits"]
        assert (first, second) == (test_labels[index], test_labels[meta["partner"]]) and meta["partner"] != index
        assert int(sample["cls"]) == first + second == meta["label"]
        # each channel is its own digit rendered with its own recorded RTS parameters
        for channel, (digit, params) in enumerate(zip((index, meta["partner"]), meta["params"])):
            again = render(torch.from_numpy(test_digits[digit:digit + 1].copy()), "RTS", from_records([params]))
            np.testing.assert_array_equal(pair[:, :, channel], again[0].numpy())
        assert meta["params"][0] != meta["params"][1]
        partners.append(meta["partner"])
    assert len(set(partners)) > 12  # partners drawn at random, not one fixed offset
    # the training split keeps single undistorted digits for the trainer to pair afresh
    train = test_samples(addition_data, "train")
    assert len(train) == 64 and all("png" in s and "npy" not in s for s in train)


def test_pairs_are_deterministic_and_follow_the_seed(addition_data, tmp_path):
    again = prepare(tmp_path / "again")
    first = json.loads((addition_data / "manifest.json").read_text())
    assert again["splits"] == first["splits"]  # same shards, byte for byte (sha256)
    other = prepare(tmp_path / "other", "--seed", "3")
    assert other["splits"]["test"]["shards"][0]["sha256"] != first["splits"]["test"]["shards"][0]["sha256"]


def test_addition_needs_mnist_classes(tmp_path, capsys):
    argv = ["digits", "--idx-root", str(MNIST), "--train-count", "8000", "--distortion", "RTS", "--addition",
            "--classes", "fashion-mnist", "--limit", "8", "--out", str(tmp_path / "o")]
    assert data_prep_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--classes 'fashion-mnist'" in err and not (tmp_path / "o").exists()


def test_fresh_pairs_pair_other_digits_of_the_batch_and_sum_their_labels():
    digits = torch.zeros(16, 1, 28, 28, dtype=torch.uint8)
    for i in range(16):
        digits[i, 0, 4 + i, 6:22] = 255  # a bar at a row of its own identifies each digit
    labels = torch.arange(16) % 10
    fresh = FreshPairs("RTS", seed=3)
    pairs, sums = fresh.apply(digits, labels)
    assert pairs.shape == (16, 2, 42, 42) and pairs.dtype == torch.uint8
    partner = sums - labels
    assert torch.all((partner >= 0) & (partner <= 9))
    assert all(int(pairs[i, c].max()) > 100 for i in range(16) for c in range(2))  # both digits are there
    again, again_sums = fresh.apply(digits, labels)
    assert not torch.equal(again, pairs)  # new pairs and distortions every batch
    fresh.reseed(3)
    replay, replay_sums = fresh.apply(digits, labels)
    assert torch.equal(replay, pairs) and torch.equal(replay_sums, sums)  # the same stream from a seed (resume)
    with pytest.raises(ValueError, match="at least 2"):
        fresh.apply(digits[:1], labels[:1])


def build_row(key: str):
    from pipeline.experiments.addition import make_profile, run_config
    from pipeline.models import build_model

    return build_model(run_config(make_profile("quick", str(MNIST), out="unused"), key, 0, Path("unused")).model)


def test_models_have_about_the_same_size_and_two_transformers_take_both_channels():
    from pipeline.experiments.addition import ROWS

    counts = {}
    for key in ROWS:
        model = build_row(key)
        counts[key] = sum(p.numel() for p in model.parameters())
        assert model(torch.rand(3, 2, 42, 42)).shape == (3, 19)
    assert max(counts.values()) <= 1.1 * min(counts.values()), counts  # Table 4: about the same size
    model = build_row("2xst-fcn")
    assert len(model.transformers) == 2
    first_layers = [[m for m in t.localisation if isinstance(m, torch.nn.Linear)][0] for t in model.transformers]
    assert all(layer.in_features == 2 * 42 * 42 for layer in first_layers)  # each sees both digits, whole (A.3)
    out = model.attend(torch.rand(3, 2, 42, 42))
    assert out["crops"].shape == (3, 2, 2, 42, 42) and out["boxes"].shape == (3, 2, 4)
    assert model.features[1].in_features == 4 * 21 * 21  # 2 transformers x 2 channels, pooled 2x
    # a one-transformer model keeps the checkpoint keys it had before transformers could be several
    keys = build_row("st-fcn").state_dict()
    assert any(k.startswith("transformer.") for k in keys) and not any(k.startswith("other_") for k in keys)


def test_channel_share_on_known_outputs():
    from pipeline.experiments.addition import channel_share

    class Known(torch.nn.Module):
        def attend(self, x):
            crops = torch.zeros(len(x), 2, 2, 4, 4)
            crops[:, 0, 0] = 1.0          # transformer 1: all its energy in channel 0
            crops[:, 1, 0] = 1.0          # transformer 2: 1 : 3 between the channels
            crops[:, 1, 1] = 3 ** 0.5
            return {"crops": crops}

    share = channel_share(Known(), torch.zeros(5, 2, 4, 4, dtype=torch.uint8))
    assert share == [[1.0, 0.0], [0.25, 0.75]]


def test_runner_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    from pipeline.experiments.__main__ import main

    out = tmp_path / "out"
    argv = ["addition", "--idx-root", str(MNIST), "--profile", "quick", "--steps", "4", "--batch-size", "16",
            "--train-limit", "96", "--test-limit", "32", "--num-examples", "3", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| 2xST-FCN |" in table and "| FCN |" in table and "transformer" in table
    result = json.loads((out / "addition_mnist.json").read_text())
    assert result["seeds"] == 1 and set(result["errors"]) == {"fcn", "cnn", "st-fcn", "2xst-fcn"}
    assert result["steps"] == 4 and result["batch_size"] == 16
    assert all(0 <= e["mean"] <= 100 and e["std"] == 0.0 for e in result["errors"].values())
    share = np.array(result["channel_share"])
    assert share.shape == (2, 2) and np.allclose(share.sum(1), 1.0) and (share >= 0).all()
    assert (out / "addition.png").is_file()
    runs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in runs} == set(result["errors"]) and all(r["num_test"] == 32 for r in runs)
    # a rerun trains nothing new: the runs are on record with the same settings
    assert main(argv) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


def test_npy_images_must_have_the_configured_channels(addition_data):
    from pipeline.config import Config, DataConfig, ModelConfig
    from pipeline.data import DataError, build_eval_loader, read_manifest

    manifest = read_manifest(addition_data)
    cfg = Config(model=ModelConfig(input_size=42), data=DataConfig(root=str(addition_data), augment="none",
                                                                    channels=1, mean=[0.0], std=[1.0]))
    with pytest.raises(DataError, match="data.channels=1"):
        next(iter(build_eval_loader(cfg, manifest, "test", 0, 1, batch_size=8, num_workers=0)))
    cfg.data.channels, cfg.data.mean, cfg.data.std = 2, [0.0, 0.0], [1.0, 1.0]
    images, targets, _ = next(iter(build_eval_loader(cfg, manifest, "test", 0, 1, batch_size=8, num_workers=0)))
    assert images.shape == (8, 2, 42, 42) and int(targets.max()) <= 18


def test_pose_spread_is_zero_for_the_digit_a_transformer_undoes_and_one_at_the_identity():
    from data_prep.distortions import draw, rotation_scale_theta
    from pipeline.experiments.addition import pose_spread

    g = torch.Generator().manual_seed(0)
    drawn = [draw("RTS", 50, g) for _ in range(2)]
    records = [{"params": [{k: v[i].tolist() for k, v in d.items()} for d in drawn]} for i in range(50)]
    to_digit = rotation_scale_theta(drawn[0]["rotation_deg"], drawn[0]["scale"], drawn[0]["center_offset_px"], 42)
    square = torch.cat([to_digit, torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64).expand(50, 1, 3)], 1)
    undo_first = torch.linalg.inv(square)[:, :2].float()              # digit 0 back in its own frame
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(50, 2, 3)

    class Known(torch.nn.Module):
        def attend(self, x):
            return {"theta": torch.stack([undo_first, identity], 1)}

    spread = pose_spread(Known(), torch.zeros(50, 2, 42, 42, dtype=torch.uint8), records)
    assert spread[0][0] < 1e-4 and spread[0][1] > 0.5   # transformer 1 stabilises digit 0 only
    assert spread[1] == [1.0, 1.0]                      # the identity leaves both poses as they were


def test_window_share_bound_on_apart_and_overlapping_digits():
    from pipeline.experiments.addition import window_share_bound

    apart = torch.zeros(1, 2, 42, 42, dtype=torch.uint8)
    apart[0, 0, 2:10, 2:10] = 255
    apart[0, 1, 30:40, 30:40] = 255
    assert window_share_bound(apart) == [1.0, 1.0]
    overlapping = torch.zeros(1, 2, 42, 42, dtype=torch.uint8)
    overlapping[0, :, 10:20, 10:20] = 255
    assert window_share_bound(overlapping) == [0.5, 0.5]


def test_window_share_frontier_trades_the_digit_kept_for_the_share():
    from pipeline.experiments.addition import window_share_frontier

    apart = torch.zeros(1, 2, 42, 42, dtype=torch.uint8)
    apart[0, 0, 2:10, 2:10] = 255
    apart[0, 1, 30:40, 30:40] = 255
    assert window_share_frontier(apart, keeps=(1.0,)) == {"1": [1.0, 1.0]}   # every rotation tried
    half_over = torch.zeros(1, 2, 42, 42, dtype=torch.uint8)
    half_over[0, 0, 10:20, 10:20] = 255                  # channel 1's square covers channel 0's right half
    half_over[0, 1, 10:20, 15:25] = 255
    got = window_share_frontier(half_over, keeps=(0.5, 1.0), angles=(0,))
    assert got["0.5"] == [1.0, 1.0]                      # the halves the other digit leaves free
    assert got["1"] == [round(100 / 150, 4)] * 2         # a whole square holds half the other's


def test_seeds_are_averaged_with_their_transformers_aligned_on_the_digit_they_stabilise():
    from pipeline.experiments.addition import summary_json

    first = {"channel_share": [[0.4, 0.6], [0.7, 0.3]], "pose_spread": [[1.0, 0.5], [0.6, 1.0]]}
    swapped = {"channel_share": [[0.8, 0.2], [0.2, 0.8]], "pose_spread": [[0.4, 1.0], [1.0, 0.4]]}
    got = summary_json([], {"2xst-fcn": [first, swapped]}, 2, {"whole_digit_box": [0.7, 0.7], "frontier": {}})
    assert got["channel_share"] == [[0.75, 0.25], [0.3, 0.7]]   # digit 0's transformer first in both seeds
    assert got["pose_spread"] == [[0.5, 1.0], [1.0, 0.45]]
