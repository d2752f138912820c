"""The co-localisation loss (paper A.2) along the way from the initial crop to the digit, and at a blank crop.

    python benchmarks/coloc_landscape.py --data runs/coloc_standard/data/coloc-T-class3-n100-seed0 \
        --features runs/coloc_standard/runs/E/cnn-seed0-<id>/checkpoints/last.pt [--raw]

For every image the crop (28 px) is moved in a straight line from the centred start (t = 0) to the
digit's box (t = 1); the mean triplet hinge over the images (positive: the next image's crop at the
same t; negative: a random crop, 20 draws) is printed per t, with the loss of a window parked in the
image's emptiest 28 px corner and of a 5 % window (what the runs converge to). A barrier between
t = 0 and t = 1 that a blank window avoids is why gradient descent from the centre finds no digit.
--raw: the feature CNN's layers without the L2 normalisation (the paper's literal e()).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config, DataConfig, ModelConfig  # noqa: E402
from pipeline.data import build_eval_loader, read_manifest  # noqa: E402
from pipeline.evaluation import meta_boxes  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.models.coloc import random_windows, triplet_hinge  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a data_prep coloc folder")
    p.add_argument("--features", required=True, help="the feature CNN's checkpoint")
    p.add_argument("--raw", action="store_true", help="no L2 normalisation of the feature layers")
    p.add_argument("--margin", type=float, default=1.0)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(input_size=84), data=DataConfig(root=args.data, augment="none", channels=1,
                                                                   mean=[0.0], std=[1.0]))
    batches = list(build_eval_loader(cfg, read_manifest(args.data), "test", 0, 1, batch_size=500, num_workers=0))
    x = torch.cat([b[0] for b in batches]).float() / 255
    truth = torch.cat([meta_boxes(b[2]) for b in batches]).float()
    model = create_model("digits_coloc_st", feature_checkpoint=args.features, normalize_features=not args.raw)
    scale = torch.full((len(x),), 28 / 84)

    def loss(theta: torch.Tensor) -> float:
        anchor = model.features(model.transformer.sample(x, theta[:, None])[:, 0])
        values = [triplet_hinge(anchor, anchor.roll(1, 0), model.features(
            model.transformer.sample(x, random_windows(theta[:, 0])[:, None])[:, 0]), args.margin).mean()
                  for _ in range(20)]
        return float(torch.stack(values).mean())

    target = (truth[:, :2] + truth[:, 2:]) / 2
    result = {}
    with torch.no_grad():
        for t in (0.0, 0.25, 0.5, 0.75, 1.0):
            result[f"t={t}"] = loss(torch.cat([scale[:, None], t * target], 1))
        corners = torch.tensor([[-2 / 3, -2 / 3], [2 / 3, -2 / 3], [-2 / 3, 2 / 3], [2 / 3, 2 / 3]])
        ink = torch.stack([model.transformer.sample(x, torch.cat([scale[:, None], c.expand(len(x), 2)], 1)[:, None])
                           .sum((1, 2, 3, 4)) for c in corners], 1)
        emptiest = corners[ink.argmin(1)]
        result["blank corner"] = loss(torch.cat([scale[:, None], emptiest], 1))
        result["5 % window"] = loss(torch.cat([torch.full((len(x), 1), 0.05), emptiest * 0.95 / (2 / 3)], 1))
    print(json.dumps({k: round(v, 3) for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
