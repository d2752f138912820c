"""The distortions of paper A.3 (R, RTS, P, E, TC), batched in torch: draw, then render.

    params = draw("RTS", count=128, generator=g, num_sources=len(digits), first_index=0)
    canvases = render(digits_uint8[:128], "RTS", params, sources=digits_uint8)   # (128, 42, 42) uint8

One definition serves both users: `data_prep digits` draws each fixed test (or training) sample from
its own seeded generator and records the parameters in the sample's JSON; the trainer draws a fresh
distortion for every training sample of every batch (`data.distortion`), on the batch's device.
Every length is in pixels of the 28x28 source digit:

  R    rotation uniform in [-90, 90] degrees about the centre (> 0: clockwise on screen); 28x28.
  RTS  rotation in [-45, 45] degrees, scale in [0.7, 1.2], placed at a random location of a 42x42 image.
  P    scale in [0.75, 1.0], then each image corner moved by N(0, 5 px): a projective warp; 28x28.
  E    scale in [0.75, 1.0], then a 16-point (4x4) thin-plate spline whose control points move by
       N(0, 1.5 px); 28x28.
  TC   the digit at a random location of a 60x60 canvas with six 6x6 patches cut at random from
       other digits of the sources (the split, or the batch when training), placed at random.

Warps run through `data_prep.warp.warp`, the sampler the models use (pipeline.models.spatial_transformer
re-exports it), with zero padding on the raw 0-255 values (the background stays black), rounded back to
uint8: a freshly distorted training batch is made exactly as the stored test images are.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

DISTORTIONS = ("R", "RTS", "P", "E", "TC")
OUTPUT_SIZE = {"R": 28, "RTS": 42, "P": 28, "E": 28, "TC": 60}
SOURCE_SIZE = 28
HALF = SOURCE_SIZE / 2  # source pixels per normalised unit
CLUTTER_PATCHES = 6
CLUTTER_SIZE = 6
CORNERS = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
WARP_KIND = {"R": "affine", "RTS": "affine", "P": "projective", "E": "tps"}

Params = Dict[str, torch.Tensor]


def check(distortion: str) -> str:
    if distortion not in DISTORTIONS:
        raise ValueError(f"distortion {distortion!r}: expected one of {', '.join(DISTORTIONS)}")
    return distortion


def _uniform(count: int, low: float, high: float, g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(count, *shape, generator=g, dtype=torch.float64) * (high - low) + low


def _normal(count: int, sigma: float, g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(count, *shape, generator=g, dtype=torch.float64) * sigma


def draw(distortion: str, count: int, generator: torch.Generator, num_sources: int = 0,
         first_index: int = 0) -> Params:
    """The random parameters of `count` samples (float64 / int64 tensors on the CPU).

    TC's clutter comes from sources other than the sample itself: sample i is source
    `first_index + i` among `num_sources` (the split; a training batch is its own sources).
    """
    g = generator
    if check(distortion) == "R":
        return {"rotation_deg": _uniform(count, -90, 90, g)}
    if distortion == "RTS":
        scale = _uniform(count, 0.7, 1.2, g)
        # Centre offset keeping the scaled 28x28 frame inside the 42x42 canvas.
        room = (OUTPUT_SIZE["RTS"] - SOURCE_SIZE * scale) / 2
        return {"rotation_deg": _uniform(count, -45, 45, g), "scale": scale,
                "center_offset_px": (torch.rand(count, 2, generator=g, dtype=torch.float64) * 2 - 1) * room[:, None]}
    if distortion == "P":
        return {"scale": _uniform(count, 0.75, 1.0, g), "corner_shift_px": _normal(count, 5.0, g, 4, 2)}
    if distortion == "E":
        return {"scale": _uniform(count, 0.75, 1.0, g), "control_shift_px": _normal(count, 1.5, g, 16, 2)}
    if num_sources < 2:
        raise ValueError("TC needs at least 2 source digits (clutter comes from other digits)")
    canvas = OUTPUT_SIZE["TC"]
    own = torch.arange(first_index, first_index + count)[:, None]
    others = torch.randint(0, num_sources - 1, (count, CLUTTER_PATCHES), generator=g)
    return {"digit_xy": torch.randint(0, canvas - SOURCE_SIZE + 1, (count, 2), generator=g),
            "source_index": others + (others >= own),  # any digit but this one
            "source_xy": torch.randint(0, SOURCE_SIZE - CLUTTER_SIZE + 1, (count, CLUTTER_PATCHES, 2), generator=g),
            "canvas_xy": torch.randint(0, canvas - CLUTTER_SIZE + 1, (count, CLUTTER_PATCHES, 2), generator=g)}


# ---- parameters -> sampling transforms (output coords -> input coords, normalised to [-1, 1]) ----

def rotation_scale_theta(deg: torch.Tensor, scale: torch.Tensor, offset_px: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, 2, 3) affine theta drawing the 28x28 digit rotated by `deg`, scaled, centred at `offset_px`."""
    # A point at output pixel offset p (from the canvas centre) reads the digit at R(-deg)(p - c) / s.
    a = torch.deg2rad(deg)
    cos, sin = torch.cos(a), torch.sin(a)
    inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) / scale[:, None, None]
    linear = inverse * ((out_size / 2) / HALF)  # output normalised units -> input normalised units
    shift = -(inverse @ (offset_px / HALF)[..., None])
    return torch.cat([linear, shift], -1)


def homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) H with H[2,2] = 1 and H @ [src, 1] ~ [dst, 1] for four point pairs (B, 4, 2)."""
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    system = torch.stack([rows_u, rows_v], -2).flatten(1, 2)           # (B, 8, 8), rows u0 v0 u1 v1 ...
    rhs = torch.stack([u, v], -1).flatten(1)                           # (B, 8)
    h = torch.linalg.solve(system, rhs)
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).view(-1, 3, 3)


def projective_theta(scale: torch.Tensor, corner_shift_px: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3): the image corners, scaled about the centre, land moved by the shifts."""
    moved = CORNERS.to(scale) * scale[:, None, None] + corner_shift_px / HALF
    return homography(moved, CORNERS.to(scale).expand_as(moved))  # output -> input: moved corners read the corners


def tps_theta(scale: torch.Tensor, control_shift_px: torch.Tensor) -> torch.Tensor:
    """(B, 16, 2): each control point reads the (scaled) digit from a randomly shifted place."""
    from .warp import control_points

    # Scaling the source positions by 1/scale scales the whole spline: TPS reproduces linear maps.
    return (control_points(16, dtype=torch.float64) + control_shift_px / HALF) / scale[:, None, None]


def theta(distortion: str, params: Params) -> torch.Tensor:
    """The (B, ...) float64 warp parameters of a warping distortion (R, RTS, P, E)."""
    if distortion == "R":
        deg = params["rotation_deg"]
        return rotation_scale_theta(deg, torch.ones_like(deg), torch.zeros(len(deg), 2, dtype=deg.dtype), 28)
    if distortion == "RTS":
        return rotation_scale_theta(params["rotation_deg"], params["scale"], params["center_offset_px"],
                                    OUTPUT_SIZE["RTS"])
    if distortion == "P":
        return projective_theta(params["scale"], params["corner_shift_px"])
    if distortion == "E":
        return tps_theta(params["scale"], params["control_shift_px"])
    raise ValueError(f"distortion {distortion} is not a warp")


# ---- rendering ---------------------------------------------------------------------------------

def render(images: torch.Tensor, distortion: str, params: Params, sources: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 digits (B, 28, 28) -> distorted uint8 (B, S, S), on the images' device.

    `sources` (N, 28, 28) are the digits TC's `source_index` refers to (default: `images`).
    """
    if check(distortion) == "TC":
        return clutter(images, params, images if sources is None else sources)
    from .warp import warp

    size = OUTPUT_SIZE[distortion]
    th = theta(distortion, params).to(images.device, torch.float32)
    with torch.no_grad():
        out = warp(images[:, None].float(), th, WARP_KIND[distortion], (size, size))
    return out[:, 0].round_().clamp_(0, 255).to(torch.uint8)


def _paste(canvas: torch.Tensor, pieces: torch.Tensor, xy: torch.Tensor) -> None:
    """canvas (B, S, S) = max(canvas, pieces (B, p, p) placed with their top-left at xy (B, 2))."""
    side = torch.arange(pieces.shape[-1], device=canvas.device)
    rows = (xy[:, 1, None, None] + side[None, :, None]).expand_as(pieces)
    cols = (xy[:, 0, None, None] + side[None, None, :]).expand_as(pieces)
    batch = torch.arange(len(canvas), device=canvas.device)[:, None, None].expand_as(pieces)
    canvas[batch, rows, cols] = torch.maximum(canvas[batch, rows, cols], pieces)  # max blend: neither hides the other


def clutter(images: torch.Tensor, params: Params, sources: torch.Tensor) -> torch.Tensor:
    """TC: clutter patches from `sources`, then the digit, on a black 60x60 canvas."""
    device = images.device
    size, side = OUTPUT_SIZE["TC"], torch.arange(CLUTTER_SIZE, device=device)
    canvas = torch.zeros(len(images), size, size, dtype=torch.uint8, device=device)
    index, source_xy = params["source_index"].to(device), params["source_xy"].to(device)
    for k in range(CLUTTER_PATCHES):
        x, y = source_xy[:, k, 0], source_xy[:, k, 1]
        rows = (y[:, None, None] + side[None, :, None]).expand(-1, CLUTTER_SIZE, CLUTTER_SIZE)
        cols = (x[:, None, None] + side[None, None, :]).expand(-1, CLUTTER_SIZE, CLUTTER_SIZE)
        pieces = sources[index[:, k, None, None].expand_as(rows), rows, cols]
        _paste(canvas, pieces, params["canvas_xy"][:, k].to(device))
    _paste(canvas, images, params["digit_xy"].to(device))
    return canvas


# ---- parameters <-> the JSON a stored sample records --------------------------------------------

def to_records(params: Params) -> List[Dict]:
    """One JSON-ready dict per sample (TC's clutter as a list of patches)."""
    count = len(next(iter(params.values())))
    records = []
    for i in range(count):
        if "source_index" in params:
            records.append({"digit_xy": params["digit_xy"][i].tolist(),
                            "clutter": [{"source_index": int(params["source_index"][i, k]),
                                         "source_xy": params["source_xy"][i, k].tolist(),
                                         "canvas_xy": params["canvas_xy"][i, k].tolist()}
                                        for k in range(CLUTTER_PATCHES)]})
        else:
            records.append({key: value[i].tolist() for key, value in params.items()})
    return records


def from_records(records: List[Dict]) -> Params:
    """The tensors of `draw` from per-sample records (the inverse of `to_records`)."""
    if "clutter" in records[0]:
        patches = [r["clutter"] for r in records]
        return {"digit_xy": torch.tensor([r["digit_xy"] for r in records]),
                "source_index": torch.tensor([[c["source_index"] for c in p] for p in patches]),
                "source_xy": torch.tensor([[c["source_xy"] for c in p] for p in patches]),
                "canvas_xy": torch.tensor([[c["canvas_xy"] for c in p] for p in patches])}
    return {key: torch.tensor([r[key] for r in records], dtype=torch.float64) for key in records[0]}


class FreshDistortion:
    """A fresh distortion for every sample of every training batch: uint8 (B, 1, 28, 28) on any
    device -> uint8 (B, 1, S, S). Parameters come from a CPU generator (`reseed` restarts it), so a
    run is reproducible whatever the device; TC's clutter comes from the batch's other digits."""

    def __init__(self, distortion: str, seed: int = 0):
        self.distortion = check(distortion)
        self.generator = torch.Generator()
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    @property
    def output_size(self) -> int:
        return OUTPUT_SIZE[self.distortion]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 1 or tuple(images.shape[2:]) != (SOURCE_SIZE, SOURCE_SIZE):
            raise ValueError(f"data.distortion={self.distortion} distorts 28x28 grayscale source digits; got a batch "
                             f"of shape {tuple(images.shape)} (are the training shards undistorted digits, "
                             "written with data_prep digits --fresh-train?)")
        digits = images[:, 0]
        params = draw(self.distortion, len(digits), self.generator, num_sources=len(digits))
        return render(digits, self.distortion, params)[:, None].contiguous()

    def apply(self, images: torch.Tensor, targets: torch.Tensor):
        """(distorted images, targets) of a training batch: what the trainer calls."""
        return self(images), targets


class FreshPairs(FreshDistortion):
    """MNIST addition (paper A.1) afresh: each digit of a batch is paired with another digit of the batch
    drawn at random, each distorted with its own parameters into its own channel: uint8 (B, 1, 28, 28)
    and labels (B,) -> uint8 (B, 2, S, S) and their sums (B,), as `data_prep digits --addition` stores
    its test pairs."""

    def apply(self, images: torch.Tensor, targets: torch.Tensor):
        count = len(images)
        if count < 2:
            raise ValueError("MNIST addition pairs the digits of a batch: it needs at least 2 (train.micro_batch_size)")
        other = torch.randint(0, count - 1, (count,), generator=self.generator)
        partner = (other + (other >= torch.arange(count))).to(images.device)  # any digit but the sample's own
        pairs = torch.cat([self(images), self(images[partner])], 1)
        return pairs, targets + targets[partner]


def mix_seed(*values: int) -> int:
    """One 63-bit generator seed from several integers (e.g. seed, split, index)."""
    import numpy as np

    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0]) >> 1
