"""Metrics and distributed evaluation: exact-once counts over ranks and workers, window statistics,
part hit-rate geometry.

The exact-once test runs this file as the torchrun worker:
    torchrun --standalone --nproc_per_node 3 tests/test_evaluation.py ROOT OUT
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pipeline.data import DataError, read_manifest
from pipeline.evaluation import evaluate
from pipeline.metrics import (PartHitSums, WindowSums, box_iou, contains, flatten, outside_fraction,
                              sequence_correct, top1_correct)

from conftest import PYTHON, REPO, subprocess_env  # tests/ is on sys.path under pytest and as a script
from shard_fixtures import tiny_config, write_tiny_cub_shards, write_tiny_svhn_shards


# ----- pure metrics --------------------------------------------------------------------------------

def test_box_iou_and_outside_fraction_by_hand():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [-1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.5, 0.0, 1.5, 1.0], [-1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    # half-overlapping unit squares: 0.5 / 1.5; identical: 1; an empty box: 0
    torch.testing.assert_close(box_iou(a, b), torch.tensor([1 / 3, 1.0, 0.0]))
    windows = torch.tensor([[0.5, 0.5, 1.5, 1.5], [-0.5, -0.5, 0.5, 0.5], [-3.0, -1.0, 1.0, 1.0]])
    # a quarter inside; all inside; 2 of width 4 inside
    torch.testing.assert_close(outside_fraction(windows), torch.tensor([0.75, 0.0, 0.5]))


def test_contains_points():
    boxes = torch.tensor([[[-1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    points = torch.tensor([[[-0.5, -0.5], [0.5, 0.5], [0.0, 0.0], [-0.5, 0.5]]])
    assert contains(boxes, points).tolist() == [[[True, False, True, False], [False, True, True, False]]]


def test_accuracies():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    assert top1_correct(logits, torch.tensor([0, 1, 1])) == 2
    eye = torch.eye(11)
    seq_logits = torch.stack([eye[[1, 2, 10]], eye[[3, 10, 10]], eye[[4, 5, 6]]])  # predictions as one-hot
    targets = torch.tensor([[1, 2, 10], [3, 4, 10], [4, 5, 10]])
    # digits: 2/2 + 1/2 + 2/2 right; sequences: only the first (the third predicts one digit too many)
    assert sequence_correct(seq_logits, targets) == (5, 6, 1)


def test_window_sums_add_up_across_splits():
    torch.manual_seed(0)
    boxes = torch.rand(10, 2, 4) * 2 - 1
    boxes[..., 2:] = boxes[..., :2] + 0.5
    whole, halves = WindowSums(2), [WindowSums(2), WindowSums(2)]
    whole.update(boxes)
    halves[0].update(boxes[:3])
    halves[1].update(boxes[3:])
    halves[0].load_tensor(halves[0].to_tensor() + halves[1].to_tensor())  # what all_reduce does
    assert flatten(halves[0].result()) == pytest.approx(flatten(whole.result()))
    result = whole.result()["streams"][0]
    cx = (boxes[:, 0, 0] + boxes[:, 0, 2]) / 2
    assert result["center_x"] == pytest.approx(float(cx.mean()))
    assert result["spread_x"] == pytest.approx(float(cx.std(unbiased=False)))
    assert result["width"] == pytest.approx(0.5)


def test_flatten_for_tensorboard():
    flat = flatten({"top1": 0.5, "windows": {"streams": [{"center_x": 0.1}]}, "part_hit_rate": [{"beak": 1.0}],
                    "split": "test"})
    assert flat == {"top1": 0.5, "windows/streams/0/center_x": 0.1, "part_hit_rate/0/beak": 1.0}


# ----- tiny models following the model contract ------------------------------------------------------

class ColourClassifier(nn.Module):
    """Classifies by mean colour; attend() puts stream 0 on a fixed centre box and stream 1 where
    the image is brightest. Deterministic for a seed, so every process builds the same model."""

    task = "classification"

    def __init__(self, num_classes: int = 3, seed: int = 0, boxes=None):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(3, num_classes)
        self.num_streams = 2
        self.fixed_boxes = boxes

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))

    def attend(self, x):
        b = x.shape[0]
        if self.fixed_boxes is not None:
            return {"boxes": torch.tensor(self.fixed_boxes, dtype=torch.float32).expand(b, -1, -1)}
        centre = torch.tensor([-0.5, -0.5, 0.5, 0.5]).expand(b, 4)
        shift = x.mean(dim=(1, 2, 3)).tanh()[:, None]  # image-dependent position
        moving = torch.cat([shift - 0.6, shift - 0.2, shift + 0.6, shift + 0.2], dim=1)
        return {"boxes": torch.stack([centre, moving], dim=1)}


class ConstantDigits(nn.Module):
    """Always reads the sequence '3': logits (B, 5, 11) for digit 3 then padding."""

    task = "sequence"

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.eye(11)[[3, 10, 10, 10, 10]] * 5)

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1, -1)


# ----- evaluation ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split37(tmp_path_factory):
    """A test split of 37 samples in 5 shards (8, 8, 7, 7, 7)."""
    return write_tiny_cub_shards(tmp_path_factory.mktemp("cub37"), num_classes=3, train_per_class=1,
                                 num_samples={"test": 37}, shards_per_split=5)


def test_evaluate_single_process_reports_the_task_and_window_metrics(split37):
    manifest = read_manifest(split37)
    cfg = tiny_config()
    metrics = evaluate(ColourClassifier(), cfg, manifest, "test", "cpu")
    assert metrics["num_samples"] == 37 and metrics["num_skipped"] == 0
    # the same model over the same 37 images in one batch: the metrics are per sample, not per batch
    from pipeline.data import build_eval_loader, normalize
    (images, targets, _), = build_eval_loader(cfg, manifest, "test", 0, 1, batch_size=64, num_workers=0)
    with torch.no_grad():
        logits = ColourClassifier()(normalize(images, cfg.data.mean, cfg.data.std))
    assert metrics["top1"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    centre, moving = metrics["windows"]["streams"]
    assert centre["center_x"] == pytest.approx(0.0, abs=1e-6) and centre["spread_x"] == pytest.approx(0.0, abs=1e-6)
    assert moving["spread_x"] > 0 and 0 <= moving["outside"] < 1
    assert 0 < metrics["windows"]["overlap_iou"]["0-1"] < 1
    assert set(metrics["part_hit_rate"][0]) <= set(manifest.parts)
    json.dumps(metrics)  # JSON-able as the evaluate CLI prints it


def test_evaluate_checks_the_count_against_the_manifest(split37):
    manifest = read_manifest(split37)
    manifest.splits["test"]["num_samples"] = 38  # as if a shard lost a sample after data_prep
    with pytest.raises(DataError, match="split 'test' on 1 rank.* scored 37 samples and skipped 0, but the manifest lists 38"):
        evaluate(ColourClassifier(), tiny_config(), manifest, "test", "cpu")
    assert evaluate(ColourClassifier(), tiny_config(), manifest, "test", "cpu", max_samples=10)["num_samples"] == 10


def test_evaluate_rejects_a_model_that_does_not_fit_the_dataset(split37, tmp_path):
    manifest = read_manifest(split37)
    with pytest.raises(DataError, match=r"lists 3 classes but model.num_classes=2"):
        evaluate(ColourClassifier(num_classes=2), tiny_config("model.num_classes=2"), manifest, "test", "cpu")
    with pytest.raises(DataError, match=r"the model's task is 'sequence' but dataset 'cub' is a 'classification' task"):
        evaluate(ConstantDigits(), tiny_config(), manifest, "test", "cpu")


def test_evaluate_counts_skipped_corrupt_samples(tmp_path):
    manifest = read_manifest(write_tiny_cub_shards(tmp_path, num_classes=3, test_per_class=2, corrupt=["000014"]))
    metrics = evaluate(ColourClassifier(), tiny_config("data.on_corrupt=skip"), manifest, "test", "cpu")
    assert (metrics["num_samples"], metrics["num_skipped"]) == (5, 1)


def test_svhn_sequence_metrics_against_the_shards(tmp_path):
    manifest = read_manifest(write_tiny_svhn_shards(tmp_path, train_samples=2, test_samples=9))
    metrics = evaluate(ConstantDigits(), tiny_config("data.augment=svhn", "model.input_size=54"),
                       manifest, "test", "cpu")
    import tarfile
    sequences = []
    for shard in manifest.shard_paths("test"):
        with tarfile.open(shard) as tar:
            sequences += [json.load(tar.extractfile(n))["digits"] for n in tar.getnames() if n.endswith(".json")]
    digits = sum(len(s) for s in sequences)
    assert metrics["num_samples"] == len(sequences) == 9
    assert metrics["digit_accuracy"] == pytest.approx(sum(s[0] == 3 for s in sequences) / digits)
    assert metrics["sequence_accuracy"] == pytest.approx(sum(s == [3] for s in sequences) / 9)
    assert metrics["sequence_error"] == pytest.approx(1 - metrics["sequence_accuracy"])
    assert "windows" not in metrics  # no attend(): no window statistics


def test_part_hit_rate_geometry_by_hand(tmp_path):
    """Parts placed by hand in a 100x50 image; input 32, augment cub, so resize = round(32*512/448) = 37:
    scale 37/50 = 0.74, resized 74x37, centre crop offset (21, 2): input_px = original_px * 0.74 - (21, 2)."""
    from PIL import Image
    from data_prep.shards import shard_name, write_json_atomic, write_shard
    import io

    buf = io.BytesIO()
    Image.new("RGB", (100, 50), (90, 120, 30)).save(buf, format="PNG")
    parts = [
        [50.0, 25.0, 1],                       # head: input (16, 16.5) -> normalised (0, 0.03125)
        [(4 + 21) / 0.74, (4 + 2) / 0.74, 1],  # tail: input (4, 4) -> (-0.75, -0.75)
        [50.0, 25.0, 0],                       # leg: not visible
        [10.0, 25.0, 1],                       # wing: input x = -13.6, cropped out of the view
    ]
    sample = {"__key__": "000001", "png": buf.getvalue(), "cls": 0,
              "json": {"id": 1, "class_id": 0, "size": [100, 50], "bbox": [0, 0, 100, 50], "parts": parts}}
    entry = write_shard(tmp_path / shard_name("test", 0), [sample])
    write_json_atomic(tmp_path / "manifest.json", {
        "dataset": "cub", "classes": ["a", "b", "c"], "parts": ["head", "tail", "leg", "wing"],
        "splits": {"test": {"num_samples": 1, "shards": [entry]}}})
    boxes = [[-0.1, -0.1, 0.1, 0.1],           # stream 0 around the head
             [-0.8, -0.8, -0.7, -0.7]]         # stream 1 around the tail
    metrics = evaluate(ColourClassifier(boxes=boxes), tiny_config(), read_manifest(tmp_path), "test", "cpu")
    assert metrics["part_hit_rate"] == [{"head": 1.0, "tail": 0.0}, {"head": 0.0, "tail": 1.0}]
    # the tail sits 0.05 inside stream 1's box: a view off by one input pixel (0.0625) would miss it


@pytest.mark.slow  # importing timm takes seconds on a loaded 2-core machine
def test_evaluate_a_real_nxst_cnn(split37):
    """The model zoo's 2 x ST-CNN (tiny timm backbone, random init) through the same evaluation."""
    from pipeline.models import build_model

    cfg = tiny_config("model.name=nxst_cnn", "model.backbone=test_resnet", "model.num_streams=2",
                      "model.input_size=64", "model.crop_size=32", "model.dropout=0.0")
    torch.manual_seed(0)
    metrics = evaluate(build_model(cfg.model), cfg, read_manifest(split37), "test", "cpu", max_samples=12)
    assert metrics["num_samples"] == 12 and len(metrics["windows"]["streams"]) == 2
    assert len(metrics["part_hit_rate"]) == 2 and metrics["part_hit_rate"][0]


# ----- exact-once over ranks and workers (real torchrun processes, gloo) ------------------------------

def _worker_main(root: str, out: str) -> None:
    """torchrun worker (3 processes): evaluate the split in gloo groups of 1, 2 and 3 ranks, each with
    0 and 2 loader workers; every rank of every group writes its metrics. One launch instead of three
    saves six torch imports on a 2-core CI machine."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    manifest = read_manifest(root)
    for world in (1, 2, 3):
        group = dist.new_group(list(range(world)))  # every rank takes part in creating every group
        if rank >= world:
            continue
        results = {workers: evaluate(ColourClassifier(), tiny_config(), manifest, "test", "cpu", rank, world,
                                     batch_size=4, num_workers=workers, group=group)
                   for workers in (0, 2)}
        # train.eval_max_samples: a quick evaluation of 11 samples however many ranks share it
        results["max11"] = evaluate(ColourClassifier(), tiny_config(), manifest, "test", "cpu", rank, world,
                                    max_samples=11, batch_size=4, num_workers=0, group=group)
        Path(out, f"world{world}-rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_exact_once_over_1_2_3_ranks_and_0_2_workers(split37, tmp_path):
    run = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                          __file__, str(split37), str(tmp_path)], env=subprocess_env(), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:]
    reference = evaluate(ColourClassifier(), tiny_config(), read_manifest(split37), "test", "cpu")
    for world in (1, 2, 3):
        for rank in range(world):
            results = json.loads((tmp_path / f"world{world}-rank{rank}.json").read_text())
            capped = results.pop("max11")
            assert capped["num_samples"] == 11, f"world {world} rank {rank}: {capped['num_samples']} samples, not 11"
            for workers, metrics in results.items():
                where = f"world {world} rank {rank} workers {workers}"
                assert metrics["num_samples"] == 37, where
                assert metrics["top1"] == reference["top1"], where
                # float32 logits summed in other batches: equal to float32 rounding
                assert math.isclose(metrics["loss"], reference["loss"], rel_tol=1e-6), where
                assert flatten(metrics["windows"]) == pytest.approx(flatten(reference["windows"]), rel=1e-9), where


if __name__ == "__main__":
    _worker_main(*sys.argv[1:3])
