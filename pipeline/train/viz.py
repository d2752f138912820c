"""The attention picture (paper Table 3, right): each image with its N windows, then the N crops.

One row per validation image: the image with stream k's window outlined in colour k, followed by
the N crops the transformers produced, each framed in the same colour. Crops come out of the
model normalised, so they are un-normalised with the data mean / std for display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

# Distinct colours, one per stream (cycled beyond eight streams).
STREAM_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25),
                  (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def _to_pil(image: torch.Tensor) -> Image.Image:
    """(3,H,W) uint8 or float in [0,1] -> PIL RGB."""
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    shape = (1,) * (x.dim() - 3) + (-1, 1, 1)
    return x.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)


def attention_picture(images: torch.Tensor, boxes: torch.Tensor, crops: torch.Tensor,
                      mean: Sequence[float], std: Sequence[float], path: Path) -> Path:
    """Write the picture for `images` (K,3,H,W) uint8, `boxes` (K,N,4) in [-1,1] as
    [x0,y0,x1,y1], `crops` (K,N,3,h,w) normalised; returns `path` (written atomically)."""
    k, n = boxes.shape[:2]
    h, w = images.shape[-2:]
    ch, cw = crops.shape[-2:]
    pad = 4
    row_h = max(h, ch) + pad
    canvas = Image.new("RGB", (w + n * (cw + pad) + pad, k * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    crops = unnormalize(crops.detach().cpu(), mean, std)
    for i in range(k):
        top = pad + i * row_h
        canvas.paste(_to_pil(images[i]), (pad, top))
        for s in range(n):
            colour = STREAM_COLOURS[s % len(STREAM_COLOURS)]
            x0, y0, x1, y1 = ((boxes[i, s].float().cpu() + 1) / 2 * torch.tensor([w, h, w, h])).tolist()
            draw.rectangle([pad + x0, top + y0, pad + x1, top + y1], outline=colour, width=2)
            left = pad + w + pad + s * (cw + pad)
            canvas.paste(_to_pil(crops[i, s]), (left, top))
            draw.rectangle([left, top, left + cw - 1, top + ch - 1], outline=colour, width=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
    return path
