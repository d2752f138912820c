"""Single-process trials of demo recipes: does a 2xST-CNN's localisation learn where the birds are?

    python benchmarks/demo_recipe_trials.py --loc-scale 0                 # windows fixed at the tiling
    python benchmarks/demo_recipe_trials.py --loc-scale 1 --loc-freeze 300 --loc-downscale 1
    python benchmarks/demo_recipe_trials.py --loc-scale 0.3 --loc-freeze 150 --loc-downscale 1 --fd-step 0.125
    python benchmarks/demo_recipe_trials.py --baseline

A research bench, not the product path: the synthetic birds are drawn once into memory (cached
under --cache), the project's own `nxst_cnn` is trained by a plain loop on one CPU thread (no
shards, no DDP: minutes per trial, so that recipes can be compared before one goes into
configs/demo.yaml). Every `--steps / 4` steps it prints test top-1, the crown and wing hit-rates per
stream and the spread of the window centres over test images. Parts score the windows only.

`--fd-step D` trains the window centres on a finite-difference estimate of the same loss's slope
(`model.extra.window_gradient=finite_difference`, `fd_step=D`): per image and stream, the loss at
t + D*e and t - D*e along a random unit direction e (two extra forward passes, no backward). The sampler's own
gradient is dominated by the fine class texture (`python -m pipeline.experiments window-gradient`
measures it); the loss itself is smooth at the scale of a few pixels.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_prep import synthetic_cub  # noqa: E402
from pipeline.models import create_model  # noqa: E402

CROWN, WINGS = 4, (8, 12)  # CUB part indices (0-based)


def dataset(args) -> dict:
    """Images (N,3,S,S) normalised, labels, parts (N,15,3), drawn once and cached."""
    patterned = "" if args.patterned_distractors == 0.5 else f"_patterned{args.patterned_distractors:g}"
    path = Path(args.cache) / f"birds_{args.classes}x{args.per_class}_{args.size}px_size{args.bird_size}{patterned}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        classes = synthetic_cub.bird_classes(args.classes)
        samples = [synthetic_cub.draw_bird_image(classes[i % args.classes], args.size, synthetic_cub.image_rng(0, i),
                                                 bird_size=args.bird_size,
                                                 patterned_distractors=args.patterned_distractors)
                   for i in range(args.classes * args.per_class)]
        np.savez(path, x=np.stack([s.image for s in samples]), y=np.arange(len(samples)) % args.classes,
                 parts=np.array([s.parts for s in samples]))
    data = np.load(path)
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean[:, None, None]) / std[:, None, None]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))
    n_test = len(x) * 3 // 10
    return {"x": x, "y": torch.from_numpy(data["y"]).long(), "parts": torch.from_numpy(data["parts"]).float(),
            "test": order[:n_test], "train": order[n_test:]}


def oracle_crops(x: torch.Tensor, parts: torch.Tensor, size: int) -> torch.Tensor:
    """Full-resolution crops of half the image side, centred between the crown and the visible wing
    (moved inside the image)."""
    wing = torch.where(parts[:, WINGS[0], 2:3] > 0, parts[:, WINGS[0], :2], parts[:, WINGS[1], :2])
    centre = (parts[:, CROWN, :2] + wing) / 2
    half = size // 4
    corner = (centre.round().long() - half).clamp(0, size - 2 * half)
    return torch.stack([img[:, y:y + 2 * half, x:x + 2 * half] for img, (x, y) in zip(x, corner.tolist())])


def score(model, data, index, args) -> dict:
    model.eval()
    correct, hits, centres = 0, [], []
    with torch.no_grad():
        for start in range(0, len(index), 128):
            batch = index[start:start + 128]
            x = data["x"][batch]
            if args.oracle_crop:
                x = oracle_crops(x, data["parts"][batch], args.size)
            correct += (model(x).argmax(1) == data["y"][batch]).sum().item()
            if args.baseline or args.oracle_crop:
                continue
            boxes = model.attend(x)["boxes"]  # (B, N, 4): x0, y0, x1, y1 in [-1, 1]
            parts = data["parts"][batch]
            points = parts[:, [CROWN, *WINGS], :2] / args.size * 2 - 1
            inside = ((points[:, None, :, 0] >= boxes[..., 0:1]) & (points[:, None, :, 0] <= boxes[..., 2:3])
                      & (points[:, None, :, 1] >= boxes[..., 1:2]) & (points[:, None, :, 1] <= boxes[..., 3:4]))
            wing = torch.where(parts[:, None, WINGS[0], 2] > 0, inside[..., 1], inside[..., 2])
            hits.append(torch.stack([inside[..., 0], wing, inside[..., 0] & wing], -1).float())
            centres.append((boxes[..., :2] + boxes[..., 2:]) / 2)
    model.train()
    out = {"top1": round(correct / len(index), 4)}
    if hits:
        rate, centre = torch.cat(hits).mean(0), torch.cat(centres)
        out.update(crown=[round(v, 2) for v in rate[:, 0].tolist()], wing=[round(v, 2) for v in rate[:, 1].tolist()],
                   both=[round(v, 2) for v in rate[:, 2].tolist()],
                   spread=round(centre.std(0).mean().item(), 3))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=9)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--bird-size", type=float, default=1.45)
    p.add_argument("--patterned-distractors", type=float, default=0.0,
                   help="the demo's 0 (clutter in bird colours only); the trials before 2026-12-07 ran 0.5")
    p.add_argument("--backbone", default="test_resnet.r160_in1k")
    p.add_argument("--baseline", action="store_true", help="the bare backbone on the image downscaled 2x")
    p.add_argument("--oracle-crop", action="store_true",
                   help="the bare backbone on a full-resolution crop centred between the crown and the visible "
                        "wing (ground-truth parts: an oracle of what a window on the bird can read)")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--loc-scale", type=float, default=0.1, help="localisation lr = lr x this")
    p.add_argument("--loc-freeze", type=int, default=0, help="localisation lr 0 for this many first steps")
    p.add_argument("--loc-downscale", type=int, default=None, help="model.extra.loc_downscale")
    p.add_argument("--loc-head", default="linear", help="model.extra.loc_head: linear | softargmax")
    p.add_argument("--loc-spread", type=float, default=1.0, help="model.extra.loc_spread (softargmax prior, cells)")
    p.add_argument("--loc-sharpness", type=float, default=1.0, help="model.extra.loc_sharpness")
    p.add_argument("--loc-features", default="own", help="model.extra.loc_features: own | stream")
    p.add_argument("--fd-directions", default="random", help="model.extra.fd_directions: random | axes")
    p.add_argument("--jitter", type=float, default=0.0, help="trial: training windows shifted by U(-j, j) per axis")
    p.add_argument("--loc-calibrate", action="store_true", help="model.extra.loc_calibrate")
    p.add_argument("--loc-stride", type=int, default=None, help="model.extra.loc_stride")
    p.add_argument("--fd-objective", default="loss", help="model.extra.fd_objective: loss | margin")
    p.add_argument("--fd-step", type=float, default=0.0, help="finite-difference window gradient (0: backprop)")
    p.add_argument("--crop", type=int, default=None, help="window side in px (default: half the image, scale 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="write the trained model's state dict here")
    p.add_argument("--cache", default="runs/demo_recipe_trials")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = dataset(args)
    torch.manual_seed(args.seed)
    kw = dict(backbone=args.backbone, input_size=args.size, crop_size=args.crop or args.size // 2, num_classes=args.classes,
              dropout=0.2)
    if args.oracle_crop:
        model = create_model("nxst_cnn", num_streams=0, **{**kw, "input_size": args.size // 2})
    elif args.baseline:
        model = create_model("nxst_cnn", num_streams=0, **kw)
    else:
        extra = {} if args.loc_downscale is None else {"loc_downscale": args.loc_downscale}
        if args.loc_head != "linear":
            extra.update(loc_head=args.loc_head, loc_spread=args.loc_spread, loc_sharpness=args.loc_sharpness)
        if args.loc_features != "own":
            extra.update(loc_features=args.loc_features)
        if args.loc_stride:
            extra.update(loc_stride=args.loc_stride)
        if args.loc_calibrate:
            extra.update(loc_calibrate=True)
        if args.fd_step:
            extra.update(window_gradient="finite_difference", fd_step=args.fd_step, fd_objective=args.fd_objective,
                         fd_directions=args.fd_directions)
        if args.crop:  # the window covers `crop` px of the image, sampled at full resolution
            extra.update(transform_scale=args.crop / args.size)
        model = create_model("nxst_cnn", num_streams=2, **kw, **extra)
    groups = [{"params": ps, "role": role, "base": args.lr * (args.loc_scale if role == "localisation" else 1.0)}
              for role, ps in model.parameter_groups().items()]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.05)
    print(json.dumps(vars(args)), flush=True)
    if not (args.baseline or args.oracle_crop):  # the windows the model starts from, scored on the same test images
        print(json.dumps({"step": 0, **score(model, data, data["test"], args)}), flush=True)
    generator, start = torch.Generator().manual_seed(args.seed), time.time()
    for step in range(args.steps):
        factor = min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            frozen = group["role"] == "localisation" and step < args.loc_freeze
            group["lr"] = 0.0 if frozen else group["base"] * factor
        batch = data["train"][torch.randint(0, len(data["train"]), (args.batch,), generator=generator)]
        x, y = data["x"][batch], data["y"][batch]
        flip = torch.rand(args.batch, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if args.oracle_crop:  # the parts flip with the image
            parts = data["parts"][batch].clone()
            parts[flip, :, 0] = args.size - 1 - parts[flip, :, 0]
            x = oracle_crops(x, parts, args.size)
        bare = args.baseline or args.oracle_crop
        if args.jitter and not bare:  # one shift per image and window for this step's passes
            shift = (torch.rand(args.batch, 2, 2, generator=generator) * 2 - 1) * args.jitter
            sample = type(model.transformer).sample
            model.transformer.sample = lambda x_, theta, _s=shift: sample(model.transformer, x_, theta + _s)
        logits = model(x, targets=y) if args.fd_step and not bare else model(x)
        if args.jitter and not bare:
            del model.transformer.sample
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % max(1, args.steps // 4) == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 3), "seconds": round(time.time() - start),
                              **score(model, data, data["test"], args)}), flush=True)
    if args.save:
        torch.save(model.state_dict(), args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
