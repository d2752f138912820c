"""Spatial-transformer core: `warp` (from `data_prep.warp`, shared with the digit distortions), and the `SpatialTransformer` module.

    crops = warp(x, theta, "translation", 224, scale=0.5)           # (B, C, 224, 224)
    crops = warp_many(x, theta_bn, "translation", 224)                # (B, N, C, 224, 224)
    st = SpatialTransformer(loc_net, 128, "translation", 224, num_transforms=2, bound="tanh")

Coordinates are normalised to [-1, 1] as in `F.affine_grid(align_corners=False)`: (-1, -1) is
the top-left corner of the image, x runs along the width. `theta` maps *output* coordinates to
*input* coordinates (the sampling grid), for these kinds (each one class in `data_prep.transform_kinds`,
which owns its theta shape, identity and tiling start, grid, boxes and bound; the functions here ask it):

| kind          | theta         | meaning                                                          |
|---------------|---------------|------------------------------------------------------------------|
| `affine`      | (B, 2, 3)     | as `F.affine_grid`                                               |
| `attention`   | (B, 3)        | (s, tx, ty): affine [[s, 0, tx], [0, s, ty]]                     |
| `translation` | (B, 2)        | (tx, ty): attention with the fixed scale `scale=`                |
| `projective`  | (B, 3, 3)     | homography on homogeneous output coords, then divide by the last |
| `tps`         | (B, K, 2)     | source positions of K control points whose output positions form |
|               |               | a regular sqrt(K) x sqrt(K) grid on [-1, 1]^2; U(r) = r^2 log r^2 |

Identity parameters (`identity_theta`) return the input unchanged when the output size equals
the input size (for `translation`, at `scale=1`). Sampling always runs in float32 (float64 for
float64 inputs), also under autocast: a bf16 grid coordinate is off by up to 1/128 of the
normalised range, about 2 px at 448 px. `grid_sample`'s CUDA backward uses atomic adds and is not
deterministic.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_prep.transform_kinds import TRANSFORM_KINDS, bound_room, transform_kind, window_kinds

from data_prep.warp import (Size, _linspace, _pair, _work_dtype, base_grid, control_points,  # noqa: F401 (this
                            sampling_grid, tps_weights, warp)  # module's interface: the models' home of the warp)

KINDS = TRANSFORM_KINDS.names()  # the built-in kinds (a kind registered later is in TRANSFORM_KINDS only)


# ----------------------------------------------------------------------------- parameters

def num_params(kind: str, num_control_points: int = 16) -> int:
    """Number of scalars in one transform's theta."""
    return transform_kind(kind).num_params(num_control_points)


def theta_shape(kind: str, num_control_points: int = 16) -> Tuple[int, ...]:
    """Shape of one transform's theta (without the batch dimension)."""
    return transform_kind(kind).theta_shape(num_control_points)


def identity_theta(kind: str, batch: int, K: int = 16, *, device=None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Parameters of the identity transform, (batch, *theta_shape(kind, K)); `translation` is
    (0, 0), the identity only for `warp(..., scale=1)`."""
    return window_theta(kind, torch.tensor([[1.0, 0.0, 0.0]], dtype=dtype, device=device), K).expand(
        batch, *theta_shape(kind, K)).clone()


def window_theta(kind: str, windows: torch.Tensor, K: int = 16) -> torch.Tensor:
    """Theta of each kind for axis-aligned square windows (..., 3) = (s, tx, ty).

    For `translation` the scale column is dropped (its scale is fixed by `warp(scale=)`).
    """
    return transform_kind(kind).from_windows(windows, K)


def theta_to_affine(theta: torch.Tensor, kind: str, scale: float = 0.5) -> torch.Tensor:
    """(..., 2, 3) affine matrix of an `affine`, `attention` or `translation` theta."""
    return transform_kind(kind).to_affine(theta, scale)


def warp_many(x: torch.Tensor, theta: torch.Tensor, kind: str, out_size: Size, *, scale: float = 0.5,
              align_corners: bool = False, padding_mode: str = "zeros",
              tps_basis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """N crops per image in one `grid_sample` call: theta (B, N, ...) -> (B, N, C, h, w).

    The N grids are stacked along the output height, so the input is read in place instead of
    being expanded to N copies (at 448 px and N = 4 that copy is most of the sampler's memory).
    The result is a strided view of the (B, C, N*h, w) sample; `crops[:, i]` is stream i's input.
    """
    if x.dim() != 4 or theta.dim() < 2 or theta.shape[0] != x.shape[0]:
        raise ValueError(f"warp_many: expected x (B, C, H, W) and theta (B, N, ...), got x "
                         f"{tuple(x.shape)} and theta {tuple(theta.shape)}")
    batch, n = theta.shape[:2]
    h, w = _pair(out_size)
    work = _work_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        grid = sampling_grid(theta.to(work).flatten(0, 1), kind, (h, w), scale=scale, align_corners=align_corners,
                             tps_basis=tps_basis)
        grid = grid.reshape(batch, n * h, w, 2)
        out = F.grid_sample(x.to(work), grid, mode="bilinear", padding_mode=padding_mode,
                            align_corners=align_corners)
    return out.to(x.dtype).unflatten(2, (n, h)).transpose(1, 2)


def window_boxes(theta: torch.Tensor, kind: str, scale: float = 0.5) -> torch.Tensor:
    """Bounding boxes (..., 4) = [x0, y0, x1, y1] in input coords [-1, 1] of the warped output square.

    Works for any leading shape of theta (e.g. (B, N, 3) -> (B, N, 4)). For `tps` the box is that of
    the warped border sampled at 33 points per side.
    """
    spec = transform_kind(kind)
    lead = theta.shape[:theta.dim() - len(spec.theta_shape(spec.control_points_in(theta)))]
    flat = theta.reshape(-1, *theta.shape[len(lead):])
    return spec.boxes(flat, scale).reshape(*lead, 4)


# ----------------------------------------------------------------------------- gradient estimate

class _GradientFrom(torch.autograd.Function):
    """Identity forward; backward hands back a fixed gradient instead of the incoming one."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gradient)
        return theta.view_as(theta)

    @staticmethod
    def backward(ctx, _incoming: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return gradient, None


FD_DIRECTIONS = ("random", "axes")  # how finite_difference_theta probes the loss around a window


def finite_difference_theta(theta: torch.Tensor, losses_at, step: float, directions: str = "random") -> torch.Tensor:
    """`theta` whose backward pass carries a finite-difference slope of the loss, not the sampler's gradient.

    `losses_at(theta)` returns per-sample losses (B,) for transform parameters (B, N, ...).
    directions="random": per sample and transform, one random unit direction e over its parameters:
    slope = (L(theta + step e) - L(theta - step e)) / (2 step), gradient = slope * e / B (the batch
    loss is a mean; E[e e^T] = I / n, so the estimate is the loss's gradient over n, smoothed over
    `step`); two extra forward passes, no backward. directions="axes": one such pair of passes per
    parameter (2n passes), each moving every transform along that axis with a random sign (the
    signs keep one transform's effect on the sample's loss out of the others' estimates on
    average): the estimate is the whole smoothed gradient, with less noise per step.
    Why: where the class detail is a fine texture, the sampler's pointwise gradient is dominated by
    the texture's phase and carries little sign of where the detail is, while the loss over a few
    pixels of window movement is smooth (`python -m pipeline.experiments window-gradient` measures both).
    """
    if directions not in FD_DIRECTIONS:
        raise ValueError(f"finite-difference directions={directions!r} is not one of {', '.join(FD_DIRECTIONS)}")
    with torch.no_grad():
        flat = theta.detach().flatten(2)
        if directions == "random":
            direction = torch.randn_like(flat)
            probes = [direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-12)]
        else:
            probes = []
            for axis in range(flat.shape[-1]):
                direction = torch.zeros_like(flat)
                direction[..., axis] = torch.randint_like(flat[..., axis], 0, 2) * 2.0 - 1.0
                probes.append(direction)
        gradient = torch.zeros_like(flat, dtype=torch.float32)
        for direction in probes:
            up = losses_at((flat + step * direction).reshape(theta.shape))
            down = losses_at((flat - step * direction).reshape(theta.shape))
            slope = (up - down).float() / (2.0 * step)
            gradient += slope[:, None, None] * direction / len(slope)
    return _GradientFrom.apply(theta, gradient.reshape(theta.shape).to(theta.dtype))


# ----------------------------------------------------------------------------- module

def tiling_windows(num: int, scale: float, *, inset: bool = False) -> torch.Tensor:
    """(num, 3) initial windows (s, tx, ty) that tile the image plane (paper A.5).

    The plane is cut into rows x cols cells (N=2: left | right; N=4: 2 x 2; N=3: a row of three)
    and window i is centred on cell i's centre: 4 windows of scale 0.5 are exactly the quadrants
    (centres +-0.5), 2 are the left and right halves of the middle band. A window wider than its
    cell (N=3 at 0.5) is moved in only as far as keeps it inside the image (|t| <= 1 - s).
    `inset=True` gives the older layout, centres pulled in by (1 - s) towards the middle (4 at
    0.5: centres +-0.25, overlapping windows over the central 75 %), which `SoftArgmaxHead`
    still starts from.
    """
    if num < 1:
        raise ValueError(f"need at least one transform, got num={num}")
    rows = math.isqrt(num)
    while num % rows:
        rows -= 1
    cols = num // rows
    cy, cx = torch.meshgrid(_linspace(rows, False, torch.float64, None),
                            _linspace(cols, False, torch.float64, None), indexing="ij")
    centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], -1)
    room = max(1.0 - scale, 0.0)
    centres = centres * room if inset else centres.clamp(-room, room)
    return torch.cat([torch.full((num, 1), float(scale), dtype=torch.float64), centres], 1)


class SoftArgmaxHead(nn.Module):
    """Translation windows at the expected place of a softmax over the cells of a feature map.

    A 1x1 conv scores every cell of the localisation map, one score map per window; a window's
    centre is the softmax-weighted mean of the cell centres, pulled in by (1 - scale) so that
    every window lies inside the image without a bound. The score is one function of the features,
    applied at every cell: what the net learns to find in one place it finds everywhere, where a
    fully connected head has to learn each place on its own. The cells are spread over every place
    a window can take, corner cells at the image's corners. A learnt prior per window and cell, a
    Gaussian of `spread` cells around the window's tiling centre, starts the windows near the
    tiling while leaving weight on every cell, so a window can be drawn anywhere from the start.
    """

    def __init__(self, channels: int, map_size: Tuple[int, int], num_windows: int, scale: float,
                 spread: float = 1.0, sharpness: float = 1.0, calibrate: bool = False):
        super().__init__()
        if not 0.0 < scale < 1.0:
            raise ValueError(f"the soft-argmax head needs a window scale in (0, 1), got scale={scale}")
        if not spread > 0:
            raise ValueError(f"soft-argmax spread={spread} must be > 0 (cells)")
        h, w = map_size
        if min(h, w) < 2:
            raise ValueError(f"the soft-argmax head needs a localisation map of at least 2 x 2 cells to choose "
                             f"among, got {h} x {w}: give the localisation net a larger input (loc_downscale)")
        if not sharpness > 0:
            raise ValueError(f"soft-argmax sharpness={sharpness} must be > 0")
        self.sharpness = float(sharpness)
        self.score = nn.Conv2d(channels, num_windows, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        # The corner cells stand for the windows at the image's corners: the map spans every place a
        # window can take (cell centres scaled by 1 - s would keep windows off the borders).
        cy, cx = torch.meshgrid(_linspace(h, True, torch.float64, None), _linspace(w, True, torch.float64, None),
                                indexing="ij")
        cells = torch.stack([cx.reshape(-1), cy.reshape(-1)], -1) * (1.0 - scale)  # (h*w, 2), x then y
        # the start of the demo's runs (docs/experiments.md): the inset tiling, not the quadrants
        start = tiling_windows(num_windows, scale, inset=True)[:, 1:]  # (N, 2)
        cell_side = 2.0 * (1.0 - scale) / max(max(h, w) - 1, 1)
        distance2 = ((cells[None] - start[:, None]) ** 2).sum(-1) / cell_side ** 2
        self.register_buffer("cells", cells.float())
        self.prior = nn.Parameter((-0.5 * distance2 / spread ** 2).float())  # (N, h*w)
        self.room = 1.0 - scale
        # calibrate: a learnt gain (as its log: weight decay pulls it to 1) and offset per window and
        # axis on the expected place. A softmax over a coarse map shrinks the centres towards the
        # middle and cannot move them by a fixed amount (the crown above the body's features).
        self.log_gain = nn.Parameter(torch.zeros(num_windows, 2)) if calibrate else None
        self.offset = nn.Parameter(torch.zeros(num_windows, 2)) if calibrate else None

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) window centres from the map (B, C, h, w)."""
        logits = self.sharpness * self.score(feature_map).flatten(2) + self.prior
        return self._calibrated(torch.softmax(logits, -1) @ self.cells)

    def initial_centres(self) -> torch.Tensor:
        """(N, 2): where the windows start (for any input: the scores start at zero)."""
        with torch.no_grad():
            return self._calibrated(torch.softmax(self.prior, -1) @ self.cells)

    def _calibrated(self, centres: torch.Tensor) -> torch.Tensor:
        if self.log_gain is None:
            return centres
        return (centres * self.log_gain.exp() + self.offset).clamp(-self.room, self.room)


class SpatialTransformer(nn.Module):
    """Localisation net -> parameter head -> `warp`, for N transforms predicted by one localisation net.

    `localisation` maps the localisation input to (B, features). The head is a linear layer with
    zero weights whose bias encodes the initial transforms: the identity for one transform with
    `scale=1`, otherwise windows of side `scale` that tile the image (`tiling_windows`).
    `bound="tanh"` keeps a `translation` window's centre inside the image (|t| < 1; at scale 0.5 a
    window may reach half outside, into the padding) and, for `attention`, keeps s in (0, 1) and
    the centre inside the image: a window cannot wander off the image, and the tiling start
    (|t| <= 1 - s) lies strictly inside the bound, where the tanh's slope is not zero.
    `bound="tanh_inside"` is the earlier layout, for checkpoints written before the quadrant start: windows kept inside
    the image (|t| < 1 - s) starting on the inset tiling (`tiling_windows(inset=True)`).
    """

    def __init__(self, localisation: nn.Module, features: int, kind: str, out_size: Size, *,
                 num_transforms: int = 1, scale: float = 0.5, num_control_points: int = 16,
                 bound: Optional[str] = None, align_corners: bool = False, padding_mode: str = "zeros",
                 head: str = "linear", map_size: Optional[Tuple[int, int]] = None, spread: float = 1.0,
                 sharpness: float = 1.0, calibrate: bool = False):
        super().__init__()
        spec = transform_kind(kind)
        if head not in ("linear", "softargmax"):
            raise ValueError(f"head={head!r} is not one of linear, softargmax")
        if head == "softargmax" and (not spec.fixed_scale or bound is not None or map_size is None):
            fixed = ", ".join(k.name for k in TRANSFORM_KINDS if k.fixed_scale)
            raise ValueError("the softargmax head predicts window centres from a feature map: it needs "
                             f"kind={fixed!r} (got '{kind}'), bound=None (got {bound!r}) and map_size")
        if bound not in (None, "tanh", "tanh_inside"):
            raise ValueError(f"bound={bound!r} is not one of None, 'tanh', 'tanh_inside'")
        if bound and not spec.window:
            raise ValueError(f"bound={bound!r} applies to {window_kinds()} windows, not kind '{kind}'")
        if bound and not 0.0 < scale < 1.0:
            raise ValueError(f"bound={bound!r} needs a window scale in (0, 1), got scale={scale}")
        self.localisation = localisation
        self.kind, self.out_size, self.scale, self.bound = kind, _pair(out_size), float(scale), bound
        self.transform_kind = spec
        self.num_transforms, self.num_control_points = num_transforms, num_control_points
        self.align_corners, self.padding_mode = align_corners, padding_mode
        self.head_kind = head
        if head == "softargmax":
            self.head = SoftArgmaxHead(features, map_size, num_transforms, scale, spread, sharpness, calibrate)
        else:
            self.head = nn.Linear(features, num_transforms * num_params(kind, num_control_points))
        # What the kind precomputes for this fixed output grid (tps: its map, solved once); not saved in checkpoints.
        points = base_grid(self.out_size, align_corners=align_corners, dtype=torch.float64).reshape(-1, 2)
        self.register_buffer("tps_basis", spec.sampling_basis(points, num_control_points), persistent=False)
        if head == "linear":
            nn.init.zeros_(self.head.weight)
            with torch.no_grad():
                start = tiling_windows(num_transforms, scale, inset=bound == "tanh_inside")
                self.head.bias.copy_(self._raw_from_windows(start).reshape(-1))

    def initial_theta(self) -> torch.Tensor:
        """(N, *theta_shape) transforms the module predicts at initialisation (for any input)."""
        if self.head_kind == "softargmax":
            return self.head.initial_centres()
        return self._bounded(self.head.bias.detach().reshape(1, self.num_transforms, -1))[0]

    def window_room(self) -> Optional[float]:
        """How far a translation window's centre may go from the middle, if it is bounded: 1 (the
        image's edge) under the tanh bound, 1 - scale (the window inside the image) for the soft-argmax."""
        if self.head_kind == "softargmax":
            return 1.0 - self.scale
        return bound_room(self.bound, self.scale) if self.bound and self.transform_kind.fixed_scale else None

    def predict(self, loc_input: torch.Tensor) -> torch.Tensor:
        """Transform parameters (B, N, *theta_shape) from the localisation input."""
        if self.head_kind == "softargmax":
            feature_map = self.localisation.feature_map(loc_input)
            with torch.autocast(device_type=feature_map.device.type, enabled=False):
                return self.head(feature_map.to(self.head.prior.dtype))
        features = self.localisation(loc_input)
        # The regression runs in the head's own dtype (float32 under autocast): in bf16 a window
        # position would be rounded to about 1/256 of the image, a pixel or more at 448 px.
        with torch.autocast(device_type=features.device.type, enabled=False):
            raw = self.head(features.to(self.head.weight.dtype))
        return self._bounded(raw.reshape(loc_input.shape[0], self.num_transforms, -1))

    def forward(self, x: torch.Tensor, loc_input: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(crops (B, N, C, h, w), theta (B, N, ...)); the localisation net sees `loc_input` (default x)."""
        theta = self.predict(x if loc_input is None else loc_input)
        return self.sample(x, theta), theta

    def sample(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The N crops (B, N, C, h, w) of `x` at transforms `theta`, with this module's sampler settings."""
        return warp_many(x, theta, self.kind, self.out_size, scale=self.scale, align_corners=self.align_corners,
                         padding_mode=self.padding_mode, tps_basis=self.tps_basis)

    def boxes(self, theta: torch.Tensor) -> torch.Tensor:
        return window_boxes(theta, self.kind, self.scale)

    def _bounded(self, raw: torch.Tensor) -> torch.Tensor:
        if self.bound:
            raw = self.transform_kind.bounded(raw, self.bound, self.scale)
        return raw.reshape(*raw.shape[:2], *self.transform_kind.theta_shape(self.num_control_points))

    def _raw_from_windows(self, windows: torch.Tensor) -> torch.Tensor:
        if self.bound:
            return self.transform_kind.raw_from_windows(windows, self.bound, self.scale)
        return self.transform_kind.from_windows(windows, self.num_control_points).reshape(len(windows), -1)


# ----------------------------------------------------------------------------- helpers
