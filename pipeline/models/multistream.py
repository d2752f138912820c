"""N x ST-CNN for fine-grained classification (paper A.5) and its backbone-only baseline.

    model = create_model("nxst_cnn", backbone="inception_v3", num_streams=2, input_size=448)
    logits = model(x)                      # x: normalised (B, 3, 448, 448) -> (B, 200)
    seen = model.attend(x)                 # {"theta": (B, N, 2), "boxes": (B, N, 4), "crops": (B, N, 3, 224, 224)}

One localisation network (a timm trunk on the 2x-downscaled input when the input is 448) predicts
the windows of all N transformers; each transformer samples a `crop_size` crop from the
full-resolution input (all N in one `grid_sample` call) and feeds its own timm stream; the pooled
stream features are concatenated, dropped out and classified by one linear layer.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_prep.transform_kinds import transform_kind

from .registry import register_model
from .localisation import MapLocalisation, TrunkLocalisation, create_timm, stage_of_stride
from .spatial_transformer import FD_DIRECTIONS, SpatialTransformer, finite_difference_theta


class NxSTCNN(nn.Module):
    task = "classification"

    def __init__(self, backbone: str = "inception_v3", *, loc_backbone: Optional[str] = None, num_streams: int = 2,
                 input_size: int = 448, crop_size: int = 224, transform: str = "translation",
                 transform_scale: float = 0.5, num_classes: int = 200, dropout: float = 0.7,
                 pretrained: Any = None, loc_pretrained: Any = "same", bound: Optional[str] = "auto",
                 num_control_points: int = 16, loc_grid: Optional[int] = None, stream_mode: str = "loop",
                 padding_mode: str = "zeros", loc_downscale: Optional[int] = None,
                 window_gradient: str = "sampler", fd_step: float = 0.125, fd_objective: str = "loss",
                 fd_directions: str = "random",
                 loc_head: str = "linear",
                 loc_spread: float = 1.0, loc_sharpness: float = 1.0, loc_stride: Optional[int] = None,
                 loc_features: str = "own", loc_calibrate: bool = False):
        super().__init__()
        if window_gradient not in ("sampler", "finite_difference"):
            raise ValueError(f"window_gradient={window_gradient!r} is not one of sampler, finite_difference")
        if not fd_step > 0:
            raise ValueError(f"fd_step={fd_step} must be > 0")
        if fd_objective not in ("loss", "margin"):
            raise ValueError(f"fd_objective={fd_objective!r} is not one of loss, margin")
        if fd_directions not in FD_DIRECTIONS:
            raise ValueError(f"fd_directions={fd_directions!r} is not one of {', '.join(FD_DIRECTIONS)}")
        self.window_gradient, self.fd_step, self.fd_objective = window_gradient, float(fd_step), fd_objective
        self.fd_directions = fd_directions
        if stream_mode not in ("loop", "vmap"):
            raise ValueError(f"stream_mode={stream_mode!r} is not one of loop, vmap")
        if num_streams < 1:
            raise ValueError(f"NxSTCNN needs num_streams >= 1, got {num_streams} (0 is the baseline: cub_baseline)")
        if crop_size > input_size:
            raise ValueError(f"crop_size={crop_size} is larger than input_size={input_size}")
        self.num_streams, self.input_size, self.crop_size = num_streams, input_size, crop_size
        self.stream_mode = stream_mode
        if loc_pretrained == "same":
            if isinstance(pretrained, str) and loc_backbone not in (None, backbone):
                raise ValueError(f"model.pretrained={pretrained!r} is a weights file for '{backbone}', not for "
                                 f"loc_backbone '{loc_backbone}'; set model.extra.loc_pretrained")
            loc_pretrained = pretrained
        if bound == "auto":  # keep window centres inside the image where the kind allows it
            bound = "tanh" if transform_kind(transform).window and transform_scale < 1 else None
        # A fixed downscale so the localisation trunk sees about crop_size pixels (paper: 448 -> 224).
        downscale = max(1, round(input_size / crop_size)) if loc_downscale is None else int(loc_downscale)
        if downscale < 1:
            raise ValueError(f"loc_downscale={loc_downscale} must be >= 1")
        if loc_head not in ("linear", "softargmax"):
            raise ValueError(f"loc_head={loc_head!r} is not one of linear, softargmax")
        soft = loc_head == "softargmax"
        if soft and not transform_kind(transform).fixed_scale:
            raise ValueError(f"loc_head='softargmax' predicts translation windows, not transform '{transform}'")
        if loc_features not in ("own", "stream"):
            raise ValueError(f"loc_features={loc_features!r} is not one of own, stream")
        if loc_features == "stream" and not soft:
            raise ValueError("loc_features='stream' needs loc_head='softargmax' (it reads the stream's map)")
        self.streams = nn.ModuleList(create_timm(backbone, pretrained, num_classes=0) for _ in range(num_streams))
        self.loc_features, self.loc_downscale = loc_features, downscale
        self.loc_levels: Optional[List[int]] = None
        if loc_features == "stream" and loc_stride is not None:
            # a finer map: the stream's stage of that stride, its last map upsampled and stacked on it
            strides = [info["reduction"] for info in self.streams[0].feature_info]
            self.loc_levels = [stage_of_stride(strides, loc_stride, backbone), len(strides) - 1]
        if loc_features == "stream":
            probe = self._loc_input(torch.zeros(1, 3, input_size, input_size))  # the map's channels and size
            localisation, map_size = MapLocalisation(probe.shape[1]), tuple(probe.shape[-2:])
        else:
            localisation = TrunkLocalisation(loc_backbone or backbone, downscale=downscale, grid=loc_grid,
                                             input_size=input_size,
                                             pretrained=loc_pretrained, with_fc=not soft, stride=loc_stride)
            map_size = localisation.map_size(input_size) if soft else None
        self.transformer = SpatialTransformer(
            localisation, localisation.out_features, transform, crop_size, num_transforms=num_streams,
            scale=transform_scale, bound=None if soft else bound, num_control_points=num_control_points,
            padding_mode=padding_mode, head=loc_head, spread=loc_spread, sharpness=loc_sharpness,
            map_size=map_size, calibrate=loc_calibrate)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(sum(s.num_features for s in self.streams), num_classes)

    @property
    def wants_targets(self) -> bool:
        """Training passes `targets` to forward: the finite-difference window gradient needs the loss."""
        return self.window_gradient == "finite_difference"

    def _loc_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the localisation net reads: the image, or (loc_features=stream) the first stream's
        feature map of the whole image, without gradient and with its batch-norm statistics left alone:
        the stream's weights learn from classification only."""
        if self.loc_features == "own":
            return x
        stream = self.streams[0]
        was_training = stream.training
        with torch.no_grad():
            stream.eval()
            image = F.avg_pool2d(x, self.loc_downscale) if self.loc_downscale > 1 else x
            if self.loc_levels is None:
                features = stream.forward_features(image)
            else:
                fine, coarse = stream.forward_intermediates(image, indices=self.loc_levels, intermediates_only=True)
                features = torch.cat([fine, F.interpolate(coarse, size=fine.shape[-2:], mode="nearest")], 1)
            stream.train(was_training)
        return features

    def predict_windows(self, x: torch.Tensor) -> torch.Tensor:
        """The transform parameters (B, N, ...) the localisation net predicts for the images `x`."""
        return self.transformer.predict(self._loc_input(x))

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_input(x, self.input_size)
        if targets is None or not self.training or not self.wants_targets:
            crops, _ = self.transformer(x, loc_input=self._loc_input(x))
            return self.classify(crops)
        st = self.transformer
        room = st.window_room()

        def losses_at(theta: torch.Tensor) -> torch.Tensor:
            if room is not None:  # the perturbed windows stay within the bound, as predicted ones do
                theta = theta.clamp(-room, room)
            logits = self.classify(st.sample(x, theta)).float()
            if self.fd_objective == "margin":
                return negative_margin(logits, targets)
            return F.cross_entropy(logits, targets, reduction="none")

        theta = finite_difference_theta(self.predict_windows(x), losses_at, self.fd_step, self.fd_directions)
        return self.classify(st.sample(x, theta))

    def classify(self, crops: torch.Tensor) -> torch.Tensor:
        """Logits from the N crops (B, N, C, h, w)."""
        if self.stream_mode == "vmap":
            features = self._streams_vmapped(crops)
        else:
            features = torch.cat([stream(crops[:, i]) for i, stream in enumerate(self.streams)], 1)
        return self.classifier(self.dropout(features))

    def _streams_vmapped(self, crops: torch.Tensor) -> torch.Tensor:
        """All N streams as one batched call (`torch.func.vmap` over stacked weights): (B, N * features).

        The weights are stacked on the fly, so parameters, state_dict and checkpoints are those of
        the loop; batch-norm running statistics are updated on the stack and copied back in one
        foreach call. Convolutions become grouped convolutions over the N streams.
        """
        if self.training and any(isinstance(m, nn.SyncBatchNorm) for m in self.streams[0].modules()):
            raise ValueError("model.extra.stream_mode='vmap' cannot run SyncBatchNorm (train.sync_bn=true): "
                             "its all-reduce does not batch over streams; use stream_mode='loop'")
        per_param = [dict(s.named_parameters()) for s in self.streams]
        per_buffer = [dict(s.named_buffers()) for s in self.streams]
        params = {name: torch.stack([p[name] for p in per_param]) for name in per_param[0]}
        buffers = {name: torch.stack([b[name] for b in per_buffer]) for name in per_buffer[0]}
        template = self.streams[0]  # only its structure is used: functional_call swaps in the weights

        def one_stream(p, b, x):
            return torch.func.functional_call(template, (p, b), (x,))

        features = torch.func.vmap(one_stream, in_dims=(0, 0, 1), out_dims=1, randomness="different")(
            params, buffers, crops)
        if self.training and buffers:
            with torch.no_grad():
                torch._foreach_copy_([b[name] for b in per_buffer for name in buffers],
                                     [stacked[i] for i in range(self.num_streams) for stacked in buffers.values()])
        return features.flatten(1)

    def attend(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = check_input(x, self.input_size)
        crops, theta = self.transformer(x, loc_input=self._loc_input(x))
        return {"theta": theta.flatten(2), "boxes": self.transformer.boxes(theta), "crops": crops}

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"localisation": list(self.transformer.parameters()),
                "streams": list(self.streams.parameters()),
                "head": list(self.classifier.parameters())}


def negative_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample, the best other class's logit minus the true class's: how far the true class leads, negated."""
    true = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], float("-inf")).amax(1)
    return others - true


class BackboneClassifier(nn.Module):
    """A timm backbone, dropout and a linear classifier (the paper's CNN baseline).

    With `resize_to` smaller than the input, the input is first resized to it (antialiased), so a
    448 px data pipeline can feed the 224 px baseline.
    """
    task = "classification"
    num_streams = 0

    def __init__(self, backbone: str, *, num_classes: int = 200, dropout: float = 0.7, pretrained: Any = None,
                 input_size: int = 224, resize_to: Optional[int] = None):
        super().__init__()
        self.input_size = input_size
        self.resize_to = resize_to if resize_to and resize_to != input_size else None
        self.backbone = create_timm(backbone, pretrained, num_classes=0)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_size)
        if self.resize_to:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.classifier(self.dropout(self.backbone(x)))

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"backbone": list(self.backbone.parameters()), "head": list(self.classifier.parameters())}


def check_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """x itself, or a ValueError when it is not (B, C, size, size): the window geometry and the
    localisation downscale are set for model.input_size."""
    if x.dim() != 4 or x.shape[-2] != size or x.shape[-1] != size:
        raise ValueError(f"input of shape {tuple(x.shape)} does not match model.input_size={size}: "
                         f"expected (B, C, {size}, {size})")
    return x


@register_model
def nxst_cnn(backbone: str = "inception_v3", loc_backbone: Optional[str] = None, num_streams: int = 2,
             input_size: int = 448, crop_size: int = 224, transform: str = "translation",
             transform_scale: float = 0.5, num_classes: int = 200, dropout: float = 0.7,
             pretrained: Any = None, **kwargs: Any) -> nn.Module:
    """Paper A.5 N x ST-CNN; `num_streams=0` is the bare backbone at `crop_size` (input resized).

    Extra keyword arguments (model.extra): `loc_pretrained` (weights of a different loc_backbone),
    `bound` ("auto" = "tanh": window centres inside the image | None: unbounded, the paper's |
    "tanh_inside": windows inside the image from the inset tiling, the layout of checkpoints written
    before the quadrant start), `num_control_points` (tps), `loc_grid` (null: the localisation fc reads the trunk's
    whole map flattened, as the paper; k: the map average-pooled to k x k first), `stream_mode` ("loop": one stream after another;
    "vmap": all streams in one batched call, same results, for launch-bound GPU steps),
    `window_gradient` ("sampler": backpropagation through the sampler, the paper's;
    "finite_difference": the window parameters learn from a finite-difference slope of the training
    loss over `fd_step`, default 0.125 = 8 px of a 128 px input; see `finite_difference_theta`; for
    class details too fine for the sampler's gradient; `fd_objective`: "loss", the training loss, or
    "margin", how far the true class's logit leads the best other one, which keeps pointing to a
    better view after the cross-entropy has saturated on a partial one; `fd_directions`: "random", one
    random direction per window and step (2 extra forward passes), or "axes", each axis of every window
    (4 for translation windows: a full, less noisy slope), `loc_downscale` (the localisation trunk's
    input is the input average-pooled by this factor; default input_size / crop_size, the paper's
    448 -> 224), `loc_head` ("linear": the paper's fc regression from the pooled map; "softargmax":
    translation windows at the softmax-weighted mean of the map's cells, scored by one 1x1 conv,
    see `SoftArgmaxHead`; `loc_spread`: its starting prior's width in cells; `loc_sharpness`: a
    factor on its scores, which lets the softmax peak sooner; `loc_calibrate`: a learnt gain and offset
    per window and axis on its expected place), `loc_stride` (the
    localisation map's stride, e.g. 16: the trunk stops at that stage, a finer map than its last;
    with loc_features=stream: that stage of the stream, its last map upsampled and stacked on it),
    `loc_features` ("own": a localisation trunk of its own; "stream": the soft-argmax head reads the
    first stream's feature map of the whole image, which the streams learn from classification,
    so the windows go where the features of the class are; no gradient flows back through it),
    `padding_mode` of the sampler ("zeros": outside the image reads 0, which on a normalised
    input is the mean colour; "border" repeats the edge; a tanh-bounded window keeps its centre in the
    image and may reach half outside it, a soft-argmax window stays inside).
    """
    if num_streams == 0:
        return BackboneClassifier(backbone, num_classes=num_classes, dropout=dropout, pretrained=pretrained,
                                  input_size=input_size, resize_to=crop_size)
    return NxSTCNN(backbone, loc_backbone=loc_backbone, num_streams=num_streams, input_size=input_size,
                   crop_size=crop_size, transform=transform, transform_scale=transform_scale,
                   num_classes=num_classes, dropout=dropout, pretrained=pretrained, **kwargs)


@register_model
def cub_baseline(backbone: str = "inception_v3", input_size: int = 224, num_classes: int = 200,
                 dropout: float = 0.7, pretrained: Any = None) -> nn.Module:
    """The backbone alone on the whole image at `input_size` (paper A.5's CNN baseline)."""
    return BackboneClassifier(backbone, num_classes=num_classes, dropout=dropout, pretrained=pretrained,
                              input_size=input_size)
