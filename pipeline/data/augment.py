"""Augmentation presets (albumentations) and the deterministic evaluation view with its geometry.

| data.augment | train                                                   | eval                          |
|--------------|---------------------------------------------------------|-------------------------------|
| cub          | shorter side -> resize, random input_size crop, h-flip  | shorter side -> resize, centre crop |
| svhn         | the whole crop -> input_size (no augmentation)          | the whole crop -> input_size  |
| svhn_shift   | the whole crop -> input_size, moved up to +-5/64 of a side | the whole crop -> input_size |
| svhn_crop    | resize x resize, random input_size crop (no flip)       | resize x resize, centre crop  |
| digits       | input_size x input_size                                 | same                          |
| none         | input_size x input_size                                 | same                          |

cub follows paper A.5 (512 -> random 448 crop). The SVHN shards hold the paper's 64 x 64 (128 x
128) crops around the digits (data_prep svhn, following Goodfellow et al. [13]); `svhn`, the SVHN
configs' preset, feeds the whole crop, in training and evaluation, as paper 4.2 / A.4 describe
the input. The paper's references train on more views: [13] crops a 54 x 54 window at a random
place of the 64 x 64 image (Ba et al. [1] take [13]'s preprocessing). `svhn_crop` is that, as
[13] describe it, for a network of any input_size: a random window of 54/64 of the crop's side,
resized to input_size (data.resize = input_size * 64/54: 76 for 64, 152 for 128); evaluation
then takes the centre window (54/64 of the side), the view of the scale the network learnt, not
the whole crop. `svhn_shift` keeps the whole crop at its own scale, the view evaluation sees, and
gives it the displacements [13]'s random windows give the digits (up to +-5 px of 64 each way,
+-10 of 128; the side is padded by repeating its edge pixels to data.resize = input_size * 74/64
and input_size is cropped at a random place). No flips: a mirrored digit is another digit.
`resize` is data.resize; its default is the preset's ratio times input_size (the paper's 512
for 448; 224 -> 256) unless set to another value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import cv2
import numpy as np

from pipeline.config import Config
from pipeline.data.manifest import DataError

# Resize / crop ratios of the paper's presets, used when data.resize is null.
# svhn_crop: [13]'s 64 -> random 54 window; svhn_shift: 64 padded by [13]'s +-5 px displacements each way.
RESIZE_RATIO = {"cub": 512 / 448, "svhn_crop": 64 / 54, "svhn_shift": 74 / 64}


def effective_resize(cfg: Config) -> int:
    """The side the image is resized to before cropping input_size from it."""
    augment, size, resize = cfg.data.augment, cfg.model.input_size, cfg.data.resize
    if augment not in RESIZE_RATIO:
        return size
    if resize is None:
        resize = round(size * RESIZE_RATIO[augment])
    if resize < size:
        raise DataError(f"data.resize={resize} is smaller than model.input_size={size}: nothing to crop")
    return resize


def train_augment(cfg: Config):
    """The albumentations Compose of cfg.data.augment: uint8 HxWx3 -> uint8 input_size^2 x 3."""
    import albumentations as A  # here, not at the top: evaluation-only processes skip its slow import

    size, resize = cfg.model.input_size, effective_resize(cfg)
    area = {"area_for_downscale": "image"}  # INTER_AREA when shrinking (no aliasing), linear when enlarging
    if cfg.data.augment == "cub":
        steps = [A.SmallestMaxSize(max_size=resize, **area), A.RandomCrop(size, size), A.HorizontalFlip(p=0.5)]
    elif cfg.data.augment == "svhn_crop":  # flipping digits would change their meaning
        steps = [A.Resize(resize, resize, **area), A.RandomCrop(size, size)]
    elif cfg.data.augment == "svhn_shift":  # the whole crop, displaced by up to (resize - size) / 2 px
        steps = [A.Resize(size, size, **area),
                 A.PadIfNeeded(resize, resize, border_mode=cv2.BORDER_REPLICATE, position="center"),
                 A.RandomCrop(size, size)]
    else:
        steps = [A.Resize(size, size, **area)]
    return A.Compose(steps, seed=cfg.train.seed)


@dataclass(frozen=True)
class View:
    """Where the original image lies in the network input: input_px = original_px * scale - offset.

    Coordinates are continuous pixel positions (pixel edges at integers), which both cv2.resize
    and the [-1, 1] convention of F.affine_grid(align_corners=False) use.
    """
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    size: int  # side of the (square) network input

    def to_input(self, points: np.ndarray) -> np.ndarray:
        """(K, 2) original pixel (x, y) -> network input pixel (x, y)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return points * [self.scale_x, self.scale_y] - [self.offset_x, self.offset_y]

    def to_normalized(self, points: np.ndarray) -> np.ndarray:
        """(K, 2) original pixel (x, y) -> input coordinates in [-1, 1] (outside the view: beyond)."""
        return self.to_input(points) / self.size * 2.0 - 1.0

    def as_list(self) -> list:
        return [self.scale_x, self.scale_y, self.offset_x, self.offset_y, self.size]


def eval_view(width: int, height: int, cfg: Config) -> Tuple[View, Tuple[int, int]]:
    """(View, resized (width, height)) of the deterministic evaluation transform of an image."""
    size, resize = cfg.model.input_size, effective_resize(cfg)
    if cfg.data.augment == "cub":
        short = min(width, height)
        new_w, new_h = max(size, round(width * resize / short)), max(size, round(height * resize / short))
    elif cfg.data.augment == "svhn_crop":
        new_w = new_h = resize
    else:  # svhn, svhn_shift, digits, none: the whole image
        new_w = new_h = size
    view = View(new_w / width, new_h / height, (new_w - size) // 2, (new_h - size) // 2, size)
    return view, (new_w, new_h)


def eval_transform(image: np.ndarray, original_size: Sequence[int], cfg: Config) -> Tuple[np.ndarray, View]:
    """Resize and centre-crop `image` (possibly decoded at reduced size) to input_size^2."""
    view, (new_w, new_h) = eval_view(*original_size, cfg)
    shrink = new_w < image.shape[1] or new_h < image.shape[0]
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    x0, y0, size = int(view.offset_x), int(view.offset_y), view.size
    return resized[y0:y0 + size, x0:x0 + size], view
