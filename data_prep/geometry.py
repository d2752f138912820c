"""Point sets of the transform kinds: the TPS control grid and its interpolation weights, the
border of the output square (`data_prep.transform_kinds` maps it to a crop's box)."""
from __future__ import annotations

import torch


def control_points(K: int = 16, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """(K, 2) output positions (x, y) of the TPS control points: a regular grid on [-1, 1]^2, row-major."""
    side = round(K ** 0.5)  # not math.isqrt: K may be a symbolic size under torch.compile
    if side * side != K or side < 2:
        raise ValueError(f"tps needs a square number of control points >= 4, got K={K}")
    lin = torch.linspace(-1.0, 1.0, side, dtype=dtype, device=device)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], -1)


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


def square_border(per_side: int, dtype, device) -> torch.Tensor:
    t = torch.linspace(-1.0, 1.0, per_side, dtype=dtype, device=device)
    one = torch.ones_like(t)
    return torch.cat([torch.stack([t, -one], 1), torch.stack([t, one], 1),
                      torch.stack([-one, t], 1), torch.stack([one, t], 1)])
