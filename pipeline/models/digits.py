"""Models of paper A.3 (distorted MNIST, Table 1): FCN, CNN, ST-FCN and ST-CNN.

    model = create_model("digits_st_cnn", transform="tps", input_size=42, pool_after_st=True)
    logits = model(images)            # images (B, 1, S, S) in [0, 1], black background

- FCN: two hidden layers of `width` units, ReLU, linear classifier.
- CNN: conv 9x9 (width filters) - max 2 - conv 7x7 (2 x width) - max 2 - linear classifier.
  The convs are unpadded, which keeps the 7x7 conv (where the parameters are) on a small map and
  the CNN cheap enough to train on CPU; only inputs under 28 px (the 21x21 output of a pooled
  transformer on RTS) get the first conv zero-padded to keep its size.
- ST-FCN / ST-CNN: a spatial transformer (`affine`, `projective` or 16-point `tps`) at the start,
  then the FCN / CNN. Localisation: FC 32-32-32 on the image (ST-FCN); on a 2x downsampled image,
  two unpadded 20-filter 5x5 convs with 2x2 max-pooling between them, then a 20-unit FC (ST-CNN). The
  transformer starts at the identity (zero weights, identity bias); with `pool_after_st` its output
  is average-pooled 2x (RTS and TC in the paper), so the classifier sees a 21x21 / 30x30 image.

- MNIST addition (paper A.1): `in_channels` 2 (a digit in each); `num_transformers` transformers in
  parallel, each warping the whole input with its own localisation net, outputs concatenated (the
  2xST-FCN); `loc_downscale` (the ST-FCN localisation FC on the input average-pooled this many
  times smaller); `pool_input` (the FCN / CNN classify the input average-pooled 2x, the size the
  pooled transformers' outputs have).

`width=None` picks the width that brings the whole model closest to `target_params` (400k, as in
the paper), so every model of one experiment has about the same number of parameters. Inputs are
not normalised: the transformer's zero padding must stay the background colour.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from data_prep.transform_kinds import TRANSFORM_KINDS

from .registry import register_model
from .spatial_transformer import SpatialTransformer

TARGET_PARAMS = 400_000
MIN_SIDE = 16  # the CNN's last feature map is at least 1x1 (with the padded first conv)


def warp_kinds() -> List[str]:
    """The transform kinds an ST-FCN / ST-CNN takes: those that warp the whole image (paper A.2), not windows."""
    return [kind.name for kind in TRANSFORM_KINDS if not kind.window]


class DigitsNet(nn.Module):
    """[spatial transformer(s) -> optional 2x average pooling ->] features -> linear classifier.

    With several transformers in parallel (MNIST addition's 2xST-FCN, paper A.1) each one warps the
    whole C-channel input with its own localisation net, and their outputs are concatenated into
    N x C channels for the classifier.
    """

    task = "classification"

    def __init__(self, features: nn.Module, head: nn.Module,
                 transformers: Sequence[SpatialTransformer] = (), pool: bool = False):
        super().__init__()
        # The first keeps the attribute name single-transformer checkpoints were saved under.
        self.transformer = transformers[0] if transformers else None
        self.other_transformers = nn.ModuleList(transformers[1:])
        self.pool = nn.AvgPool2d(2) if pool else nn.Identity()  # the classifier's input, 2x smaller
        self.features = features
        self.head = head
        self.num_streams = len(transformers)

    @property
    def transformers(self) -> List[SpatialTransformer]:
        return [self.transformer, *self.other_transformers] if self.transformer is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transformer is not None:
            x = torch.cat([transformer(x)[0][:, 0] for transformer in self.transformers], 1)
        return self.head(self.features(self.pool(x)))

    @torch.no_grad()
    def attend(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """theta (B, N, ...), boxes (B, N, 4) = bounding box [x0, y0, x1, y1] of the region each of the
        N transformers samples, in input coordinates [-1, 1], crops (B, N, C, S, S): their outputs
        before pooling."""
        if self.transformer is None:
            raise ValueError("attend() needs a spatial-transformer model (digits_st_fcn / digits_st_cnn)")
        crops, thetas = zip(*(transformer(x) for transformer in self.transformers))
        theta = torch.cat(thetas, 1)
        return {"theta": theta, "boxes": self.transformer.boxes(theta), "crops": torch.cat(crops, 1)}

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        groups = {"localisation": [p for t in self.transformers for p in t.parameters()],
                  "backbone": list(self.features.parameters()),
                  "head": list(self.head.parameters())}
        return {role: params for role, params in groups.items() if params}


# ---- parts -------------------------------------------------------------------------------------

def fcn_features(input_size: int, width: int, channels: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * input_size * input_size, width), nn.ReLU(inplace=True),
                         nn.Linear(width, width), nn.ReLU(inplace=True))


def cnn_side(input_size: int) -> int:
    """Side of the CNN's last feature map: 9x9 conv, max 2, unpadded 7x7 conv, max 2."""
    return ((input_size - 8 + 2 * cnn_padding(input_size)) // 2 - 6) // 2


def cnn_padding(input_size: int) -> int:
    return 0 if input_size >= 28 else 4


def cnn_features(input_size: int, width: int, channels: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, width, 9, padding=cnn_padding(input_size)), nn.MaxPool2d(2), nn.ReLU(inplace=True),
                         nn.Conv2d(width, 2 * width, 7), nn.MaxPool2d(2), nn.ReLU(inplace=True), nn.Flatten())


def fcn_localisation(input_size: int, channels: int = 1, downscale: int = 1) -> nn.Sequential:
    """Paper A.3 ST-FCN: FC 32-32-32 on the full image (`downscale`: on the image average-pooled this
    many times smaller, as the ST-CNN's localisation sees it; most of the net's parameters are its
    first layer's, one row per input pixel)."""
    side = input_size // downscale
    pool = [nn.AvgPool2d(downscale)] if downscale > 1 else []  # none: the layer indices older checkpoints hold
    return nn.Sequential(*pool, nn.Flatten(), nn.Linear(channels * side * side, 32), nn.ReLU(inplace=True),
                         nn.Linear(32, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.ReLU(inplace=True))


def loc_side(input_size: int) -> int:
    """Side of the ST-CNN localisation net's last map: /2, 5x5 conv, max 2, 5x5 conv (28 -> 1, 42 -> 4, 60 -> 9)."""
    return (input_size // 2 - 4) // 2 - 4


def cnn_localisation(input_size: int, channels: int = 1) -> nn.Sequential:
    """Paper A.3 ST-CNN: on the 2x-downsampled input, two 20-filter 5x5 convolutions without padding
    with 2x2 max-pooling between them, then FC 20. The paper does not say how it downsamples: a 2x2
    average (an anti-aliased half-size image, which a later max-pool would not be)."""
    side = loc_side(input_size)
    if side < 1:
        raise ValueError(f"input_size={input_size} is too small for the ST-CNN localisation net; expected at least 28")
    return nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(channels, 20, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(20, 20, 5), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(20 * side * side, 20), nn.ReLU(inplace=True))


def _build(backbone: str, input_size: int, num_classes: int, width: int, transform: Optional[str],
           pool_after_st: bool, in_channels: int = 1, num_transformers: int = 1, loc_downscale: int = 1,
           pool_input: bool = False) -> DigitsNet:
    transformers = []
    side, channels = (input_size // 2 if pool_input else input_size), in_channels
    if transform is not None:
        for _ in range(num_transformers):
            localisation, features = ((fcn_localisation(input_size, in_channels, loc_downscale), 32) if backbone == "fcn"
                                      else (cnn_localisation(input_size, in_channels), 20))
            transformers.append(SpatialTransformer(localisation, features, transform, input_size, num_transforms=1,
                                                   scale=1.0, num_control_points=16))
        side = input_size // 2 if pool_after_st else input_size
        channels = in_channels * num_transformers  # the transformers' outputs, concatenated
    if backbone == "fcn":
        features, out = fcn_features(side, width, channels), width
    else:
        features, out = cnn_features(side, width, channels), 2 * width * cnn_side(side) ** 2
    pool = pool_after_st if transform is not None else pool_input
    return DigitsNet(features, nn.Linear(out, num_classes), transformers, pool)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit_width(build: Callable[[int], nn.Module], target: int, low: int = 1, high: int = 4096) -> int:
    """The width whose model's parameter count is closest to `target` (counts grow with width)."""
    def count(width: int) -> int:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            return count_params(build(width))

    while low < high:  # smallest width with count >= target
        mid = (low + high) // 2
        if count(mid) < target:
            low = mid + 1
        else:
            high = mid
    candidates = [w for w in (low - 1, low) if w >= 1]
    return min(candidates, key=lambda w: abs(count(w) - target))


def _digits_model(backbone: str, input_size: int, num_classes: int, width: Optional[int], target_params: int,
                  transform: Optional[str] = None, pool_after_st: bool = False, in_channels: int = 1,
                  num_transformers: int = 1, loc_downscale: int = 1, pool_input: bool = False) -> DigitsNet:
    min_size = 2 * MIN_SIDE if (transform is not None and pool_after_st) or pool_input else MIN_SIDE
    if input_size < min_size:
        raise ValueError(f"input_size={input_size} is too small for digits_{'st_' if transform else ''}{backbone}"
                         f"{' with pool_after_st' if pool_after_st else ''}; expected at least {min_size}")
    if transform is not None and transform not in warp_kinds():
        raise ValueError(f"transform='{transform}' is not one of {', '.join(warp_kinds())}")
    if min(in_channels, num_transformers, loc_downscale) < 1:
        raise ValueError(f"in_channels={in_channels}, num_transformers={num_transformers} and "
                         f"loc_downscale={loc_downscale} must be at least 1")
    shape = dict(transform=transform, pool_after_st=pool_after_st, in_channels=in_channels,
                 num_transformers=num_transformers, loc_downscale=loc_downscale, pool_input=pool_input)
    if width is None:
        width = fit_width(lambda w: _build(backbone, input_size, num_classes, w, **shape), target_params)
    return _build(backbone, input_size, num_classes, width, **shape)


@register_model
def digits_fcn(input_size: int = 28, num_classes: int = 10, width: Optional[int] = None,
               target_params: int = TARGET_PARAMS, in_channels: int = 1, pool_input: bool = False) -> DigitsNet:
    return _digits_model("fcn", input_size, num_classes, width, target_params, in_channels=in_channels,
                         pool_input=pool_input)


@register_model
def digits_cnn(input_size: int = 28, num_classes: int = 10, width: Optional[int] = None,
               target_params: int = TARGET_PARAMS, in_channels: int = 1, pool_input: bool = False) -> DigitsNet:
    return _digits_model("cnn", input_size, num_classes, width, target_params, in_channels=in_channels,
                         pool_input=pool_input)


@register_model
def digits_st_fcn(input_size: int = 28, num_classes: int = 10, transform: str = "affine",
                  pool_after_st: bool = False, width: Optional[int] = None,
                  target_params: int = TARGET_PARAMS, in_channels: int = 1, num_transformers: int = 1,
                  loc_downscale: int = 1) -> DigitsNet:
    return _digits_model("fcn", input_size, num_classes, width, target_params, transform, pool_after_st,
                         in_channels, num_transformers, loc_downscale)


@register_model
def digits_st_cnn(input_size: int = 28, num_classes: int = 10, transform: str = "affine",
                  pool_after_st: bool = False, width: Optional[int] = None,
                  target_params: int = TARGET_PARAMS, in_channels: int = 1, num_transformers: int = 1) -> DigitsNet:
    return _digits_model("cnn", input_size, num_classes, width, target_params, transform, pool_after_st,
                         in_channels, num_transformers)
