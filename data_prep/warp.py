"""The spatial transformer's functional core: theta shapes, sampling grids and `warp` (torch only).

`pipeline.models.spatial_transformer` re-exports all of it (the models' home of the warp kinds, with
the kinds' table); it lives here so that data-prep's digit distortions (`data_prep.distortions`)
warp with the very sampler the models use without data_prep importing pipeline.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

KINDS = ("affine", "attention", "translation", "projective", "tps")
Size = Union[int, Sequence[int]]


def theta_shape(kind: str, num_control_points: int = 16) -> Tuple[int, ...]:
    """Shape of one transform's theta (without the batch dimension)."""
    return {"affine": (2, 3), "attention": (3,), "translation": (2,), "projective": (3, 3),
            "tps": (num_control_points, 2)}[_check_kind(kind)]


def window_theta(kind: str, windows: torch.Tensor, K: int = 16) -> torch.Tensor:
    """Theta of each kind for axis-aligned square windows (..., 3) = (s, tx, ty).

    For `translation` the scale column is dropped (its scale is fixed by `warp(scale=)`).
    """
    s, tx, ty = windows.unbind(-1)
    zero, one = torch.zeros_like(s), torch.ones_like(s)
    if kind == "translation":
        return torch.stack([tx, ty], -1)
    if kind == "attention":
        return windows.clone()
    if kind == "affine":
        return torch.stack([s, zero, tx, zero, s, ty], -1).unflatten(-1, (2, 3))
    if kind == "projective":
        return torch.stack([s, zero, tx, zero, s, ty, zero, zero, one], -1).unflatten(-1, (3, 3))
    if kind == "tps":
        points = control_points(K, dtype=windows.dtype, device=windows.device)
        return points * s[..., None, None] + torch.stack([tx, ty], -1)[..., None, :]
    raise ValueError(_bad_kind(kind))


def theta_to_affine(theta: torch.Tensor, kind: str, scale: float = 0.5) -> torch.Tensor:
    """(..., 2, 3) affine matrix of an `affine`, `attention` or `translation` theta."""
    if kind == "affine":
        return theta
    if kind == "translation":
        theta = torch.cat([torch.full_like(theta[..., :1], scale), theta], -1)
        kind = "attention"
    if kind == "attention":
        return window_theta("affine", theta)
    raise ValueError(f"theta_to_affine: kind '{kind}' is not an affine map; "
                     "expected one of affine, attention, translation")


def control_points(K: int = 16, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """(K, 2) output positions (x, y) of the TPS control points: a regular grid on [-1, 1]^2, row-major."""
    side = round(K ** 0.5)  # not math.isqrt: K may be a symbolic size under torch.compile
    if side * side != K or side < 2:
        raise ValueError(f"tps needs a square number of control points >= 4, got K={K}")
    lin = torch.linspace(-1.0, 1.0, side, dtype=dtype, device=device)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], -1)


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
    _check_theta(theta, kind)
    h, w = _pair(out_size)
    batch = theta.shape[0]
    points = base_grid((h, w), align_corners=align_corners, dtype=theta.dtype, device=theta.device).reshape(-1, 2)
    homog = torch.cat([points, torch.ones_like(points[:, :1])], -1)           # (hw, 3)
    if kind in ("affine", "attention", "translation"):
        # F.affine_grid's own arithmetic, minus its size list (which breaks dynamic-shape compile).
        matrix = theta_to_affine(theta, kind, scale)
        return torch.einsum("pj,bij->bpi", homog, matrix).reshape(batch, h, w, 2)
    if kind == "projective":
        mapped = torch.einsum("pj,bij->bpi", homog, theta)                     # (B, hw, 3)
        return (mapped[..., :2] / mapped[..., 2:]).reshape(batch, h, w, 2)
    # tps: the map is linear in theta; the (hw, K) weights depend on the control grid only.
    weights = tps_weights(points, theta.shape[1]) if tps_basis is None else tps_basis.to(theta.dtype)
    return torch.einsum("pk,bkc->bpc", weights, theta).reshape(batch, h, w, 2)


def tps_weights(points: torch.Tensor, K: int = 16) -> torch.Tensor:
    """(P, K) matrix W such that a TPS with control-point sources theta (K, 2) maps points to W @ theta.

    Solves the standard TPS system [[U(c, c), [1, c]], [[1, c]^T, 0]] once, in float64, so that
    identity and affine control points are reproduced exactly.
    """
    dtype = points.dtype
    p = points.double()
    ctrl = control_points(K, dtype=torch.float64, device=points.device)
    ones_c = torch.ones(K, 1, dtype=torch.float64, device=points.device)
    system = torch.zeros(K + 3, K + 3, dtype=torch.float64, device=points.device)
    system[:K, :K] = _tps_kernel(ctrl, ctrl)
    system[:K, K:] = torch.cat([ones_c, ctrl], 1)
    system[K:, :K] = system[:K, K:].T
    # Right-hand side [I_K; 0]: the coefficients of each control point's source position.
    rhs = torch.zeros(K + 3, K, dtype=torch.float64, device=points.device)
    rhs[:K] = torch.eye(K, dtype=torch.float64, device=points.device)
    coeffs = torch.linalg.solve_ex(system, rhs)[0]  # (K+3, K); _ex: no error check, no host sync
    rows = torch.cat([_tps_kernel(p, ctrl), torch.ones_like(p[:, :1]), p], 1)  # (P, K+3)
    return (rows @ coeffs).to(dtype)


def _tps_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d2 = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
    return torch.where(d2 > 0, d2 * torch.log(d2.clamp_min(1e-30)), torch.zeros_like(d2))


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


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(_bad_kind(kind))
    return kind


def _bad_kind(kind: str) -> str:
    return f"unknown transform kind '{kind}'; expected one of {', '.join(KINDS)}"


def _check_theta(theta: torch.Tensor, kind: str) -> None:
    _check_kind(kind)
    expected = theta_shape(kind, theta.shape[1] if kind == "tps" and theta.dim() == 3 else 16)
    if tuple(theta.shape[1:]) != expected:
        raise ValueError(f"theta of kind '{kind}' must have shape (B, {', '.join(map(str, expected))}), "
                         f"got {tuple(theta.shape)}")


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
