"""Co-localisation (paper A.2, Table 5): an attention transformer that finds the common object.

    model = create_model("digits_coloc_st", feature_checkpoint="runs/feature_cnn/checkpoints/last.pt")
    losses = model(images)               # (B,) each image's triplet hinge; images (B, 1, 84, 84) in [0, 1]
    model.attend(images)["boxes"]        # (B, 1, 4) the crop in [-1, 1] input coordinates

The transformer is the paper's: an `attention` transform (scale and translation, 3 parameters)
from a localisation net of 8 9x9 conv filters at stride 4, 2x2 max-pooling, FC 8, FC 8, FC 3
(`localisation_net`: 5,947 parameters on 84 px inputs with the head; the paper's "~100k" is not
what these layers hold, see docs/experiments.md), sampling a 28x28 crop. It starts as a centred
28x28 crop (s = 28/84) and is bounded (`bound="tanh_inside"`): s in (0, 1), the crop inside the
image (a crop of the zero padding would be one more blank crop), as r(I_n)'s windows are.

The loss (A.2) needs no labels and no boxes: with e() a frozen feature network, for image n, the
crop T(I_n), another image's crop T(I_m) (m: the batch rolled by one) and a random crop r(I_n)
of the same size from image n (`negative_scale`: of that fixed share of the image side instead),
    L_n = max(0, ||e(T I_n) - e(T I_m)||^2 - ||e(T I_n) - e(r I_n)||^2 + margin),
so the crops of all images come to look alike and unlike the rest of their own image. `forward`
returns L_n per image (the trainer's `colocalisation` task takes their mean); the random crops
draw from torch's global generator, which the trainer seeds.

e() is the Table 1 CNN (`digits_cnn`, 28x28 inputs) of the checkpoint `feature_checkpoint` (a
trainer checkpoint; its config says how to build it), frozen and kept in eval mode; its three
layers' outputs (the first and second conv blocks and the logits), flattened and concatenated, are
the embedding. `feature_checkpoint="random"` builds a randomly initialised one (tests only). The
checkpoint is read when the model is built; a co-localisation checkpoint carries the feature
network's weights too.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_prep.transform_kinds import TRANSFORM_KINDS, transform_kind, window_kinds

from .digits import digits_cnn
from .registry import register_model
from .spatial_transformer import SpatialTransformer

MARGIN = 1.0  # paper A.2


def localisation_net(input_size: int) -> nn.Sequential:
    """Paper A.2: conv 8 filters 9x9 stride 4, max-pool 2x2, FC 8, FC 8 (the FC 3 is the transformer's head)."""
    side = ((input_size - 9) // 4 + 1) // 2
    if side < 1:
        raise ValueError(f"input_size={input_size} is too small for the co-localisation localisation net; "
                         "expected at least 17")
    return nn.Sequential(nn.Conv2d(1, 8, 9, stride=4), nn.MaxPool2d(2), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(8 * side * side, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True))


def triplet_hinge(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                  margin: float = MARGIN) -> torch.Tensor:
    """(B,) max(0, ||a - p||^2 - ||a - n||^2 + margin) of (B, D) embeddings."""
    return torch.relu((anchor - positive).pow(2).sum(-1) - (anchor - negative).pow(2).sum(-1) + margin)


def random_windows(scale: torch.Tensor) -> torch.Tensor:
    """(B, 3) attention thetas (s, tx, ty) of windows of the sides `scale` (B,), placed uniformly inside the image."""
    centre = (torch.rand(len(scale), 2, device=scale.device, dtype=scale.dtype) * 2 - 1) * (1.0 - scale[:, None])
    return torch.cat([scale[:, None], centre], 1)


class FeatureNet(nn.Module):
    """Frozen digits CNN -> the flattened outputs of its two conv blocks and its logits, concatenated."""

    def __init__(self, cnn: nn.Module, normalize: bool = True):
        super().__init__()
        self.cnn = cnn.requires_grad_(False).eval()
        self.normalize = normalize

    def train(self, mode: bool = True) -> "FeatureNet":
        return super().train(False)  # frozen: always the evaluation behaviour

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        layers, x = [], crops
        for layer in self.cnn.features:
            x = layer(x)
            if isinstance(layer, nn.ReLU):  # the end of each conv block
                layers.append(x.flatten(1))
        layers.append(self.cnn.head(x))
        if self.normalize:  # each layer a unit vector: every layer counts alike, whatever its size and scale
            layers = [F.normalize(layer, dim=1) for layer in layers]
        return torch.cat(layers, 1)


class CoLocaliser(nn.Module):
    task = "colocalisation"
    num_streams = 1

    def __init__(self, transformer: SpatialTransformer, features: FeatureNet, margin: float = MARGIN,
                 negative_scale: Optional[float] = None):
        super().__init__()
        self.transformer, self.features, self.margin = transformer, features, float(margin)
        self.negative_scale = negative_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        crops, theta = self.transformer(x)
        anchor = self.features(crops[:, 0])
        # r(I_n): the size of T(I_n)'s window (or negative_scale), anywhere in the image; no gradient flows through it
        kind = self.transformer.transform_kind
        if self.negative_scale is None:
            scale = kind.scale_of(theta[:, 0].detach(), self.transformer.scale)
        else:
            scale = theta.new_full((len(theta),), self.negative_scale)
        random_crops = self.transformer.sample(x, kind.from_windows(random_windows(scale))[:, None])
        negative = self.features(random_crops[:, 0])
        return triplet_hinge(anchor, anchor.roll(1, 0), negative, self.margin)

    @torch.no_grad()
    def attend(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """theta (B, 1, 3), boxes (B, 1, 4) [x0, y0, x1, y1] in input coordinates [-1, 1], crops (B, 1, 1, 28, 28)."""
        crops, theta = self.transformer(x)
        return {"theta": theta, "boxes": self.transformer.boxes(theta), "crops": crops}

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"localisation": list(self.transformer.parameters())}


def load_feature_cnn(path: Optional[str]) -> nn.Module:
    """The digits CNN of a trainer checkpoint (its own config builds it); "random": a random one (tests)."""
    if path is None:
        raise ValueError("model digits_coloc_st needs model.extra.feature_checkpoint: a digits_cnn checkpoint at "
                         "28 px (python -m pipeline.experiments coloc trains one), or 'random' for tests")
    if path == "random":
        return digits_cnn(input_size=28)
    from pipeline.config import from_dict
    from pipeline.train.checkpoint import load_weights, read

    checkpoint = read(path)
    cfg = from_dict(checkpoint.config, str(path)).model
    if cfg.name != "digits_cnn" or cfg.input_size != 28:
        raise ValueError(f"model.extra.feature_checkpoint={path} holds model {cfg.name} at {cfg.input_size} px; "
                         "expected digits_cnn at 28 px")
    cnn = digits_cnn(input_size=cfg.input_size, num_classes=cfg.num_classes, **cfg.extra)
    load_weights(cnn, checkpoint.model, path, cfg.name)
    return cnn


@register_model
def digits_coloc_st(input_size: int = 84, crop_size: int = 28, transform: str = "attention",
                    feature_checkpoint: Optional[str] = None, margin: float = MARGIN, normalize_features: bool = True,
                    init_scale: Optional[float] = None, negative_scale: Optional[float] = None) -> CoLocaliser:
    if transform not in TRANSFORM_KINDS or not transform_kind(transform).window:
        raise ValueError(f"model.extra.transform={transform!r}: expected a window kind: {window_kinds()}")
    for key, value in (("init_scale", init_scale), ("negative_scale", negative_scale)):
        if value is not None and not 0 < value < 1:
            raise ValueError(f"model.extra.{key}={value}: expected a share of the image side in (0, 1)")
    transformer = SpatialTransformer(localisation_net(input_size), 8, transform, crop_size, num_transforms=1,
                                     scale=init_scale or crop_size / input_size, bound="tanh_inside")
    return CoLocaliser(transformer, FeatureNet(load_feature_cnn(feature_checkpoint), normalize_features), margin,
                       negative_scale)
