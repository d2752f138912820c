"""Evaluation metrics as pure functions on tensors, plus sums that add up across batches and ranks.

Boxes are attention windows (B, N, 4) = [x0, y0, x1, y1] in the network input's normalised
coordinates ([-1, 1], as F.affine_grid with align_corners=False); the image is [-1, 1]^2.
Everything that is averaged is first summed (`WindowSums`, `PartHitSums`), so the sums of all
ranks can be all-reduced and divided once: the result does not depend on how samples were split.
"""
from __future__ import annotations

from itertools import combinations
from typing import Dict, List, Sequence, Tuple

import torch

PAD_DIGIT = 10  # sequence targets: the "no digit" class padding a sequence to its fixed length


# ----- task metrics ------------------------------------------------------------------------------

def top1_correct(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """Number of rows of (B, C) logits whose arg-max is the (B,) target."""
    return int((logits.argmax(dim=-1) == targets).sum())


def sequence_correct(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[int, int, int]:
    """(correct digits, number of digits, correct sequences) of (B, L, 11) logits against (B, L) targets.

    Digits are the target's real positions (not the padding); a sequence counts as correct when
    every position matches, padding included, i.e. the predicted length is right too (the
    paper's sequence error is 1 - correct sequences / B).
    """
    pred = logits.argmax(dim=-1)
    real = targets != PAD_DIGIT
    digit_ok = (pred == targets) & real
    return int(digit_ok.sum()), int(real.sum()), int((pred == targets).all(dim=1).sum())


# ----- window geometry ---------------------------------------------------------------------------

def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise intersection area of boxes a and b (same shape (..., 4))."""
    lo = torch.maximum(a[..., :2], b[..., :2])
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    return (hi - lo).clamp(min=0).prod(dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of boxes a and b (same shape (..., 4)); 0 where both are empty."""
    inter = box_intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def outside_fraction(boxes: torch.Tensor) -> torch.Tensor:
    """Fraction of each window's area that lies outside the image [-1, 1]^2 (0 for empty windows)."""
    image = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=boxes.dtype, device=boxes.device).expand_as(boxes)
    area = box_area(boxes)
    inside = box_intersection(boxes, image)
    return torch.where(area > 0, 1.0 - inside / area.clamp(min=1e-12), torch.zeros_like(area))


def contains(boxes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(B, N, P) bool: does window n of image b contain point p? boxes (B, N, 4), points (B, P, 2)."""
    x, y = points[:, None, :, 0], points[:, None, :, 1]
    b = boxes[:, :, None, :]
    return (x >= b[..., 0]) & (x <= b[..., 2]) & (y >= b[..., 1]) & (y <= b[..., 3])


# ----- sums over batches and ranks ---------------------------------------------------------------

class Sums:
    """Named float sums with a fixed key order, so ranks can all-reduce them as one vector."""

    def __init__(self, keys: Sequence[str]):
        self.values: Dict[str, float] = {key: 0.0 for key in keys}

    def add(self, key: str, value) -> None:
        self.values[key] += float(value)

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(list(self.values.values()), dtype=torch.float64)

    def load_tensor(self, tensor: torch.Tensor) -> None:
        self.values = dict(zip(self.values, tensor.tolist()))


class WindowSums(Sums):
    """Per-stream window statistics: mean centre, spread (std of centres), size, overlap, outside."""

    FIELDS = ("cx", "cy", "cx2", "cy2", "width", "height", "outside")

    def __init__(self, num_streams: int):
        self.num_streams = num_streams
        self.pairs = list(combinations(range(num_streams), 2))
        keys = ["count"] + [f"{n}/{f}" for n in range(num_streams) for f in self.FIELDS]
        super().__init__(keys + [f"iou/{i}-{j}" for i, j in self.pairs])

    def update(self, boxes: torch.Tensor) -> None:
        boxes = boxes.detach().double().cpu()
        cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
        columns = {"cx": cx, "cy": cy, "cx2": cx ** 2, "cy2": cy ** 2, "width": boxes[..., 2] - boxes[..., 0],
                   "height": boxes[..., 3] - boxes[..., 1], "outside": outside_fraction(boxes)}
        self.add("count", boxes.shape[0])
        for n in range(self.num_streams):
            for name, column in columns.items():
                self.add(f"{n}/{name}", column[:, n].sum())
        for i, j in self.pairs:
            self.add(f"iou/{i}-{j}", box_iou(boxes[:, i], boxes[:, j]).sum())

    def result(self) -> Dict[str, object]:
        v, count = self.values, max(self.values["count"], 1.0)
        streams = []
        for n in range(self.num_streams):
            mean = {f: v[f"{n}/{f}"] / count for f in self.FIELDS}
            streams.append({
                "center_x": mean["cx"], "center_y": mean["cy"],
                "spread_x": max(mean["cx2"] - mean["cx"] ** 2, 0.0) ** 0.5,
                "spread_y": max(mean["cy2"] - mean["cy"] ** 2, 0.0) ** 0.5,
                "width": mean["width"], "height": mean["height"], "outside": mean["outside"]})
        overlap = {f"{i}-{j}": v[f"iou/{i}-{j}"] / count for i, j in self.pairs}
        return {"streams": streams, "overlap_iou": overlap,
                "mean_overlap_iou": sum(overlap.values()) / len(overlap) if overlap else 0.0}


class PartHitSums(Sums):
    """Per stream and part: how often the window contains the part, among images where it is visible."""

    def __init__(self, num_streams: int, part_names: Sequence[str]):
        self.num_streams, self.part_names = num_streams, list(part_names)
        keys = [f"seen/{p}" for p in self.part_names]
        keys += [f"hit/{n}/{p}" for n in range(num_streams) for p in self.part_names]
        super().__init__(keys)

    def update(self, boxes: torch.Tensor, points: torch.Tensor, visible: torch.Tensor) -> None:
        """boxes (B, N, 4), points (B, P, 2) in the same [-1, 1] coordinates, visible (B, P) bool."""
        boxes, points, visible = boxes.detach().double().cpu(), points.double().cpu(), visible.bool().cpu()
        hits = contains(boxes, points) & visible[:, None, :]
        seen, hit_counts = visible.sum(dim=0), hits.sum(dim=0)
        for p, name in enumerate(self.part_names):
            self.add(f"seen/{name}", seen[p])
            for n in range(self.num_streams):
                self.add(f"hit/{n}/{name}", hit_counts[n, p])

    def result(self) -> List[Dict[str, float]]:
        """One {part: hit rate} per stream; parts never seen are left out."""
        v = self.values
        return [{p: v[f"hit/{n}/{p}"] / v[f"seen/{p}"] for p in self.part_names if v[f"seen/{p}"] > 0}
                for n in range(self.num_streams)]


def flatten(metrics: Dict[str, object], prefix: str = "", sep: str = "/") -> Dict[str, float]:
    """Nested metrics -> {"windows/streams/0/center_x": ...} scalars for TensorBoard and Tune."""
    flat: Dict[str, float] = {}
    items = metrics.items() if isinstance(metrics, dict) else enumerate(metrics)
    for key, value in items:
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, (dict, list, tuple)):
            flat.update(flatten(value, name, sep))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat
