"""The attention picture (paper Table 3, right): each image with its N windows, then the N crops.

One row per validation image: the image with stream k's window outlined in colour k, followed by
the N crops the transformers produced, each framed in the same colour. Crops come out of the
model normalised, so they are un-normalised with the data mean / std for display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

# Distinct colours, one per stream (cycled beyond eight streams).
STREAM_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25),
                  (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def _to_pil(image: torch.Tensor) -> Image.Image:
    """(3,H,W), grayscale (1,H,W) or two channels (2,H,W: red and green, MNIST addition's two digits),
    uint8 or float in [0,1] -> PIL RGB."""
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if image.shape[0] == 2:
        image = torch.cat([image, torch.zeros_like(image[:1])])
    return Image.fromarray(image[:3].expand(3, -1, -1).permute(1, 2, 0).cpu().numpy())


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    shape = (1,) * (x.dim() - 3) + (-1, 1, 1)
    return x.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)


def attention_picture(images: torch.Tensor, boxes: torch.Tensor, crops: torch.Tensor,
                      mean: Sequence[float], std: Sequence[float], path: Path,
                      captions: Optional[Sequence[str]] = None, legend: Optional[Sequence[str]] = None) -> Path:
    """Write the picture for `images` (K,3,H,W) uint8, `boxes` (K,N,4) in [-1,1] as
    [x0,y0,x1,y1], `crops` (K,N,3,h,w) normalised; returns `path` (written atomically).

    `captions` (one per image, may hold newlines) are written beside each row; `legend` (one
    label per stream) is drawn above the rows in the streams' colours.
    """
    k, n = boxes.shape[:2]
    h, w = images.shape[-2:]
    ch, cw = crops.shape[-2:]
    pad = 4
    font = ImageFont.load_default()
    line_h = 12
    caption_w = 8 + 7 * max((len(line) for c in captions or [] for line in c.split("\n")), default=0)
    caption_h = line_h * max((c.count("\n") + 1 for c in captions or []), default=0)
    row_h = max(h, ch, caption_h) + pad
    top0 = pad + (line_h + pad if legend else 0)
    canvas = Image.new("RGB", (w + n * (cw + pad) + pad + caption_w, top0 + k * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if legend:
        x = pad
        for s, label in enumerate(legend):
            colour = STREAM_COLOURS[s % len(STREAM_COLOURS)]
            draw.rectangle([x, pad + 2, x + 9, pad + 11], outline=colour, width=2)
            draw.text((x + 13, pad), label, fill=(0, 0, 0), font=font)
            x += 13 + 7 * len(label) + 12
    crops = unnormalize(crops.detach().cpu(), mean, std)
    for i in range(k):
        top = top0 + i * row_h
        canvas.paste(_to_pil(images[i]), (pad, top))
        for s in range(n):
            colour = STREAM_COLOURS[s % len(STREAM_COLOURS)]
            x0, y0, x1, y1 = ((boxes[i, s].float().cpu() + 1) / 2 * torch.tensor([w, h, w, h])).tolist()
            draw.rectangle([pad + x0, top + y0, pad + x1, top + y1], outline=colour, width=2)
            left = pad + w + pad + s * (cw + pad)
            canvas.paste(_to_pil(crops[i, s]), (left, top))
            draw.rectangle([left, top, left + cw - 1, top + ch - 1], outline=colour, width=1)
        if captions:
            draw.multiline_text((pad + w + n * (cw + pad) + 4, top), captions[i], fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
    return path
