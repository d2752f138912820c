"""Spatial-transformer kinds: one class per kind of transform, registered in `TRANSFORM_KINDS`.

    kind = transform_kind("attention")
    kind.theta_shape()                       # (3,)
    kind.from_windows(windows)               # theta of square windows (s, tx, ty)

A kind owns everything that differs between transforms: theta's shape, theta for square windows
(which gives the identity and the tiling start), where output points sample the input (the grid),
the box a crop covers, and the tanh bound of window kinds. `pipeline.models.spatial_transformer`
(`warp`, `SpatialTransformer`), the models and `model.transform`'s choices ask the kind; a new
kind is one registered subclass (tests/test_transform_kinds.py adds one end to end).

This module imports torch inside the methods, not at the top: the config reads the kind names
(its choices for `model.transform`) without importing torch. Theta maps output coordinates to
input coordinates, both normalised to [-1, 1] as in `F.affine_grid(align_corners=False)`.
"""
from __future__ import annotations

import math
from typing import Tuple

from data_prep.registry import Registry


class TransformKind:
    """One kind of transform. Subclasses set `name` and the flags, and implement the theta maths."""

    name: str = ""
    affine = False       # theta is an affine map: `to_affine` gives its (..., 2, 3) matrix
    window = False       # theta is an axis-aligned square window: a tanh bound applies; a crop, not a warp
    fixed_scale = False  # theta is only the window's centre (tx, ty); its side is the module's `scale`

    def theta_shape(self, num_control_points: int = 16) -> Tuple[int, ...]:
        """Shape of one transform's theta (without the batch dimension)."""
        raise NotImplementedError

    def num_params(self, num_control_points: int = 16) -> int:
        return math.prod(self.theta_shape(num_control_points))

    def control_points_in(self, theta) -> int:
        """The control-point count a theta of this kind carries (the default where it carries none)."""
        return 16

    def from_windows(self, windows, num_control_points: int = 16):
        """Theta (..., *theta_shape) for square windows (..., 3) = (s, tx, ty)."""
        raise NotImplementedError

    def map_points(self, points, theta, scale: float, basis=None):
        """Input coordinates (B, P, 2) of output points (P, 2) under theta (B, ...); `basis`: a
        precomputed `sampling_basis` of these points, where the kind has one."""
        raise NotImplementedError

    def sampling_basis(self, points, num_control_points: int):
        """What the kind can precompute for a fixed output grid (P, 2) (float64), or None."""
        return None

    def to_affine(self, theta, scale: float = 0.5):
        affine = ", ".join(kind.name for kind in TRANSFORM_KINDS if kind.affine)
        raise ValueError(f"theta_to_affine: kind '{self.name}' is not an affine map; expected one of {affine}")

    def scale_of(self, theta, scale: float):
        """The windows' sides (...) of theta (..., *theta_shape) (window kinds)."""
        raise ValueError(f"kind '{self.name}' is not a square window; expected one of {window_kinds()}")

    def boxes(self, theta, scale: float):
        """(B, 4) [x0, y0, x1, y1] around the warped output square: its border, 33 points per side."""
        import torch

        from data_prep.geometry import square_border
        mapped = self.map_points(square_border(33, theta.dtype, theta.device), theta, scale)
        return torch.cat([mapped.amin(1), mapped.amax(1)], -1)

    def bounded(self, raw, bound: str, scale: float):
        """Theta (flat per transform) from the head's raw output under `bound` (window kinds)."""
        raise ValueError(f"bound={bound!r} applies to {window_kinds()} windows, not kind '{self.name}'")

    def raw_from_windows(self, windows, bound: str, scale: float):
        """The head's raw output (N, num_params) that `bounded` turns into these windows (N, 3)."""
        raise ValueError(f"bound={bound!r} applies to {window_kinds()} windows, not kind '{self.name}'")


TRANSFORM_KINDS: Registry[TransformKind] = Registry("transform kind")


def transform_kind(name: str) -> TransformKind:
    """The registered kind called `name`; a ValueError naming the known kinds otherwise."""
    return TRANSFORM_KINDS.get(name)


def window_kinds() -> str:
    """The window kinds' names, for messages: 'attention and translation'."""
    return " and ".join(kind.name for kind in TRANSFORM_KINDS if kind.window)


def bound_room(bound: str, scale: float) -> float:
    """How far the tanh bound lets a window's centre go: 1 (tanh), 1 - s for a window of side s (tanh_inside)."""
    return 1.0 if bound == "tanh" else 1.0 - scale


def _affine_matrix(windows):
    """(..., 2, 3) affine matrices [[s, 0, tx], [0, s, ty]] of windows (..., 3)."""
    import torch
    s, tx, ty = windows.unbind(-1)
    zero = torch.zeros_like(s)
    return torch.stack([s, zero, tx, zero, s, ty], -1).unflatten(-1, (2, 3))


class _AffineFamily(TransformKind):
    """Kinds whose theta is an affine map: the grid is `F.affine_grid`'s arithmetic."""

    affine = True

    def map_points(self, points, theta, scale: float, basis=None):
        import torch
        homog = torch.cat([points, torch.ones_like(points[:, :1])], -1)           # (P, 3)
        # F.affine_grid's own arithmetic, minus its size list (which breaks dynamic-shape compile).
        return torch.einsum("pj,bij->bpi", homog, self.to_affine(theta, scale))

    def boxes(self, theta, scale: float):
        import torch
        matrix = self.to_affine(theta, scale)
        centre = matrix[..., 2]
        half = matrix[..., :2].abs().sum(-1)                    # the corners' largest offsets
        return torch.cat([centre - half, centre + half], -1)


@TRANSFORM_KINDS.register
class Affine(_AffineFamily):
    """(B, 2, 3): as `F.affine_grid`."""

    name = "affine"

    def theta_shape(self, num_control_points: int = 16) -> Tuple[int, ...]:
        return (2, 3)

    def from_windows(self, windows, num_control_points: int = 16):
        return _affine_matrix(windows)

    def to_affine(self, theta, scale: float = 0.5):
        return theta


@TRANSFORM_KINDS.register
class Attention(_AffineFamily):
    """(B, 3) = (s, tx, ty): affine [[s, 0, tx], [0, s, ty]] (crop, translate, isotropic scale)."""

    name = "attention"
    window = True

    def theta_shape(self, num_control_points: int = 16) -> Tuple[int, ...]:
        return (3,)

    def from_windows(self, windows, num_control_points: int = 16):
        return windows.clone()

    def to_affine(self, theta, scale: float = 0.5):
        return _affine_matrix(theta)

    def scale_of(self, theta, scale: float):
        return theta[..., 0]

    def bounded(self, raw, bound: str, scale: float):
        # s in (0, 1), centre inside the image (tanh_inside: the window inside)
        import torch
        s = torch.sigmoid(raw[..., :1])
        return torch.cat([s, (1.0 - s if bound == "tanh_inside" else 1.0) * torch.tanh(raw[..., 1:])], -1)

    def raw_from_windows(self, windows, bound: str, scale: float):
        import torch
        s, centre = windows[:, :1], windows[:, 1:]
        room = 1.0 - s if bound == "tanh_inside" else 1.0
        return torch.cat([torch.logit(s), torch.atanh(centre / room)], 1)


@TRANSFORM_KINDS.register
class Translation(_AffineFamily):
    """(B, 2) = (tx, ty): attention with the fixed scale `scale=` (paper A.5 uses 0.5)."""

    name = "translation"
    window = True
    fixed_scale = True

    def theta_shape(self, num_control_points: int = 16) -> Tuple[int, ...]:
        return (2,)

    def from_windows(self, windows, num_control_points: int = 16):
        import torch
        s, tx, ty = windows.unbind(-1)
        return torch.stack([tx, ty], -1)  # the scale column is dropped: `scale=` fixes it

    def to_affine(self, theta, scale: float = 0.5):
        import torch
        return _affine_matrix(torch.cat([torch.full_like(theta[..., :1], scale), theta], -1))

    def scale_of(self, theta, scale: float):
        return theta.new_full(theta.shape[:-1], scale)

    def bounded(self, raw, bound: str, scale: float):
        import torch
        return bound_room(bound, scale) * torch.tanh(raw)

    def raw_from_windows(self, windows, bound: str, scale: float):
        import torch
        return torch.atanh(windows[:, 1:] / bound_room(bound, scale))


@TRANSFORM_KINDS.register
class Projective(TransformKind):
    """(B, 3, 3): a homography on homogeneous output coordinates, then divide by the last."""

    name = "projective"

    def theta_shape(self, num_control_points: int = 16) -> Tuple[int, ...]:
        return (3, 3)

    def from_windows(self, windows, num_control_points: int = 16):
        import torch
        s, tx, ty = windows.unbind(-1)
        zero, one = torch.zeros_like(s), torch.ones_like(s)
        return torch.stack([s, zero, tx, zero, s, ty, zero, zero, one], -1).unflatten(-1, (3, 3))

    def map_points(self, points, theta, scale: float, basis=None):
        import torch
        homog = torch.cat([points, torch.ones_like(points[:, :1])], -1)
        mapped = torch.einsum("pj,bij->bpi", homog, theta)                     # (B, P, 3)
        return mapped[..., :2] / mapped[..., 2:]


@TRANSFORM_KINDS.register
class ThinPlateSpline(TransformKind):
    """(B, K, 2): source positions of K control points whose output positions form a regular
    sqrt(K) x sqrt(K) grid on [-1, 1]^2 (identity theta = that grid); U(r) = r^2 log r^2."""

    name = "tps"

    def theta_shape(self, num_control_points: int = 16) -> Tuple[int, ...]:
        return (num_control_points, 2)

    def control_points_in(self, theta) -> int:
        return theta.shape[-2]

    def from_windows(self, windows, num_control_points: int = 16):
        import torch

        from data_prep.geometry import control_points
        s, tx, ty = windows.unbind(-1)
        points = control_points(num_control_points, dtype=windows.dtype, device=windows.device)
        return points * s[..., None, None] + torch.stack([tx, ty], -1)[..., None, :]

    def map_points(self, points, theta, scale: float, basis=None):
        # The map is linear in theta; the (P, K) weights depend on the control grid only.
        import torch

        from data_prep.geometry import tps_weights
        weights = tps_weights(points, theta.shape[1]) if basis is None else basis.to(theta.dtype)
        return torch.einsum("pk,bkc->bpc", weights, theta)

    def sampling_basis(self, points, num_control_points: int):
        from data_prep.geometry import tps_weights
        return tps_weights(points, num_control_points).float()


def check_theta(theta, kind: str) -> None:
    """A ValueError naming the kind and both shapes unless theta is (B, *theta_shape)."""
    spec = transform_kind(kind)
    expected = spec.theta_shape(spec.control_points_in(theta) if theta.dim() == 3 else 16)
    if tuple(theta.shape[1:]) != expected:
        raise ValueError(f"theta of kind '{kind}' must have shape (B, {', '.join(map(str, expected))}), "
                         f"got {tuple(theta.shape)}")

