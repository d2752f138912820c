"""The spatial-transformer core: warp kinds agree with each other, identities, gradients, fast paths."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.spatial_transformer import (
    KINDS, SpatialTransformer, control_points, identity_theta, sampling_grid, theta_to_affine,
    tiling_windows, warp, warp_many, window_boxes, window_theta)


def _image(b=2, c=3, h=9, w=11, dtype=torch.float32, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _affine(b=2, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.tensor([[0.8, 0.1, 0.05], [-0.15, 0.7, -0.1]], dtype=dtype)
            + 0.05 * torch.randn(b, 2, 3, generator=g, dtype=dtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_identity_returns_input(kind, align_corners):
    x = _image()
    theta = identity_theta(kind, x.shape[0])
    # translation is only the identity at scale 1 (its window side is fixed by `scale`).
    out = warp(x, theta, kind, x.shape[-2:], scale=1.0, align_corners=align_corners)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_attention_and_translation_equal_affine():
    x = _image()
    att = torch.tensor([[0.5, 0.2, -0.3], [0.9, -0.05, 0.1]])
    matrix = torch.stack([torch.tensor([[s, 0, tx], [0, s, ty]]) for s, tx, ty in att.tolist()])
    ref = warp(x, matrix, "affine", (7, 5))
    torch.testing.assert_close(warp(x, att, "attention", (7, 5)), ref)
    reference_by_hand = F.grid_sample(x, F.affine_grid(matrix, [2, 3, 7, 5], align_corners=False), align_corners=False)
    torch.testing.assert_close(ref, reference_by_hand)
    trans = torch.tensor([[0.2, -0.3], [-0.05, 0.1]])
    fixed = att.clone()
    fixed[:, 0] = 0.5
    torch.testing.assert_close(warp(x, trans, "translation", (7, 5), scale=0.5), warp(x, fixed, "attention", (7, 5)))


def test_projective_with_affine_last_row_equals_affine():
    x = _image()
    matrix = _affine()
    homography = torch.cat([matrix, torch.tensor([0.0, 0.0, 1.0]).expand(2, 1, 3)], 1)
    torch.testing.assert_close(warp(x, homography, "projective", (6, 8)), warp(x, matrix, "affine", (6, 8)))
    # Scaling a homography does not change the map: the division removes it.
    torch.testing.assert_close(warp(x, 3.0 * homography, "projective", (6, 8)), warp(x, matrix, "affine", (6, 8)))


@pytest.mark.parametrize("K", [9, 16])
def test_tps_reproduces_global_affine_maps(K):
    x = _image()
    matrix = _affine()
    points = control_points(K)
    moved = points @ matrix[:, :, :2].transpose(1, 2) + matrix[:, None, :, 2]
    torch.testing.assert_close(sampling_grid(moved, "tps", (6, 8)), sampling_grid(matrix, "affine", (6, 8)),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(warp(x, moved, "tps", (6, 8)), warp(x, matrix, "affine", (6, 8)), atol=1e-5, rtol=0)


def test_tps_interpolates_its_control_points():
    # A non-affine TPS still sends each control point exactly to its source position.
    side = 4
    theta = control_points(16) + 0.1 * torch.randn(1, 16, 2, generator=torch.Generator().manual_seed(3))
    grid = sampling_grid(theta.double(), "tps", (side, side), align_corners=True)  # pixels at the control points
    torch.testing.assert_close(grid.reshape(1, 16, 2), theta.double(), atol=1e-9, rtol=0)


def test_projective_grid_against_a_per_pixel_homography():
    """Independent reference: each output pixel's centre mapped by H, then divided, one pixel at a time."""
    h, w = 5, 7
    H = torch.tensor([[0.9, 0.2, 0.1], [-0.1, 1.1, -0.2], [0.3, -0.25, 1.0]], dtype=torch.float64)
    grid = sampling_grid(H[None], "projective", (h, w))[0]
    for i in range(h):
        for j in range(w):
            x, y = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1  # align_corners=False pixel centres
            u, v, s = (H @ torch.tensor([x, y, 1.0], dtype=torch.float64)).tolist()
            assert grid[i, j].tolist() == pytest.approx([u / s, v / s], abs=1e-12)


def test_tps_grid_against_scipy_thin_plate_rbf():
    """Independent reference: scipy's thin-plate-spline RBF with a linear term (degree 1), fitted to
    non-affine control displacements, evaluated at every output pixel."""
    from scipy.interpolate import RBFInterpolator

    h, w = 6, 9
    points = control_points(16, dtype=torch.float64)
    theta = points + 0.15 * torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grid = sampling_grid(theta[None], "tps", (h, w))[0].reshape(-1, 2)
    ys, xs = torch.meshgrid((2 * torch.arange(h) + 1) / h - 1, (2 * torch.arange(w) + 1) / w - 1, indexing="ij")
    pixels = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).double().numpy()
    spline = RBFInterpolator(points.numpy(), theta.numpy(), kernel="thin_plate_spline", degree=1)
    torch.testing.assert_close(grid, torch.from_numpy(spline(pixels)), atol=1e-6, rtol=0)  # scipy rescales: 7e-8


def _gradcheck_theta(kind):
    g = torch.Generator().manual_seed(5)
    jitter = lambda t: t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
    base = identity_theta(kind, 2, K=9, dtype=torch.float64)
    if kind in ("affine", "attention", "projective", "tps"):
        base = window_theta(kind, torch.tensor([[0.7, 0.1, -0.05]], dtype=torch.float64), 9).expand_as(base)
    return jitter(base).requires_grad_()


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_theta_and_x(kind):
    x = _image(2, 2, 5, 6, dtype=torch.float64).requires_grad_()
    theta = _gradcheck_theta(kind)
    assert torch.autograd.gradcheck(lambda a, t: warp(a, t, kind, (4, 3), scale=0.6), (x, theta),
                                    eps=1e-6, atol=1e-5)


def test_warp_many_equals_expanded_reference_values_and_grads():
    # Reference: expand the input N times and sample each crop in a batch of B*N.
    x = _image(2, 3, 16, 12).requires_grad_()
    theta = torch.tensor([[[0.3, -0.2], [-0.4, 0.1], [0.0, 0.45]],
                          [[-0.1, 0.2], [0.25, 0.25], [0.4, -0.4]]]).requires_grad_()
    x_ref, theta_ref = x.detach().clone().requires_grad_(), theta.detach().clone().requires_grad_()
    fast = warp_many(x, theta, "translation", (5, 7), scale=0.5)
    b, n = theta.shape[:2]
    expanded = x_ref[:, None].expand(b, n, *x.shape[1:]).reshape(b * n, *x.shape[1:])
    ref = warp(expanded, theta_ref.reshape(b * n, 2), "translation", (5, 7), scale=0.5).reshape(b, n, 3, 5, 7)
    assert fast.shape == (2, 3, 3, 5, 7)
    # Same arithmetic per output pixel: equal to float32 rounding (tolerance 1e-6 abs).
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)
    weights = torch.randn_like(ref)
    (fast * weights).sum().backward()
    (ref * weights).sum().backward()
    # Gradients to x are summed over crops in a different order: tolerance 1e-5 abs.
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(theta.grad, theta_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["affine", "projective", "tps"])
def test_warp_many_other_kinds(kind):
    x = _image(2, 1, 8, 8)
    theta = window_theta(kind, torch.tensor([[[0.5, -0.3, 0.2], [0.6, 0.3, -0.1]]]).expand(2, 2, 3))
    fast = warp_many(x, theta, kind, 4)
    for i in range(2):
        torch.testing.assert_close(fast[:, i], warp(x, theta[:, i], kind, 4), atol=1e-6, rtol=0)


def test_sampling_runs_in_float32_under_autocast():
    x = _image(1, 3, 8, 8).to(torch.bfloat16)
    theta = torch.tensor([[0.33, -0.21]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = warp(x, theta, "translation", 4)
    assert out.dtype == torch.bfloat16
    ref = warp(x.float(), theta, "translation", 4)
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float())


def test_window_boxes():
    att = torch.tensor([[[0.5, 0.2, -0.3], [0.25, -0.5, 0.5]]])
    boxes = window_boxes(att, "attention")
    torch.testing.assert_close(boxes, torch.tensor([[[-0.3, -0.8, 0.7, 0.2], [-0.75, 0.25, -0.25, 0.75]]]))
    torch.testing.assert_close(window_boxes(att[..., 1:], "translation", scale=0.5)[0, 0], boxes[0, 0])
    # Every kind agrees on the same window.
    for kind in ("affine", "projective", "tps"):
        torch.testing.assert_close(window_boxes(window_theta(kind, att), kind), boxes, atol=1e-5, rtol=0)
    # A rotation by 45 degrees: the bounding box of the turned square.
    c = 0.5 * 2 ** -0.5
    rot = torch.tensor([[[c, -c, 0.0], [c, c, 0.0]]])
    torch.testing.assert_close(window_boxes(rot, "affine"), torch.tensor([[-2 * c, -2 * c, 2 * c, 2 * c]]))


def test_theta_to_affine_rejects_non_affine_kinds():
    with pytest.raises(ValueError, match="projective"):
        theta_to_affine(torch.eye(3)[None], "projective")


def test_bad_kind_and_shape_name_the_value():
    x = _image()
    with pytest.raises(ValueError, match="'similarity'"):
        warp(x, torch.zeros(2, 4), "similarity", 4)
    with pytest.raises(ValueError, match=r"attention.*\(B, 3\).*\(2, 2\)"):
        warp(x, torch.zeros(2, 2), "attention", 4)


@pytest.mark.parametrize("num, expected", [
    (1, [[0.0, 0.0]]),
    (2, [[-0.5, 0.0], [0.5, 0.0]]),                                     # left and right halves of the middle band
    (3, [[-0.5, 0.0], [0.0, 0.0], [0.5, 0.0]]),                         # a row of three, moved in to stay inside
    (4, [[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]),          # the quadrants (paper A.5)
])
def test_tiling_windows(num, expected):
    windows = tiling_windows(num, 0.5)
    torch.testing.assert_close(windows[:, 1:], torch.tensor(expected, dtype=torch.float64))
    assert (windows[:, 0] == 0.5).all()


def test_tiling_windows_inset_is_the_soft_argmax_start():
    inset = tiling_windows(4, 0.5, inset=True)[:, 1:]
    torch.testing.assert_close(inset, tiling_windows(4, 0.5)[:, 1:] * 0.5)


@pytest.mark.parametrize("kind", ["translation", "attention"])
def test_tanh_bound_contains_the_tiling_start_strictly_and_lets_windows_go_past_it(kind):
    # Paper A.5: 4 windows of scale 0.5 start on the quadrants, centres +-0.5. The bound must hold
    # them strictly inside (a finite raw bias, a tanh slope well above 0) and let them move further out.
    st = SpatialTransformer(_Flatten(), 12, kind, 4, num_transforms=4, scale=0.5, bound="tanh")
    raw = st.head.bias.detach().reshape(4, -1)[:, -2:]
    assert torch.isfinite(st.head.bias).all()
    assert (1 - torch.tanh(raw) ** 2).min() >= 0.7                       # slope 0.75 at |t| = 0.5
    centres = st.initial_theta()[:, -2:] if kind == "translation" else st.initial_theta()[:, 1:]
    torch.testing.assert_close(centres.abs(), torch.full((4, 2), 0.5))
    with torch.no_grad():
        st.head.bias.mul_(3.0)                                             # push every window outwards
    assert (st.predict(torch.zeros(1, 12))[0, :, -2:].abs() > 0.8).all()


class _Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


@pytest.mark.parametrize("kind, bound", [("translation", "tanh"), ("translation", None), ("attention", "tanh"),
                                         ("affine", None), ("projective", None), ("tps", None)])
def test_spatial_transformer_initial_windows_and_gradients(kind, bound):
    x = _image(2, 3, 8, 8).requires_grad_()
    st = SpatialTransformer(_Flatten(), 3 * 8 * 8, kind, 4, num_transforms=4, scale=0.5, bound=bound)
    crops, theta = st(x)
    assert crops.shape == (2, 4, 3, 4, 4)
    # Zero head weights: every input gets the tiling windows.
    expected = window_theta(kind, tiling_windows(4, 0.5).float())
    torch.testing.assert_close(theta, expected.expand_as(theta), atol=1e-6, rtol=0)
    torch.testing.assert_close(st.initial_theta(), expected, atol=1e-6, rtol=0)
    boxes = st.boxes(theta)
    assert boxes.shape == (2, 4, 4) and boxes.abs().max() <= 1.0 + 1e-6
    crops.sum().backward()
    assert st.head.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_spatial_transformer_tps_uses_its_precomputed_basis():
    x = _image(2, 3, 8, 8)
    st = SpatialTransformer(_Flatten(), 3 * 8 * 8, "tps", (5, 6), num_transforms=2, num_control_points=9)
    with torch.no_grad():
        st.head.weight.normal_(std=0.01)
    assert st.tps_basis.shape == (30, 9) and "tps_basis" not in st.state_dict()
    crops, theta = st(x)
    torch.testing.assert_close(crops, warp_many(x, theta, "tps", (5, 6)), atol=1e-6, rtol=0)


def test_spatial_transformer_single_identity():
    x = _image(2, 3, 8, 8)
    st = SpatialTransformer(_Flatten(), 3 * 8 * 8, "affine", (8, 8), scale=1.0)
    crops, _ = st(x)
    torch.testing.assert_close(crops[:, 0], x, atol=1e-5, rtol=0)


def test_transform_head_runs_in_float32_under_autocast():
    st = SpatialTransformer(_Flatten(), 3 * 8 * 8, "translation", 4, num_transforms=2, bound="tanh")
    with torch.no_grad():
        st.head.weight.normal_(std=0.1)
    x = _image(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        crops, theta = st(x)
    assert theta.dtype == torch.float32
    torch.testing.assert_close(theta, st(x)[1])


def test_tanh_bound_keeps_window_centres_inside():
    st = SpatialTransformer(_Flatten(), 12, "translation", 4, num_transforms=2, scale=0.5, bound="tanh")
    with torch.no_grad():
        st.head.weight.fill_(50.0)
    theta = st.predict(torch.randn(3, 12) * 10)
    assert theta.abs().max() <= 1.0 and st.window_room() == 1.0
    boxes = st.boxes(theta)                                                # at most half of a window outside
    assert boxes.min() >= -1.5 and boxes.max() <= 1.5


def test_spatial_transformer_rejects_bad_settings():
    with pytest.raises(ValueError, match="bound"):
        SpatialTransformer(_Flatten(), 4, "affine", 4, bound="tanh")
    with pytest.raises(ValueError, match="scale"):
        SpatialTransformer(_Flatten(), 4, "translation", 4, scale=1.0, bound="tanh")


@pytest.mark.slow
def test_warp_many_compiles_without_graph_breaks():
    # torch.compile(fullgraph=True) fails on any graph break; dynamic=True also covers a changing batch.
    def crops(x, translation, tps):
        return warp_many(x, translation, "translation", 6) + warp_many(x, tps, "tps", 6)

    compiled = torch.compile(crops, backend="aot_eager", fullgraph=True, dynamic=True)
    x = _image(2, 3, 12, 12).requires_grad_()
    translation = torch.tensor([[[0.3, -0.2], [-0.4, 0.1]]]).expand(2, 2, 2).clone().requires_grad_()
    tps = (control_points(16) * 0.5).expand(2, 2, 16, 2).clone().requires_grad_()
    out = compiled(x, translation, tps)
    torch.testing.assert_close(out, crops(x, translation, tps))
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and translation.grad.abs().sum() > 0 and tps.grad.abs().sum() > 0


def test_gradient_descent_moves_a_window_onto_a_bright_patch():
    # The gradients are useful, not only correct: maximising the crop's brightness slides a
    # translation window from its tiling place onto a bright square it only half covers at first.
    image = torch.zeros(1, 1, 32, 32)
    image[..., 20:30, 18:28] = 1.0                      # centre at normalised (0.4375, 0.5625)
    theta = torch.tensor([[0.2, 0.25]], requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        (-warp(image, theta, "translation", 8, scale=0.25).mean()).backward()
        opt.step()
    box = window_boxes(theta.detach(), "translation", scale=0.25)[0]
    square = torch.tensor([18, 20, 28, 30]) / 16.0 - 1.0   # [x0, y0, x1, y1] of the square
    assert (box[:2] >= square[:2] - 1e-3).all() and (box[2:] <= square[2:] + 1e-3).all(), (box, square)
