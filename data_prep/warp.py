"""The warp of every transform kind: where output pixels sample the input, and the bilinear sampling.

Shared by the models (`pipeline.models.spatial_transformer` re-exports it) and the digit
distortions of data prep (`data_prep.distortions`), so both warp with the same code; each kind's
maths is its class in `data_prep.transform_kinds`. Theta maps output coordinates to input
coordinates, both normalised to [-1, 1] as in `F.affine_grid(align_corners=False)`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from data_prep.geometry import control_points, tps_weights  # noqa: F401 (part of this module's interface)
from data_prep.transform_kinds import check_theta, transform_kind

Size = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------- grids

def base_grid(out_size: Size, *, align_corners: bool = False, dtype=torch.float32, device=None) -> torch.Tensor:
    """(h, w, 2) identity output coordinates (x, y), exactly those of `F.affine_grid`."""
    h, w = _pair(out_size)
    ys = _linspace(h, align_corners, dtype, device)
    xs = _linspace(w, align_corners, dtype, device)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y], -1)


def sampling_grid(theta: torch.Tensor, kind: str, out_size: Size, *, scale: float = 0.5,
                  align_corners: bool = False, tps_basis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, h, w, 2) input coordinates at which output pixel (i, j) samples, in theta's dtype.

    `tps_basis`: the (h*w, K) `tps_weights` of this output grid, precomputed (SpatialTransformer
    keeps it as a buffer) so that a step neither solves the TPS system nor syncs with the host.
    """
    check_theta(theta, kind)
    h, w = _pair(out_size)
    points = base_grid((h, w), align_corners=align_corners, dtype=theta.dtype, device=theta.device).reshape(-1, 2)
    return transform_kind(kind).map_points(points, theta, scale, tps_basis).reshape(theta.shape[0], h, w, 2)


# ----------------------------------------------------------------------------- sampling

def warp(x: torch.Tensor, theta: torch.Tensor, kind: str, out_size: Size, *, scale: float = 0.5,
         align_corners: bool = False, padding_mode: str = "zeros",
         tps_basis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sample x (B, C, H, W) bilinearly at the grid of `theta`; returns (B, C, *out_size) in x's dtype."""
    if x.dim() != 4 or theta.shape[0] != x.shape[0]:
        raise ValueError(f"warp: expected x (B, C, H, W) and theta with the same batch, got x "
                         f"{tuple(x.shape)} and theta {tuple(theta.shape)}")
    work = _work_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        grid = sampling_grid(theta.to(work), kind, out_size, scale=scale, align_corners=align_corners,
                             tps_basis=tps_basis)
        out = F.grid_sample(x.to(work), grid, mode="bilinear", padding_mode=padding_mode,
                            align_corners=align_corners)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- helpers

def _pair(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _linspace(n: int, align_corners: bool, dtype, device) -> torch.Tensor:
    # Pixel centres as F.affine_grid places them.
    if align_corners:
        return torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device) if n > 1 else torch.zeros(1, dtype=dtype, device=device)
    return (torch.arange(n, dtype=dtype, device=device) * 2 + 1) / n - 1


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32
