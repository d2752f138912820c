"""python -m data_prep synthetic-cub --out DIR [--classes 9 --images-per-class 60 --size 128 --seed 0]

An embedded fine-grained bird task that needs no download, written in CUB-200-2011's own on-disk
layout so that `python -m data_prep cub --root DIR --out SHARDS` runs on it unchanged:

    DIR/images/<NNN.ClassName>/<ClassName>_<NNNN>_<id>.jpg     RGB JPEG (quality 90), size x size
    DIR/images.txt  classes.txt  image_class_labels.txt  train_test_split.txt  bounding_boxes.txt
    DIR/parts/parts.txt  parts/part_locs.txt                    CUB's own 15 parts, same ids
    DIR/synthetic_cub.json                                      the options and the class table
    DIR/synthetic_params.jsonl                                  per image: patterns, colours, pose

Each image holds one small "bird" (tail, body, wing, head, beak, eye, legs; random position,
size, heading, facing side and head tilt) on a cluttered background of random shapes, textures,
a perch and distractor blobs drawn in the birds' own colours (by default half of them also in the
birds' fine patterns: `--patterned-distractors`). The colours are random
and carry no class information: the class is the pair (crown pattern, wing pattern), each one of
plain / barred / spotted / chequered / streaked, drawn with a period of about 3.3 px
(`--pattern-period`). That detail is readable in a full-resolution crop around the bird and washes
out when the whole image is downscaled 2x (period ~1.65 px, under the 2 px Nyquist limit) -- the
gap attention can win. The bird itself (its outline, beak, eye) stays visible at low resolution,
so a localisation network can find it there.

Parts use CUB's 15 names and ids so evaluation code written for CUB works unchanged; the parts
of the far side of the bird (its hidden eye, wing and leg) are invisible (`0.0 0.0 0`), as in CUB.
The class detail sits at `crown` (head) and at the visible `left/right wing` (body).

Deterministic: image i is drawn from its own generator seeded by (seed, i), so the same options
give byte-identical files (given the same Pillow/libjpeg build).
"""
from __future__ import annotations

import argparse
import colorsys
import io
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from . import DataPrepError

GENERATOR_VERSION = 1
MANIFEST_NAME = "synthetic_cub.json"

# CUB-200-2011's parts/parts.txt, ids 1..15 in this order.
PART_NAMES = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
    "nape", "right eye", "right leg", "right wing", "tail", "throat",
)
PATTERNS = ("plain", "stripes", "dots", "checks", "streaks")
PATTERN_WORDS = {"plain": "Plain", "stripes": "Barred", "dots": "Spotted", "checks": "Chequered",
                 "streaks": "Streaked"}
MAX_CLASSES = len(PATTERNS) ** 2

SUPERSAMPLE = 2  # draw at 2x and box-filter down: antialiased edges and patterns
# Pattern period in output pixels (each bird's is drawn within +-9% of it). Fixed in pixels, not
# scaled with the image: the detail stays near the finest resolvable scale at any --size.
PATTERN_PERIOD_PX = 3.3
PERIOD_JITTER = 0.09
BODY_SEMI_AXIS = (0.085, 0.12)  # body half-length as a fraction of the image size
MIN_SIZE, MAX_SIZE = 64, 1024


@dataclass(frozen=True)
class SyntheticCubOptions:
    classes: int = 9
    images_per_class: int = 60
    size: int = 128
    seed: int = 0
    test_fraction: float = 0.5
    jpeg_quality: int = 90
    pattern_period: float = PATTERN_PERIOD_PX
    bird_size: float = 1.0  # multiplies the body length range (BODY_SEMI_AXIS)
    patterned_distractors: float = 0.5  # chance that a distractor blob wears a bird's fine pattern

    @property
    def test_images_per_class(self) -> int:
        return int(self.images_per_class * self.test_fraction + 0.5)  # half up, not Python's half-to-even

    def validate(self) -> None:
        checks = [
            (1 <= self.classes <= MAX_CLASSES, "classes", f"1..{MAX_CLASSES}", self.classes),
            (self.images_per_class >= 1, "images_per_class", ">= 1", self.images_per_class),
            (MIN_SIZE <= self.size <= MAX_SIZE, "size", f"{MIN_SIZE}..{MAX_SIZE}", self.size),
            (0.0 <= self.test_fraction < 1.0, "test_fraction", "in [0, 1)", self.test_fraction),
            (50 <= self.jpeg_quality <= 100, "jpeg_quality", "50..100", self.jpeg_quality),
            (self.seed >= 0, "seed", ">= 0", self.seed),
            (2.0 <= self.pattern_period <= self.size / 8, "pattern_period", f"2.0..{self.size / 8:g} (size/8)",
             self.pattern_period),
            (0.5 <= self.bird_size <= 2.0, "bird_size", "0.5..2.0", self.bird_size),
            (0.0 <= self.patterned_distractors <= 1.0, "patterned_distractors", "in [0, 1]",
             self.patterned_distractors),
        ]
        for ok, key, expected, value in checks:
            if not ok:
                raise DataPrepError(f"synthetic-cub: {key}={value!r} must be {expected}")


@dataclass(frozen=True)
class BirdClass:
    head: str  # crown pattern
    wing: str  # wing pattern

    @property
    def name(self) -> str:
        return f"{PATTERN_WORDS[self.head]}_crowned_{PATTERN_WORDS[self.wing]}_winged_Finch"


def bird_classes(count: int) -> List[BirdClass]:
    """The first `count` (crown, wing) pattern pairs, grown as squares: 4 -> 2x2, 9 -> 3x3."""
    if not 1 <= count <= MAX_CLASSES:
        raise DataPrepError(f"synthetic-cub: classes={count} must be 1..{MAX_CLASSES}")
    pairs = sorted(itertools.product(range(len(PATTERNS)), repeat=2), key=lambda hw: (max(hw), hw))
    return [BirdClass(PATTERNS[h], PATTERNS[w]) for h, w in pairs[:count]]


@dataclass
class BirdSample:
    """One drawn image and its annotations, in output pixels (top-left origin, CUB's convention)."""

    image: np.ndarray  # (size, size, 3) uint8
    bbox: Tuple[float, float, float, float]  # x, y, w, h
    parts: List[Tuple[float, float, int]]  # 15 x (x, y, visible), CUB part order
    params: Dict[str, object]  # what the generator chose: patterns, pose, colours


# ---------------------------------------------------------------- drawing helpers (numpy)

class _Frame:
    """Local bird coordinates: u forward (towards the beak), v up (towards the back)."""

    def __init__(self, centre: Tuple[float, float], heading: float, facing: int):
        self.c = np.array(centre, dtype=np.float64)
        self.f = np.array([math.cos(heading), math.sin(heading)])
        # image y points down; the bird stays upright whichever side it faces
        self.up = facing * np.array([self.f[1], -self.f[0]])

    def to_image(self, u: float, v: float) -> Tuple[float, float]:
        p = self.c + u * self.f + v * self.up
        return float(p[0]), float(p[1])

    def to_local(self, x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        dx, dy = x - self.c[0], y - self.c[1]
        return dx * self.f[0] + dy * self.f[1], dx * self.up[0] + dy * self.up[1]


def _ellipse(u, v, cu, cv, au, av, angle=0.0):
    cos, sin = math.cos(angle), math.sin(angle)
    du, dv = u - cu, v - cv
    pu, pv = du * cos + dv * sin, -du * sin + dv * cos
    return (pu / au) ** 2 + (pv / av) ** 2 <= 1.0


def _triangle(u, v, a, b, c):
    def side(p, q):
        return (q[0] - p[0]) * (v - p[1]) - (q[1] - p[1]) * (u - p[0])

    s1, s2, s3 = side(a, b), side(b, c), side(c, a)
    return ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))


def _segment(u, v, p, q, half_width):
    pu, pv = u - p[0], v - p[1]
    du, dv = q[0] - p[0], q[1] - p[1]
    t = np.clip((pu * du + pv * dv) / (du * du + dv * dv), 0.0, 1.0)
    return (pu - t * du) ** 2 + (pv - t * dv) ** 2 <= half_width ** 2


def pattern_mask(kind: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Where the pattern colour goes, in the part's own coordinates (it turns with the bird)."""
    if kind == "plain":
        return np.zeros(np.shape(u), dtype=bool)
    if kind == "stripes":  # bars across the bird's axis
        return (u / period) % 1.0 < 0.5
    if kind == "streaks":  # lines along the bird's axis
        return (v / period) % 1.0 < 0.5
    if kind == "checks":
        cell = period / 2
        return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    if kind == "dots":  # staggered rows, dot diameter ~0.6 period
        row_shift = (np.floor(v / period) % 2) * (period / 2)
        du = (u + row_shift) % period - period / 2
        dv = v % period - period / 2
        return du * du + dv * dv < (0.3 * period) ** 2
    raise ValueError(f"unknown pattern '{kind}'")


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _random_colour(rng: np.random.Generator, value=(0.3, 0.95), saturation=(0.15, 0.9)) -> np.ndarray:
    h = rng.uniform()
    s = rng.uniform(*saturation)
    v = rng.uniform(*value)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _contrasting(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A pattern colour far in luminance from `base`: JPEG's 4:2:0 chroma would blur a hue-only one."""
    if _luminance(base) > 120:
        return _random_colour(rng, value=(0.05, 0.3))
    return _random_colour(rng, value=(0.8, 1.0), saturation=(0.0, 0.5))


class _View:
    """Part of a supersampled RGB float image; x, y are its pixel centres in output pixels."""

    def __init__(self, rgb: np.ndarray, x: np.ndarray, y: np.ndarray):
        self.rgb, self.x, self.y = rgb, x, y

    def rotated(self, cx: float, cy: float, angle: float) -> Tuple[np.ndarray, np.ndarray]:
        dx, dy = self.x - cx, self.y - cy
        cos, sin = math.cos(angle), math.sin(angle)
        return dx * cos + dy * sin, -dx * sin + dy * cos

    def paint(self, mask: np.ndarray, colour: np.ndarray) -> None:
        self.rgb[mask] = colour

    def paint_patterned(self, mask, u, v, base, kind, period, ink) -> None:
        self.rgb[mask] = base
        self.rgb[mask & pattern_mask(kind, u, v, period)] = ink


class _Canvas(_View):
    """The whole image, drawn at SUPERSAMPLE x the output size (edges and patterns come out
    antialiased when it is box-filtered down); shapes are drawn in windows around them."""

    def __init__(self, size: int):
        self.size = size
        n = size * SUPERSAMPLE
        centres = (np.arange(n) + 0.5) / SUPERSAMPLE
        x, y = np.meshgrid(centres, centres)
        super().__init__(np.zeros((n, n, 3)), x, y)

    def window(self, x0: float, y0: float, x1: float, y1: float) -> Tuple[slice, slice]:
        n = self.size * SUPERSAMPLE
        c0, r0 = (int(np.clip(math.floor(t * SUPERSAMPLE), 0, n)) for t in (x0, y0))
        c1, r1 = (int(np.clip(math.ceil(t * SUPERSAMPLE), 0, n)) for t in (x1, y1))
        return slice(r0, r1), slice(c0, c1)

    def view(self, x0: float, y0: float, x1: float, y1: float) -> _View:
        rows, cols = self.window(x0, y0, x1, y1)
        return _View(self.rgb[rows, cols], self.x[rows, cols], self.y[rows, cols])

    def output(self) -> np.ndarray:
        n = self.size
        return self.rgb.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE, 3).mean(axis=(1, 3))


# ---------------------------------------------------------------- the scene

@dataclass
class _Bird:
    frame: _Frame
    a: float  # body half-length (px)
    head_tilt: float
    tail_angle: float
    facing: int

    # the bird's geometry in local coordinates, in units of px; one place for drawing and parts
    @property
    def b(self) -> float:
        return 0.62 * self.a

    @property
    def head_centre(self) -> Tuple[float, float]:
        return 0.92 * self.a, 0.55 * self.a

    @property
    def head_radius(self) -> float:
        return 0.62 * self.a

    def head_dirs(self):
        t = self.head_tilt
        return np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])

    def on_head(self, forward: float, up: float) -> Tuple[float, float]:
        d, n = self.head_dirs()
        h = np.array(self.head_centre) + self.head_radius * (forward * d + up * n)
        return float(h[0]), float(h[1])

    def beak(self):
        return self.on_head(0.8, 0.28), self.on_head(0.8, -0.28), self.on_head(1.75, -0.05)

    def tail(self):
        a, t = self.a, self.tail_angle
        root = np.array([-0.7 * a, 0.0])

        def turned(u, v):
            q = np.array([u, v]) - root
            return tuple(root + [q[0] * math.cos(t) - q[1] * math.sin(t),
                                 q[0] * math.sin(t) + q[1] * math.cos(t)])

        return turned(-0.7 * a, 0.25 * a), turned(-0.7 * a, -0.25 * a), turned(-1.8 * a, 0.0)

    def wing(self):  # centre, semi-axes, angle: tip slanting back and down
        return (-0.15 * self.a, 0.12 * self.a), (0.8 * self.a, 0.42 * self.a), 0.18

    def legs(self):
        a, b = self.a, self.b
        hips = ((0.18 * a, -0.8 * b), (-0.08 * a, -0.8 * b))
        return [(hip, (hip[0] + 0.05 * a, -b - 0.55 * a)) for hip in hips]

    def outline_points(self) -> List[Tuple[float, float]]:
        """Local points whose image positions bound the whole bird (for placement)."""
        a, b = self.a, self.b
        pts = [(a * math.cos(t), b * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 16)]
        hc, r = self.head_centre, self.head_radius
        pts += [(hc[0] + r * math.cos(t), hc[1] + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 16)]
        pts += list(self.beak()) + list(self.tail()) + [foot for _, foot in self.legs()]
        return pts

    def extent(self) -> Tuple[np.ndarray, np.ndarray]:
        """Top-left and bottom-right corners (image pixels) of a box holding the whole bird."""
        pts = np.array([self.frame.to_image(u, v) for u, v in self.outline_points()])
        return pts.min(axis=0), pts.max(axis=0)

    def part_locations(self) -> List[Tuple[float, float, int]]:
        """CUB's 15 parts in image pixels; the far side's eye, wing and leg are hidden."""
        a, b = self.a, self.b
        beak = np.mean(self.beak(), axis=0)
        tail = np.mean(self.tail(), axis=0)
        wing_centre = self.wing()[0]
        near_leg = self.legs()[0]
        leg = ((near_leg[0][0] + near_leg[1][0]) / 2, (near_leg[0][1] + near_leg[1][1]) / 2)
        eye = self.on_head(0.3, 0.2)
        near = "right" if self.facing > 0 else "left"  # facing right shows the bird's right side
        local = {
            "back": (-0.35 * a, 0.7 * b),
            "beak": tuple(beak),
            "belly": (-0.05 * a, -0.65 * b),
            "breast": (0.6 * a, -0.35 * b),
            "crown": self.on_head(-0.05, 0.6),
            "forehead": self.on_head(0.5, 0.45),
            f"{near} eye": eye,
            f"{near} leg": leg,
            f"{near} wing": wing_centre,
            "nape": self.on_head(-0.55, 0.3),
            "tail": tuple(tail),
            "throat": self.on_head(0.35, -0.55),
        }
        out = []
        for name in PART_NAMES:
            if name in local:
                x, y = self.frame.to_image(*local[name])
                out.append((x, y, 1))
            else:
                out.append((0.0, 0.0, 0))
        return out


def _place_bird(rng: np.random.Generator, size: int, bird_size: float = 1.0) -> _Bird:
    a = rng.uniform(*BODY_SEMI_AXIS) * size * bird_size
    facing = 1 if rng.uniform() < 0.5 else -1
    heading = rng.uniform(-0.7, 0.7) + (0.0 if facing > 0 else math.pi)
    bird = _Bird(_Frame((0.0, 0.0), heading, facing), a, head_tilt=rng.uniform(-0.35, 0.45),
                 tail_angle=rng.uniform(-0.3, 0.35), facing=facing)
    lo, hi = bird.extent()
    margin = 2.0
    cx = rng.uniform(margin - lo[0], size - margin - hi[0])
    cy = rng.uniform(margin - lo[1], size - margin - hi[1])
    bird.frame = _Frame((cx, cy), heading, facing)
    return bird


def _draw_background(rng: np.random.Generator, size: int) -> Image.Image:
    """Gradient, big shapes, a few coarse textures: clutter with no fine detail of its own."""
    n = size * SUPERSAMPLE
    top, bottom = _random_colour(rng), _random_colour(rng)
    ramp = np.linspace(0.0, 1.0, n)[:, None, None]
    grad = (top * (1 - ramp) + bottom * ramp) * np.ones((1, n, 1))
    img = Image.fromarray(grad.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(5, 11)):
        colour = tuple(int(c) for c in _random_colour(rng, value=(0.2, 0.95)))
        x0, y0 = rng.uniform(-0.2 * n, n, size=2)
        w, h = rng.uniform(0.1 * n, 0.6 * n, size=2)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            pts = [(float(x0 + rng.uniform(0, w)), float(y0 + rng.uniform(0, h))) for _ in range(rng.integers(3, 6))]
            draw.polygon(pts, fill=colour)
    for _ in range(rng.integers(1, 4)):  # twigs and leaf veins
        colour = tuple(int(c) for c in _random_colour(rng, value=(0.15, 0.6), saturation=(0.2, 0.7)))
        p = rng.uniform(0, n, size=4)
        draw.line([float(p[0]), float(p[1]), float(p[2]), float(p[3])], fill=colour,
                  width=int(rng.integers(1, 4) * SUPERSAMPLE))
    return img


def _draw_coarse_texture(rng, canvas: _Canvas) -> None:
    """Patches of stripes/dots 2-4x coarser than the birds': texture a low-res view still sees."""
    size = canvas.size
    for _ in range(rng.integers(0, 3)):
        cx, cy = rng.uniform(0, size, size=2)
        ru, rv = rng.uniform(0.08, 0.25, size=2) * size
        ang = rng.uniform(0, math.pi)
        reach = max(ru, rv)
        view = canvas.view(cx - reach, cy - reach, cx + reach, cy + reach)
        u, v = view.rotated(cx, cy, ang)
        base = _random_colour(rng)
        view.paint_patterned(_ellipse(u, v, 0, 0, ru, rv), u, v, base, str(rng.choice(PATTERNS[1:])),
                             rng.uniform(7.0, 14.0), _contrasting(rng, base))


def _jittered(rng: np.random.Generator, period: float) -> float:
    return period * rng.uniform(1 - PERIOD_JITTER, 1 + PERIOD_JITTER)


def _draw_distractors(rng, canvas: _Canvas, bird: _Bird, keep_off: Tuple[np.ndarray, np.ndarray],
                      period: float, patterned: float = 0.5) -> int:
    """Bird-sized blobs in bird colours, kept off the bird; each wears one of the birds' fine patterns
    with chance `patterned`."""
    size, a = canvas.size, bird.a
    (x0, y0), (x1, y1) = keep_off
    drawn = 0
    for _ in range(rng.integers(2, 6)):
        for _try in range(20):
            r = rng.uniform(0.5, 1.1) * a
            cx, cy = rng.uniform(r, size - r, size=2)
            if cx + r < x0 - 2 or cx - r > x1 + 2 or cy + r < y0 - 2 or cy - r > y1 + 2:
                break
        else:
            continue
        view = canvas.view(cx - r, cy - r, cx + r, cy + r)
        u, v = view.rotated(cx, cy, rng.uniform(0, 2 * math.pi))
        inside = _ellipse(u, v, 0, 0, r, r * rng.uniform(0.5, 1.0))
        base = _random_colour(rng)
        kind = str(rng.choice(PATTERNS)) if rng.uniform() < patterned else "plain"
        view.paint_patterned(inside, u, v, base, kind, _jittered(rng, period), _contrasting(rng, base))
        drawn += 1
    return drawn


def _draw_bird(rng, canvas: _Canvas, bird: _Bird, cls: BirdClass, period: float) -> Tuple[np.ndarray, Dict]:
    """Paint the bird; return its silhouette (supersampled, whole canvas) and the chosen colours."""
    (x0, y0), (x1, y1) = bird.extent()
    rows, cols = canvas.window(x0 - 1, y0 - 1, x1 + 1, y1 + 1)
    view = _View(canvas.rgb[rows, cols], canvas.x[rows, cols], canvas.y[rows, cols])
    u, v = bird.frame.to_local(view.x, view.y)
    a, b = bird.a, bird.b
    body = _random_colour(rng)
    head = body if rng.uniform() < 0.4 else _random_colour(rng)
    wing = np.clip(body * rng.uniform(0.55, 0.9), 0, 255) if rng.uniform() < 0.5 else _random_colour(rng)
    head_ink, wing_ink = _contrasting(rng, head), _contrasting(rng, wing)
    beak = _random_colour(rng, value=(0.2, 0.95), saturation=(0.0, 1.0))
    legs = _random_colour(rng, value=(0.1, 0.4), saturation=(0.0, 0.5))
    head_period, wing_period = _jittered(rng, period), _jittered(rng, period)
    phase = rng.uniform(0, 10, size=4)  # pattern offsets, so stripes don't always start at a part's centre

    silhouette = np.zeros(canvas.x.shape, dtype=bool)
    inside = silhouette[rows, cols]

    def add(mask):
        inside[:] |= mask
        return mask

    # back to front: legs, tail, body, wing, head, beak, eye
    leg_w = max(0.07 * a, 0.5)
    for hip, foot in bird.legs():
        view.paint(add(_segment(u, v, hip, foot, leg_w)), legs)
    view.paint(add(_triangle(u, v, *bird.tail())), wing)
    view.paint(add(_ellipse(u, v, 0.0, 0.0, a, b)), body)
    (wu, wv), (wa, wb), wang = bird.wing()
    wing_mask = add(_ellipse(u, v, wu, wv, wa, wb, wang))
    view.paint_patterned(wing_mask, u - wu + phase[0], v - wv + phase[1], wing, cls.wing, wing_period, wing_ink)
    hc, r = bird.head_centre, bird.head_radius
    d, n = bird.head_dirs()
    hu, hv = (u - hc[0]) * d[0] + (v - hc[1]) * d[1], (u - hc[0]) * n[0] + (v - hc[1]) * n[1]
    head_mask = add(hu ** 2 + hv ** 2 <= r ** 2)
    view.paint_patterned(head_mask, hu + phase[2], hv + phase[3], head, cls.head, head_period, head_ink)
    view.paint(add(_triangle(u, v, *bird.beak())), beak)
    eye = bird.on_head(0.3, 0.2)
    view.paint((u - eye[0]) ** 2 + (v - eye[1]) ** 2 <= (0.2 * r) ** 2, np.array([10.0, 10.0, 10.0]))
    params = {"head_pattern": cls.head, "wing_pattern": cls.wing,
              "head_period": round(float(head_period), 3), "wing_period": round(float(wing_period), 3),
              "body_colour": [round(float(c)) for c in body], "head_colour": [round(float(c)) for c in head],
              "wing_colour": [round(float(c)) for c in wing]}
    return silhouette, params


def _box_of(silhouette: np.ndarray, size: int) -> Tuple[float, float, float, float]:
    """Tight box of the output pixels at least half covered by the bird: x, y, w, h."""
    cover = silhouette.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3)) >= 0.5
    rows, cols = np.flatnonzero(cover.any(axis=1)), np.flatnonzero(cover.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)


def draw_bird_image(cls: BirdClass, size: int, rng: np.random.Generator,
                    pattern_period: float = PATTERN_PERIOD_PX, bird_size: float = 1.0,
                    patterned_distractors: float = 0.5) -> BirdSample:
    """One image of a bird of class `cls`, drawn from `rng` (the whole scene comes from it)."""
    bird = _place_bird(rng, size, bird_size)
    canvas = _Canvas(size)
    canvas.rgb[:] = np.asarray(_draw_background(rng, size), dtype=np.float64)
    _draw_coarse_texture(rng, canvas)
    # the perch passes just under the near foot
    foot = np.array(bird.frame.to_image(*bird.legs()[0][1])) + [0.0, 1.0]
    angle = rng.uniform(-0.5, 0.5)
    reach = 2 * size * np.array([math.cos(angle), math.sin(angle)])
    n = size * SUPERSAMPLE
    perch = Image.new("L", (n, n))
    ImageDraw.Draw(perch).line([tuple(SUPERSAMPLE * (foot - reach)), tuple(SUPERSAMPLE * (foot + reach))],
                               fill=255, width=int(round(SUPERSAMPLE * rng.uniform(1.5, 4.0))))
    canvas.paint(np.asarray(perch) > 0, _random_colour(rng, value=(0.15, 0.5), saturation=(0.3, 0.7)))
    distractors = _draw_distractors(rng, canvas, bird, bird.extent(), pattern_period, patterned_distractors)
    silhouette, params = _draw_bird(rng, canvas, bird, cls, pattern_period)

    image = canvas.output() + rng.normal(0.0, 3.0, size=(size, size, 3))  # sensor noise
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    box = _box_of(silhouette, size)
    x, y, w, h = box
    parts = [(min(max(px, x), x + w), min(max(py, y), y + h), vis) if vis else (px, py, vis)
             for px, py, vis in bird.part_locations()]
    params.update({"centre": [round(c, 2) for c in map(float, bird.frame.c)], "body_half_length": round(bird.a, 2),
                   "facing": "right" if bird.facing > 0 else "left", "distractors": distractors})
    return BirdSample(image=image, bbox=box, parts=parts, params=params)


# ---------------------------------------------------------------- the dataset on disk

def image_rng(seed: int, index: int) -> np.random.Generator:
    """Image `index`'s own generator: images don't depend on each other or on the class count."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


def _split_flags(options: SyntheticCubOptions) -> List[int]:
    """1 = train, per image in id order; each class gets the same number of test images."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([options.seed, 2 ** 31])))
    m = options.images_per_class
    n_test = options.test_images_per_class
    flags: List[int] = []
    for _ in range(options.classes):
        is_test = np.zeros(m, dtype=bool)
        is_test[rng.permutation(m)[:n_test]] = True
        flags += [0 if t else 1 for t in is_test]
    return flags


def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _manifest(options: SyntheticCubOptions, classes: List[BirdClass]) -> Dict:
    return {"generator": "data_prep.synthetic_cub", "generator_version": GENERATOR_VERSION,
            "options": asdict(options),
            "classes": [{"id": i + 1, "name": f"{i + 1:03d}.{c.name}", "head_pattern": c.head,
                         "wing_pattern": c.wing} for i, c in enumerate(classes)],
            "detail_parts": {"head": "crown", "body": "wing"}}


def _write_root(root: Path, options: SyntheticCubOptions, classes: List[BirdClass],
                progress: Optional[Callable[[int], None]]) -> None:
    (root / "parts").mkdir(parents=True)
    split = _split_flags(options)
    images, labels, boxes, part_locs, params = [], [], [], [], []
    image_id = 0
    for class_id, cls in enumerate(classes, start=1):
        folder = f"{class_id:03d}.{cls.name}"
        (root / "images" / folder).mkdir(parents=True)
        for k in range(options.images_per_class):
            image_id += 1
            sample = draw_bird_image(cls, options.size, image_rng(options.seed, image_id), options.pattern_period,
                                     options.bird_size, options.patterned_distractors)
            rel = f"{folder}/{cls.name}_{k + 1:04d}_{image_id}.jpg"
            (root / "images" / rel).write_bytes(_jpeg_bytes(sample.image, options.jpeg_quality))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            boxes.append(f"{image_id} " + " ".join(f"{v:.1f}" for v in sample.bbox))
            part_locs += [f"{image_id} {p} {x:.1f} {y:.1f} {vis}"
                          for p, (x, y, vis) in enumerate(sample.parts, start=1)]
            params.append(json.dumps({"id": image_id, "class_id": class_id, **sample.params}, sort_keys=True))
            if progress is not None:
                progress(1)
    _write_lines(root / "images.txt", images)
    _write_lines(root / "classes.txt", [f"{i} {i:03d}.{c.name}" for i, c in enumerate(classes, start=1)])
    _write_lines(root / "image_class_labels.txt", labels)
    _write_lines(root / "train_test_split.txt", [f"{i} {flag}" for i, flag in enumerate(split, start=1)])
    _write_lines(root / "bounding_boxes.txt", boxes)
    _write_lines(root / "parts" / "parts.txt", [f"{i} {name}" for i, name in enumerate(PART_NAMES, start=1)])
    _write_lines(root / "parts" / "part_locs.txt", part_locs)
    _write_lines(root / "synthetic_params.jsonl", params)
    (root / MANIFEST_NAME).write_text(json.dumps(_manifest(options, classes), indent=1, sort_keys=True) + "\n")


def generate(out: str | Path, classes: int = 9, images_per_class: int = 60, size: int = 128,
             seed: int = 0, test_fraction: float = 0.5, jpeg_quality: int = 90,
             pattern_period: float = PATTERN_PERIOD_PX, bird_size: float = 1.0, patterned_distractors: float = 0.5,
             overwrite: bool = False, progress: Optional[Callable[[int], None]] = None) -> Path:
    """Write the synthetic CUB root at `out` and return it.

    `progress(n)` is called after every n images drawn (e.g. a tqdm bar's `update`).

    The root appears complete or not at all (drawn in a hidden sibling folder, then renamed). An
    existing root made with the same options is kept as it is (reruns of `make demo` are free);
    one made with other options, or any other non-empty folder, is refused unless `overwrite`.
    """
    options = SyntheticCubOptions(classes=classes, images_per_class=images_per_class, size=size, seed=seed,
                                  test_fraction=test_fraction, jpeg_quality=jpeg_quality,
                                  pattern_period=pattern_period, bird_size=bird_size,
                                  patterned_distractors=patterned_distractors)
    options.validate()
    out = Path(out)
    bird_list = bird_classes(options.classes)
    if is_generated(out, options):
        return out
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        what = "a synthetic-cub root made with other options" if (out / MANIFEST_NAME).is_file() else "other files"
        raise DataPrepError(f"synthetic-cub: --out {out} already holds {what}; "
                            "choose another folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        _write_root(tmp, options, bird_list, progress)
        if out.exists():  # move the old root aside first, so `out` is never half-made
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, old):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover.exists():
                leftover.unlink()
    return out


def is_generated(out: str | Path, options: SyntheticCubOptions) -> bool:
    """Whether `out` already holds the root these options (and this generator version) make."""
    manifest = Path(out) / MANIFEST_NAME
    try:
        made = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(made, dict) or not isinstance(made.get("options"), dict):
        return False
    # an option added later was drawn at its default by the roots made before it
    made_options = {**asdict(SyntheticCubOptions()), **made["options"]}
    return made_options == asdict(options) and made.get("generator_version") == GENERATOR_VERSION


# ---------------------------------------------------------------- contact sheet

def contact_sheet(path: str | Path, classes: int = 9, size: int = 128, seed: int = 0,
                  crop: Optional[int] = None, pattern_period: float = PATTERN_PERIOD_PX,
                  bird_size: float = 1.0, patterned_distractors: float = 0.5) -> Path:
    """PNG, one image per class: the image with its bird box | the whole image downscaled to the
    crop size (what a baseline at that size sees; shown enlarged) | the full-resolution crop
    around the bird (what attention can get; shown enlarged). 256 colours keep the file small."""
    crop = crop or size // 2
    bird_list = bird_classes(classes)
    label_h, gap = 14, 4
    cell_w = 3 * size + 2 * gap
    cols = min(3, classes)
    rows = math.ceil(classes / cols)
    width = cols * cell_w + (cols - 1) * 3 * gap
    sheet = Image.new("RGB", (width, label_h + rows * (size + label_h + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((0, 0), f"per class: {size}px image + bird box | downscaled to {crop}px | {crop}px full-res crop",
              fill=(0, 0, 0))
    for i, cls in enumerate(bird_list):
        sample = draw_bird_image(cls, size, image_rng(seed, 10_000 + i), pattern_period, bird_size,
                                 patterned_distractors)
        full = Image.open(io.BytesIO(_jpeg_bytes(sample.image, 90))).convert("RGB")
        x, y, w, h = sample.bbox
        boxed = full.copy()
        ImageDraw.Draw(boxed).rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 0, 0))
        small = full.resize((crop, crop), Image.BILINEAR).resize((size, size), Image.NEAREST)
        left = int(round(min(max(x + w / 2 - crop / 2, 0), size - crop)))
        top = int(round(min(max(y + h / 2 - crop / 2, 0), size - crop)))
        zoom = full.crop((left, top, left + crop, top + crop)).resize((size, size), Image.NEAREST)
        ox = (i % cols) * (cell_w + 3 * gap)
        oy = label_h + (i // cols) * (size + label_h + gap)
        draw.text((ox, oy), f"{i + 1}: {PATTERN_WORDS[cls.head]} crown, {PATTERN_WORDS[cls.wing]} wing",
                  fill=(0, 0, 0))
        for j, panel in enumerate((boxed, small, zoom)):
            sheet.paste(panel, (ox + j * (size + gap), oy + label_h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(256, dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)
    return path


# ---------------------------------------------------------------- CLI

def main(argv: Optional[List[str]] = None) -> int:
    defaults = SyntheticCubOptions()
    parser = argparse.ArgumentParser(
        prog="python -m data_prep synthetic-cub",
        description="Draw a fine-grained synthetic bird task in CUB-200-2011's on-disk layout "
                    "(then: python -m data_prep cub --root DIR --out SHARDS).")
    parser.add_argument("--out", required=True, help="root folder to write (CUB_200_2011 layout)")
    parser.add_argument("--classes", type=int, default=defaults.classes,
                        help=f"number of classes, 1..{MAX_CLASSES} (default %(default)s: 3 crown x 3 wing patterns)")
    parser.add_argument("--images-per-class", type=int, default=defaults.images_per_class)
    parser.add_argument("--size", type=int, default=defaults.size, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction,
                        help="fraction of each class marked 0 (test) in train_test_split.txt")
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument("--pattern-period", type=float, default=defaults.pattern_period,
                        help="period of the class-deciding patterns in pixels (default %(default)s: unreadable "
                             "after a 2x downscale; ~5 makes them readable there, an easier task)")
    parser.add_argument("--bird-size", type=float, default=defaults.bird_size,
                        help="scale of the birds (default %(default)s: bodies 8.5-12%% of the image side; the "
                             "demo uses 1.45: bigger patterned parts, learnt from fewer images)")
    parser.add_argument("--patterned-distractors", type=float, default=defaults.patterned_distractors,
                        help="chance that a distractor blob wears a bird's fine pattern (default %(default)s; "
                             "the demo uses 0: look-alike texture draws a localiser trained from scratch off the bird)")
    parser.add_argument("--overwrite", action="store_true", help="replace a root made with other options")
    parser.add_argument("--sheet", metavar="PNG", help="also write a contact sheet of one image per class")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    options = SyntheticCubOptions(classes=args.classes, images_per_class=args.images_per_class, size=args.size,
                                  seed=args.seed, test_fraction=args.test_fraction,
                                  jpeg_quality=args.jpeg_quality, pattern_period=args.pattern_period,
                                  bird_size=args.bird_size, patterned_distractors=args.patterned_distractors)
    options.validate()
    state = "up to date:" if is_generated(args.out, options) else "wrote"
    with tqdm(total=options.classes * options.images_per_class, desc="synthetic-cub", unit="img",
              disable=None) as bar:  # disable=None: a bar only on a terminal, not in CI logs
        root = generate(args.out, overwrite=args.overwrite, progress=bar.update, **asdict(options))
    total = options.classes * options.images_per_class
    n_test = options.classes * options.test_images_per_class
    print(f"synthetic-cub: {state} {root} ({total} images, {args.classes} classes, "
          f"{total - n_test} train / {n_test} test, {args.size}px) in {time.perf_counter() - start:.1f}s")
    if args.sheet:
        sheet = contact_sheet(args.sheet, args.classes, args.size, args.seed, pattern_period=args.pattern_period,
                              bird_size=args.bird_size, patterned_distractors=args.patterned_distractors)
        print(f"synthetic-cub: contact sheet {sheet}")
    return 0
