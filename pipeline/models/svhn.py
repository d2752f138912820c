"""SVHN multi-digit models of paper A.4: the 11-hidden-layer CNN, ST-CNN Single and ST-CNN Multi.

    model = create_model("svhn_st_multi", input_size=64)
    logits = model(x)                      # (B, 3, 64, 64) -> (B, 5, 11): 10 digits + "no digit" per position

CNN: conv[48,5,1,2]-max[2]-conv[64]-conv[128]-max[2]-conv[160]-conv[192]-max[2]-conv[192]-conv[192]-
max[2]-conv[192]-fc[3072]-fc[3072]-fc[3072] (all convs 5x5, stride 1, pad 2, ReLU), then five
parallel fc[11] heads. Pools floor odd sizes (Goodfellow et al.'s 54 px crops work too). ST-CNN Single puts an affine transformer before the first conv (localisation
conv[32,5,1,2]-max[2]-conv[32,5,1,2]-fc[32]-fc[32]); ST-CNN Multi puts one before each of the first
four convs, acting on the feature maps, each with an fc[32]-fc[32] localisation net. Every
transformer starts as the identity. `width` scales all conv and fc widths (tests use small ones).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from .registry import register_model
from .localisation import ConvLocalisation, FcLocalisation
from .multistream import check_input
from .spatial_transformer import SpatialTransformer, warp, window_boxes

# (output channels, 2x2 max pool after it) of the eight conv layers.
CONV_LAYERS = ((48, True), (64, False), (128, True), (160, False), (192, True), (192, False), (192, True), (192, False))
FC_WIDTH = 3072
NUM_DIGITS, NUM_SYMBOLS = 5, 11


class SVHNNet(nn.Module):
    """The CNN; `transformers` = "none" | "single" | "multi" adds the paper's spatial transformers."""
    task = "sequence"

    def __init__(self, *, input_size: int = 64, width: float = 1.0, dropout: float = 0.5,
                 transformers: str = "none", in_chans: int = 3):
        super().__init__()
        pools = sum(pool for _, pool in CONV_LAYERS)
        if input_size < 2 ** pools:
            raise ValueError(f"SVHN input_size={input_size} is smaller than {2 ** pools} (four 2x2 max pools)")
        if transformers not in ("none", "single", "multi"):
            raise ValueError(f"transformers={transformers!r} is not one of none, single, multi")
        self.input_size = input_size
        placed = {"none": 0, "single": 1, "multi": 4}[transformers]
        self.transformers = nn.ModuleDict()
        blocks, channels, size = [], in_chans, input_size
        for index, (out, pool) in enumerate(CONV_LAYERS):
            out = max(1, round(out * width))
            if index < placed:  # the transformer acts on this conv's input, at its size
                loc = (ConvLocalisation(channels, size) if transformers == "single"
                       else FcLocalisation(channels * size * size))
                self.transformers[str(index)] = SpatialTransformer(loc, loc.out_features, "affine", size, scale=1.0)
            # Dropout on every hidden layer but the first (the input layer's features are kept whole).
            layers = [nn.Conv2d(channels, out, 5, 1, 2), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            if index > 0:
                layers.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*layers))
            channels = out
        self.convs = nn.ModuleList(blocks)
        hidden = max(1, round(FC_WIDTH * width))
        self.fcs = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(channels * size * size, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.heads = nn.ModuleList(nn.Linear(hidden, NUM_SYMBOLS) for _ in range(NUM_DIGITS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_size)
        for index, block in enumerate(self.convs):
            if str(index) in self.transformers:
                x = self.transformers[str(index)](x)[0][:, 0]
            x = block(x)
        hidden = self.fcs(x)
        return torch.stack([head(hidden) for head in self.heads], 1)

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        groups = {"localisation": list(self.transformers.parameters()),
                  "backbone": list(self.convs.parameters()) + list(self.fcs.parameters()),
                  "head": list(self.heads.parameters())}
        return {role: params for role, params in groups.items() if params}


class SVHNSTCNN(SVHNNet):
    """SVHNNet with transformers; `attend` shows where each transformer looks in the input image."""

    @property
    def num_streams(self) -> int:
        return len(self.transformers)

    def attend(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """theta (B, N, 6): each transformer's own affine map; boxes and crops in input-image coords.

        Convs (pad 2) and 2x2 pools keep normalised coordinates, so transformer k sees the image
        through the composition A_1 A_2 ... A_k; its box and crop are those of that composition.
        """
        thetas, composed, total = [], [], None
        h = check_input(x, self.input_size)
        for index, block in enumerate(self.convs):
            if str(index) in self.transformers:
                crops, theta = self.transformers[str(index)](h)
                h, matrix = crops[:, 0], theta[:, 0]
                thetas.append(matrix.flatten(1))
                total = matrix if total is None else _compose(total, matrix)
                composed.append(total)
            if index + 1 >= len(self.transformers):
                break
            h = block(h)
        composed_all = torch.stack(composed, 1)
        crops = torch.stack([warp(x, m, "affine", x.shape[-2:]) for m in composed], 1)
        return {"theta": torch.stack(thetas, 1), "boxes": window_boxes(composed_all, "affine"), "crops": crops}


def _compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Affine (B, 2, 3) of `outer` applied after `inner`: p -> outer(inner(p))."""
    return torch.cat([outer[:, :, :2] @ inner[:, :, :2], outer[:, :, :2] @ inner[:, :, 2:] + outer[:, :, 2:]], 2)


@register_model
def svhn_cnn(input_size: int = 64, width: float = 1.0, dropout: float = 0.5) -> nn.Module:
    """Paper A.4 CNN baseline (Goodfellow et al.'s 11 hidden layers)."""
    return SVHNNet(input_size=input_size, width=width, dropout=dropout)


@register_model
def svhn_st_single(input_size: int = 64, width: float = 1.0, dropout: float = 0.5) -> nn.Module:
    """Paper A.4 ST-CNN Single: one affine transformer on the input image."""
    return SVHNSTCNN(input_size=input_size, width=width, dropout=dropout, transformers="single")


@register_model
def svhn_st_multi(input_size: int = 64, width: float = 1.0, dropout: float = 0.5) -> nn.Module:
    """Paper A.4 ST-CNN Multi: affine transformers before each of the first four conv layers."""
    return SVHNSTCNN(input_size=input_size, width=width, dropout=dropout, transformers="multi")
