"""Co-localisation (paper A.2, Table 5): the data, the transformer, the triplet loss, the IoU score
and the runner end to end, on the real MNIST digits in tests/data/mnist (the first 8,000 train the
feature CNN, the images come from the last 2,000)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import DataPrepError
from data_prep.coloc import ColocOptions, prepare
from pipeline.data import read_manifest
from pipeline.models import create_model
from pipeline.models.coloc import localisation_net, triplet_hinge

MNIST = Path(__file__).resolve().parent / "data" / "mnist"


def samples(root: Path, split: str = "test"):
    """[(image uint8 (84, 84), cls, json)] of one split, in key order."""
    found = {}
    with tarfile.open(root / f"{split}-000000.tar") as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [(np.asarray(Image.open(io.BytesIO(s["png"]))), int(s["cls"]), json.loads(s["json"]))
            for _, s in sorted(found.items())]


@pytest.fixture(scope="module")
def coloc_sets(tmp_path_factory):
    out = tmp_path_factory.mktemp("coloc")
    sets = {}
    for clutter, seed in (("T", 0), ("TC", 0), ("TC", 1)):
        root = out / f"{clutter}-{seed}"
        prepare(ColocOptions(idx_root=str(MNIST), out=str(root), clutter=clutter, classes="3,5", count=12, seed=seed))
        sets[clutter, seed] = root
    return sets


def test_images_boxes_and_clutter(coloc_sets):
    for clutter in ("T", "TC"):
        root = coloc_sets[clutter, 0]
        manifest = read_manifest(root)
        assert manifest.task == "colocalisation" and manifest.raw["transductive"]
        assert manifest.num_samples("train") == manifest.num_samples("test") == 24
        items = samples(root)
        assert [c for _, c, _ in items] == [3] * 12 + [5] * 12
        outside_ink = 0
        for image, label, meta in items:
            assert image.shape == (84, 84) and image.dtype == np.uint8
            x, y, w, h = meta["bbox"]
            assert (w, h) == (28, 28) and 0 <= x <= 56 and 0 <= y <= 56
            assert 8000 <= meta["source_index"] < 10000  # the test source: the feature CNN never saw it
            ix, iy, iw, ih = meta["ink_bbox"]
            assert x <= ix and y <= iy and ix + iw <= x + w and iy + ih <= y + h and iw * ih > 0
            assert image[iy:iy + ih, ix:ix + iw].max() > 100  # the digit's pixels are in its box
            outside = image.copy()
            outside[y:y + h, x:x + w] = 0
            outside_ink += int(outside.max() > 0)
        if clutter == "T":
            assert outside_ink == 0  # nothing but the digit
        else:
            assert outside_ink >= 20  # 16 crops of other digits: ink outside the box in (nearly) every image
            assert all(len(m["params"]["clutter"]) == 16 for _, _, m in items)
        # transductive: the training split holds the very same images
        assert [(i.tobytes(), m) for i, _, m in samples(root, "train")] == [(i.tobytes(), m) for i, _, m in items]


def test_same_seed_same_bytes_other_seed_other_images(coloc_sets, tmp_path):
    again = tmp_path / "again"
    prepare(ColocOptions(idx_root=str(MNIST), out=str(again), clutter="TC", classes="3,5", count=12, seed=0))
    first = json.loads((coloc_sets["TC", 0] / "manifest.json").read_text())["splits"]["test"]["shards"][0]["sha256"]
    assert json.loads((again / "manifest.json").read_text())["splits"]["test"]["shards"][0]["sha256"] == first
    seed0, seed1 = samples(coloc_sets["TC", 0]), samples(coloc_sets["TC", 1])
    assert [m["source_index"] for *_, m in seed0] == [m["source_index"] for *_, m in seed1]  # the same digits
    assert sum(a.tobytes() != b.tobytes() for (a, *_), (b, *_) in zip(seed0, seed1)) == 24  # placed elsewhere


def test_bad_options_are_one_line_errors(tmp_path):
    out = tmp_path / "bad"
    for options, named in ((dict(classes="3,x"), "--classes"), (dict(clutter="C"), "--clutter"),
                           (dict(count=5000), "--count"), (dict(train_count=10000), "--train-count")):
        with pytest.raises(DataPrepError, match=named):
            prepare(ColocOptions(idx_root=str(MNIST), out=str(out), **options))
        assert not out.exists()  # nothing half-written


def test_localisation_net_size():
    # conv 8x9x9 (+8) -> 19x19 -> pool 9x9: 648 -> fc 8 (+8) -> fc 8 (+8) -> the head fc 3 (+3)
    expected = (8 * 81 + 8) + (648 * 8 + 8) + (8 * 8 + 8) + (8 * 3 + 3)
    model = create_model("digits_coloc_st", feature_checkpoint="random")
    assert expected == 5947 == sum(p.numel() for p in model.transformer.parameters())
    assert sum(p.numel() for p in localisation_net(84).parameters()) == expected - 27
    assert [p.numel() for p in model.parameter_groups()["localisation"]] == [p.numel() for p in model.transformer.parameters()]
    assert not any(p.requires_grad for p in model.features.parameters())  # e() is frozen
    out = model.attend(torch.rand(2, 1, 84, 84))
    assert out["crops"].shape == (2, 1, 1, 28, 28)
    assert torch.allclose(out["boxes"], torch.tensor([-1 / 3, -1 / 3, 1 / 3, 1 / 3]).expand(2, 1, 4))  # centred 28 px


def test_triplet_hinge_known_values():
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])   # ||a - p||^2 = 1, 0
    n = torch.tensor([[0.0, 1.0], [4.0, 1.0]])   # ||a - n||^2 = 1, 9
    assert triplet_hinge(a, p, n, 1.0).tolist() == [1.0, 0.0]        # 1 - 1 + 1; max(0, 0 - 9 + 1)
    assert triplet_hinge(a, p, n, 0.5).tolist() == [0.5, 0.0]
    far = torch.tensor([[3.0, 0.0], [1.0, 3.0]])  # ||a - n||^2 = 9, 4 > ||a - p||^2 + margin: satisfied
    assert triplet_hinge(a, p, far).tolist() == [0.0, 0.0]


def test_loss_pairs_each_crop_with_the_next_image_and_trains_only_the_transformer():
    torch.manual_seed(0)
    model = create_model("digits_coloc_st", feature_checkpoint="random")
    x = torch.rand(4, 1, 84, 84)
    losses = model(x)
    assert losses.shape == (4,) and (losses >= 0).all()
    losses.mean().backward()
    assert all(p.grad is not None for p in model.transformer.parameters())
    assert all(p.grad is None for p in model.features.parameters())
    same = x[:1].expand(4, -1, -1, -1)  # four copies of one image: anchors equal their partners
    torch.manual_seed(1)
    anchor = model.features(model.attend(same)["crops"][:, 0])
    assert torch.allclose(anchor, anchor.roll(1, 0))


def test_negative_scale_fixes_the_random_crops_side(monkeypatch):
    torch.manual_seed(0)
    model = create_model("digits_coloc_st", feature_checkpoint="random", init_scale=0.7, negative_scale=1 / 3)
    sampled = []
    sample = model.transformer.sample
    monkeypatch.setattr(model.transformer, "sample", lambda x, theta: sampled.append(theta) or sample(x, theta))
    model(torch.rand(3, 1, 84, 84))
    random_windows = sampled[-1][:, 0]  # r(I_n): 28 px anywhere inside the image, whatever T(I_n)'s side (0.7)
    assert torch.allclose(random_windows[:, 0], torch.full((3,), 1 / 3))
    assert (random_windows[:, 1:].abs() <= 2 / 3 + 1e-6).all()
    assert torch.allclose(model.attend(torch.rand(2, 1, 84, 84))["theta"][:, 0, 0], torch.full((2,), 0.7))
    with pytest.raises(ValueError, match="negative_scale=1.5"):
        create_model("digits_coloc_st", feature_checkpoint="random", negative_scale=1.5)


def test_iou50_scorer_on_known_boxes():
    from pipeline.evaluation import _Scorer, meta_boxes

    view = [1.0, 1.0, 0, 0, 84]  # the identity view of an 84 px input
    metas = [{"bbox": [28, 28, 28, 28], "view": view}, {"bbox": [0, 0, 28, 28], "view": view},
             {"bbox": [56, 56, 28, 28], "view": view}]
    truth = meta_boxes(metas)
    assert torch.allclose(truth[0], torch.tensor([-1 / 3, -1 / 3, 1 / 3, 1 / 3], dtype=truth.dtype))
    third = 2 / 3
    boxes = torch.tensor([[[-1 / 3, -1 / 3, 1 / 3, 1 / 3]],                      # exact: IoU 1
                          [[-1 + third / 4, -1, -1 / 3 + third / 4, -1 / 3]],     # shifted 1/4 side: IoU 0.6
                          [[1 / 3 - third / 2, 1 / 3, 1 - third / 2, 1]]])         # shifted 1/2 side: IoU 1/3
    scorer = _Scorer("colocalisation", 1, [])
    scorer.add_batch(torch.tensor([0.5, 1.0, 1.5]), torch.tensor([3, 3, 3]), boxes, metas)
    result = scorer.result()
    assert result["iou50"] == pytest.approx(2 / 3)
    assert result["mean_iou"] == pytest.approx((1 + 0.6 + 1 / 3) / 3)
    assert result["loss"] == pytest.approx(1.0)


def test_table_gives_each_seed_and_the_spread():
    from pipeline.experiments.coloc import ColocProfile, format_table

    def run(clutter, seed, rate, start):
        return {"clutter": clutter, "class": 3, "seed": seed, "iou50": rate, "trajectory": [{"iou50": start}]}

    records = [run("T", 0, 0.5, 0.1), run("T", 1, 0.7, 0.1), run("T", 2, 0.9, 0.1), run("TC", 0, 0.25, 0.05)]
    row = format_table(records, ColocProfile(idx_root="x", classes=(3,))).splitlines()[2]
    assert row == "| 3 | 70 +- 20 % (seeds 50 / 70 / 90; initial 10 %) | 25 % (initial 5 %) |"


def test_runner_end_to_end(tmp_path):
    from pipeline.experiments.__main__ import main

    out = tmp_path / "coloc"
    assert main(["coloc", "--idx-root", str(MNIST), "--classes", "3", "--profile", "quick", "--out", str(out)]) == 0
    rates = json.loads((out / "coloc_mnist.json").read_text())
    assert set(rates) == {"T", "TC"} and all(set(by_class) == {"3"} for by_class in rates.values())
    assert all(0.0 <= rate <= 1.0 for by_class in rates.values() for rate in by_class.values())
    results = json.loads((out / "results.json").read_text())
    assert results["rates"] == rates and len(results["runs"]) == 2
    steps = [s["step"] for s in results["runs"][0]["trajectory"]]
    assert steps == [0, 5, 10]  # the boxes at step 0 and at every kept checkpoint
    assert results["runs"][0]["trajectory"][-1]["iou50"] == results["runs"][0]["iou50"]
    assert "| 3 |" in (out / "table.md").read_text()
    assert Image.open(out / "coloc_boxes.png").size[1] > 2 * 84
    assert main(["coloc", "--idx-root", str(MNIST), "--classes", "3,11", "--out", str(out)]) == 2
