"""Localisation networks: they map an image or feature map to the features a transformer head reads.

    TrunkLocalisation("inception_v3", downscale=2, input_size=448)  # paper A.5: trunk, 1x1 conv 128, fc 128
    ConvLocalisation(3, 64)                          # paper A.4 ST-CNN Single: conv-max-conv-fc-fc
    FcLocalisation(48 * 32 * 32)                     # paper A.4 ST-CNN Multi: fc 32 - fc 32

Each exposes `out_features`; the parameter head itself (zero weights, identity/tiling bias) lives in
`SpatialTransformer`. `create_timm` is the one place that turns `pretrained` into timm arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F


def create_timm(name: str, pretrained: Any = None, **kwargs: Any) -> nn.Module:
    """A timm model; `pretrained`: None/False = random init, True = timm's hub, str = a weights file."""
    if pretrained is None or pretrained is False:
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is True:
        from .weights import check_pretrained
        check_pretrained(name, True, probe_network=True)  # offline without a cached copy: one line, not a minute of retries
        return timm.create_model(name, pretrained=True, **kwargs)
    if isinstance(pretrained, (str, Path)):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained={str(pretrained)!r}: no such weights file for '{name}'")
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        except (RuntimeError, KeyError, ValueError) as err:  # missing / mis-shaped keys: one line, naming the file
            detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:2]) or type(err).__name__
            detail = detail if len(detail) <= 300 else detail[:300] + " ..."
            raise ValueError(f"model.pretrained={str(pretrained)!r} does not hold weights for '{name}': {detail}") from None
    raise ValueError(f"model.pretrained={pretrained!r} must be null, true or a weights file path")


class TrunkLocalisation(nn.Module):
    """Paper A.5: a timm trunk cut before its last pooling, 1x1 conv to 128 channels, fc 128.

    `downscale` > 1 average-pools the input first: at 448 px input the localisation net runs at
    224 px, as in the paper, which makes it cost one backbone pass instead of four. As the paper
    does, the fc layer reads the whole map flattened (every cell in place: the fc knows *where*
    each feature is), sized for the map of an `input_size` input (inception_v3 at 224 px: 5 x 5).
    `grid` instead average-pools the map to `grid` x `grid` first: an fc whose size does not depend
    on the input size, fewer parameters, coarser places.
    """

    def __init__(self, backbone: str, *, downscale: int = 1, channels: int = 128, hidden: int = 128,
                 grid: Optional[int] = None, input_size: Optional[int] = None, pretrained: Any = None,
                 in_chans: int = 3, with_fc: bool = True, stride: Optional[int] = None):
        super().__init__()
        self.downscale = int(downscale)
        self.trunk_in_chans = in_chans
        if stride is None:  # the trunk's last map (stride 32 for most timm backbones)
            self.trunk = create_timm(backbone, pretrained, num_classes=0, global_pool="", in_chans=in_chans)
            trunk_channels, self.cut = self.trunk.num_features, False
        else:  # an earlier, finer map: the trunk stops at the stage of that stride
            probe = timm.create_model(backbone, pretrained=False, features_only=True)
            index = stage_of_stride(probe.feature_info.reduction(), stride, backbone)
            self.trunk = create_timm(backbone, pretrained, features_only=True, out_indices=(index,),
                                     in_chans=in_chans)
            trunk_channels, self.cut = probe.feature_info.channels()[index], True
        self.reduce = nn.Conv2d(trunk_channels, channels, 1)
        self.grid = grid
        if grid is not None and grid < 1:
            raise ValueError(f"loc_grid={grid} must be null (flatten the whole map) or >= 1")
        if with_fc and grid is None and input_size is None:
            raise ValueError("TrunkLocalisation flattens its map into the fc layer: give input_size (or a grid)")
        self.flat_map = self.map_size(input_size) if with_fc and grid is None else None
        cells = (grid * grid if grid is not None else self.flat_map[0] * self.flat_map[1]) if with_fc else 0
        # without_fc: a head that reads the map itself (SoftArgmaxHead) uses `feature_map` only
        self.fc = nn.Linear(channels * cells, hidden) if with_fc else None
        self.out_features = hidden if with_fc else channels

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, channels, h, w): the trunk's last map after the 1x1 reduction, every cell in place."""
        if self.downscale > 1:
            x = F.avg_pool2d(x, self.downscale)
        features = self.trunk(x)
        return F.relu(self.reduce(features[-1] if self.cut else features))

    def map_size(self, input_size: int) -> Tuple[int, int]:
        """(h, w) of `feature_map` for a square input of `input_size` (one dry run in eval mode)."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            h, w = self.feature_map(torch.zeros(1, self.trunk_in_chans, input_size, input_size)).shape[-2:]
        self.train(was_training)
        return int(h), int(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc is None:
            raise RuntimeError("TrunkLocalisation(with_fc=False) gives feature_map(x) only")
        feature_map = self.feature_map(x)
        if self.grid is not None:
            feature_map = F.adaptive_avg_pool2d(feature_map, self.grid)
        elif tuple(feature_map.shape[-2:]) != self.flat_map:
            raise ValueError(f"the localisation map is {tuple(feature_map.shape[-2:])}, its fc layer was built for "
                             f"{self.flat_map}: the input does not have the model.input_size it was built for")
        return F.relu(self.fc(feature_map.flatten(1)))


def stage_of_stride(strides: Sequence[int], stride: int, backbone: str) -> int:
    """The index of the feature stage with output stride `stride`; a one-line error naming the ones there are."""
    strides = list(strides)
    if stride not in strides:
        raise ValueError(f"loc_stride={stride}: '{backbone}' has feature maps of stride {', '.join(map(str, strides))}")
    return strides.index(stride)


class MapLocalisation(nn.Module):
    """A 1x1 conv + ReLU over a feature map computed elsewhere (the N x ST-CNN's first stream on the
    whole image, model.extra.loc_features=stream): the map a soft-argmax head scores."""

    def __init__(self, in_channels: int, channels: int = 128):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, channels, 1)
        self.out_features = channels

    def feature_map(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(self.reduce(features))


class ConvLocalisation(nn.Module):
    """Paper A.4 ST-CNN Single: conv[32,5,1,2]-max[2]-conv[32,5,1,2]-fc[32]-fc[32], ReLUs."""

    def __init__(self, in_chans: int, input_size: int, *, channels: int = 32, hidden: Sequence[int] = (32, 32)):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_chans, channels, 5, 1, 2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 5, 1, 2), nn.ReLU(inplace=True))
        self.fcs = FcLocalisation(channels * (input_size // 2) ** 2, hidden)
        self.out_features = self.fcs.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fcs(self.convs(x))


class FcLocalisation(nn.Module):
    """Flatten, then fully connected ReLU layers (paper A.4 ST-CNN Multi: fc[32]-fc[32])."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (32, 32)):
        super().__init__()
        layers, width = [], in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            width = size
        self.layers = nn.Sequential(nn.Flatten(1), *layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
