"""Does the classifier's gradient point an N x ST-CNN's windows at what decides the class?

    python -m pipeline.experiments window-gradient --checkpoint demo_out/run/checkpoints/best.pt

A localisation net learns only from the gradient of the loss with respect to the window
parameters, through the sampler. This probe scores that signal on a trained `translation` model
and labelled test images (parts are used for scoring only, as everywhere):

- `gradient_cosine`: per image and stream, the cosine between the descent direction -dL/dt of the
  window centre t and the direction from t to the bird (the mean of its visible parts); ~0 means
  the pointwise gradient carries no sign of where the bird is.
- `loss_change_towards_bird`: the mean change of the loss when one stream's window moves
  `step` (in [-1, 1] units; 0.0625 = 4 px of a 128 px input) towards the bird, and the fraction
  of images whose loss falls: the landscape the gradient would have to follow.
- `top1` with the windows where the model puts them, and with every window on the bird.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

STEPS = (0.0625, 0.125, 0.25)


def _batch(cfg, limit: int):
    """(images uint8, targets, bird centres (B, 2) in [-1, 1]) of the first `limit` test images."""
    from pipeline.data import build_eval_loader, read_manifest
    from pipeline.evaluation import part_points

    manifest = read_manifest(cfg.data.root)
    loader = build_eval_loader(cfg, manifest, cfg.data.eval_split, rank=0, world_size=1, batch_size=64,
                               num_workers=0)
    images, targets, centres = [], [], []
    for x, y, metas in loader:
        points, visible = part_points(metas, len(manifest.parts))
        keep = visible.any(1)
        weights = visible.double().unsqueeze(-1)
        centres.append(((points * weights).sum(1) / weights.sum(1).clamp(min=1))[keep].float())
        images.append(x[keep])
        targets.append(y[keep])
        if sum(len(t) for t in targets) >= limit:
            break
    return torch.cat(images)[:limit], torch.cat(targets)[:limit], torch.cat(centres)[:limit]


def probe(checkpoint: Path, limit: int = 256, steps: Sequence[float] = STEPS) -> Dict[str, object]:
    from pipeline.data import normalize
    from pipeline.evaluate import load_model
    from pipeline.models.spatial_transformer import warp_many

    model, cfg, _ = load_model(checkpoint)
    st = getattr(model, "transformer", None)
    if st is None or not st.transform_kind.fixed_scale:  # the probe moves window centres
        raise ValueError(f"{checkpoint}: the probe needs an N x ST-CNN with translation windows "
                         f"(model.transform=translation)")
    images, targets, centres = _batch(cfg, limit)
    x = normalize(images, cfg.data.mean, cfg.data.std)

    def losses(theta: torch.Tensor) -> torch.Tensor:
        crops = warp_many(x, theta, st.kind, st.out_size, scale=st.scale, align_corners=st.align_corners,
                          padding_mode=st.padding_mode)
        return F.cross_entropy(model.classify(crops), targets, reduction="none")

    with torch.no_grad():
        theta = model.predict_windows(x)
    theta.requires_grad_(True)
    base = losses(theta)
    base.sum().backward()  # each image's loss depends on its own windows only
    descent, towards = -theta.grad, centres[:, None] - theta.detach()
    cosine = F.cosine_similarity(descent, towards, dim=-1)  # (B, N)
    out: Dict[str, object] = {"checkpoint": str(checkpoint), "images": len(targets),
                              "gradient_cosine": [round(c, 4) for c in cosine.mean(0).tolist()]}
    change: List[Dict[str, float]] = []
    base = base.detach()
    with torch.no_grad():
        limit_t = 1.0 - st.scale  # the window stays inside the image, as the tanh bound keeps it
        for stream in range(theta.shape[1]):
            for step in steps:
                moved = theta.detach().clone()
                direction = towards[:, stream]
                length = direction.norm(dim=-1, keepdim=True).clamp(min=1e-6)
                moved[:, stream] = (moved[:, stream] + direction / length * length.clamp(max=step)).clamp(
                    -limit_t, limit_t)
                delta = losses(moved) - base
                change.append({"stream": stream, "step": step, "mean": round(delta.mean().item(), 4),
                               "fraction_lower": round((delta < 0).float().mean().item(), 3)})
        on_bird = centres.clamp(-limit_t, limit_t)[:, None].expand_as(theta).contiguous()
        crops = warp_many(x, on_bird, st.kind, st.out_size, scale=st.scale)
        out["loss_change_towards_bird"] = change
        out["top1"] = {"model_windows": round((model.classify(warp_many(
            x, theta.detach(), st.kind, st.out_size, scale=st.scale)).argmax(1) == targets).float().mean().item(), 4),
            "windows_on_bird": round((model.classify(crops).argmax(1) == targets).float().mean().item(), 4)}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.experiments window-gradient", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--images", type=int, default=256, help="test images to probe")
    args = parser.parse_args(argv)
    from pipeline.train import INPUT_ERRORS

    try:
        result = probe(args.checkpoint, args.images)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
