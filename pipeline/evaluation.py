"""Distributed evaluation: every sample of a split scored exactly once, counted against the manifest.

    metrics = evaluate(model, cfg, manifest, "test", device, rank, world_size)
    # {"split": "test", "num_samples": 5794, "num_skipped": 0, "top1": 0.84, "loss": 0.61,
    #  "windows": {...}, "part_hit_rate": [{"beak": 0.9, ...}, ...]}

The model runs in eval mode under the trainer's precision (bf16/fp16 autocast on CUDA; fp32 on
CPU unless train.cpu_autocast). Each rank scores its shards (see build_eval_loader), adds up sums,
and the sums of all ranks are all-reduced once at the end: ranks may score different numbers of
samples without any collective call in the loop, so uneven shards cannot hang it. Every rank
returns the same dict. Part hit-rates count, per part, the images where the part is annotated
visible and lies inside the centre view the model saw.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.config import Config
from pipeline.data import DataError, Manifest, View, build_eval_loader, normalize
from pipeline.metrics import PartHitSums, Sums, WindowSums
from pipeline.tasks import meta_boxes, task_of  # noqa: F401 (meta_boxes: the coloc experiment, its benchmark and tests read it here)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers (their forward would add bookkeeping, not math)."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def _rank_limit(max_samples: Optional[int], rank: int, world_size: int) -> Optional[int]:
    """This rank's share of a global sample cap (shares differ by at most one)."""
    if max_samples is None:
        return None
    return max_samples // world_size + (1 if rank < max_samples % world_size else 0)


def _eval_batch(cfg: Config, world_size: int) -> int:
    """The training micro batch: it fits in memory with gradients, so it fits without them."""
    return cfg.train.micro_batch_size or max(1, cfg.train.global_batch_size // world_size)


def part_points(metas: List[dict], num_parts: int):
    """(B, P, 2) part positions in [-1, 1] input coordinates and (B, P) visibility from eval metas.

    A part counts as visible when annotated visible and inside the centre view the model saw.
    """
    points = np.zeros((len(metas), num_parts, 2))
    visible = np.zeros((len(metas), num_parts), dtype=bool)
    for i, meta in enumerate(metas):
        parts = np.asarray(meta.get("parts") or [], dtype=np.float64).reshape(-1, 3)[:num_parts]
        if not len(parts):
            continue
        xy = View(*meta["view"]).to_normalized(parts[:, :2])
        points[i, : len(xy)] = xy
        visible[i, : len(xy)] = (parts[:, 2] > 0) & (np.abs(xy) <= 1.0).all(axis=1)
    return torch.from_numpy(points), torch.from_numpy(visible)


class _Scorer:
    """Adds one batch at a time into sums for the task, the windows and the part hits."""

    def __init__(self, task: str, num_streams: int, part_names: List[str]):
        self.task = task_of(task)
        self.sums = Sums(["count", "skipped", "loss", "correct", *self.task.sum_keys])
        self.windows = WindowSums(num_streams) if num_streams else None
        self.parts = PartHitSums(num_streams, part_names) if num_streams and part_names else None

    def add_batch(self, logits: torch.Tensor, targets: torch.Tensor, boxes, metas) -> None:
        self.sums.add("count", len(targets))
        for key, value in self.task.score(logits.float(), targets, boxes, metas).items():
            self.sums.add(key, value)
        if self.windows is not None:
            self.windows.update(boxes)
        if self.parts is not None:
            points, visible = part_points(metas, len(self.parts.part_names))
            self.parts.update(boxes, points, visible)

    def all_sums(self) -> List[Sums]:
        return [s for s in (self.sums, self.windows, self.parts) if s is not None]

    def all_reduce(self, device: torch.device, group=None) -> None:
        """Sum every rank's sums (one collective call) when a process group is running."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        parts = self.all_sums()
        vector = torch.cat([s.to_tensor() for s in parts])
        vector = vector.to(device) if dist.get_backend(group) == "nccl" else vector
        dist.all_reduce(vector, group=group)
        vector, start = vector.cpu(), 0
        for s in parts:
            s.load_tensor(vector[start:start + len(s.values)])
            start += len(s.values)

    def result(self) -> Dict[str, object]:
        v = self.sums.values
        n = max(v["count"], 1.0)
        out: Dict[str, object] = {"loss": v["loss"] / n, **self.task.metrics(v, n)}
        if self.windows is not None:
            out["windows"] = self.windows.result()
        if self.parts is not None:
            out["part_hit_rate"] = self.parts.result()
        return out


def _logits_and_boxes(net: nn.Module, x: torch.Tensor, num_streams: int):
    """Logits and, for attention models, their windows (B, N, 4).

    Models that can classify their own crops (`classify`, the N x ST-CNN) run the localisation
    net once for both; the others are called twice (their localisation nets are small).
    """
    if not num_streams:
        return net(x), None
    attention = net.attend(x)
    logits = net.classify(attention["crops"]) if hasattr(net, "classify") else net(x)
    return logits, attention["boxes"].float()


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, manifest: Manifest, split: str, device, rank: int = 0,
             world_size: int = 1, max_samples: Optional[int] = None, batch_size: Optional[int] = None,
             num_workers: Optional[int] = None, group=None) -> Dict[str, object]:
    """Score `split` with `model` on all ranks; returns the same JSON-able metrics on every rank.

    rank / world_size are the position in `group` (default: the whole process group).

    Raises DataError when the ranks together scored (or skipped as corrupt) a different number
    of samples than the manifest lists, unless max_samples stopped them early.
    """
    from pipeline.precision import autocast, resolve_precision  # the trainer's precision rules, not a copy
    from pipeline.models.normalisation import resolve_normalisation

    resolve_normalisation(cfg)  # no-op after the trainer or load_model; a direct call gets the model's own

    device = torch.device(device)
    precision = resolve_precision(cfg.train.precision, device, cfg.train.cpu_autocast)
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    num_streams = int(getattr(net, "num_streams", 0) or 0) if hasattr(net, "attend") else 0
    task = getattr(net, "task", manifest.task)
    manifest.check_model(task, cfg.model.num_classes)  # on every rank alike, before any collective call
    scorer = _Scorer(task, num_streams, manifest.parts)
    loader = build_eval_loader(cfg, manifest, split, rank, world_size,
                               batch_size or _eval_batch(cfg, world_size),
                               cfg.train.num_workers if num_workers is None else num_workers)
    limit = _rank_limit(max_samples, rank, world_size)
    channels_last = cfg.train.channels_last and device.type == "cuda"
    start = time.perf_counter()
    try:
        for images, targets, metas in loader:
            if limit is not None:
                room = limit - int(scorer.sums.values["count"])
                if room <= 0:
                    break
                images, targets, metas = images[:room], targets[:room], metas[:room]
            x = normalize(images.to(device, non_blocking=True), cfg.data.mean, cfg.data.std, channels_last)
            with autocast(device, precision):
                logits, boxes = _logits_and_boxes(net, x, num_streams)
            scorer.add_batch(logits, targets.to(device), boxes, metas)
    finally:
        net.train(was_training)
    scorer.sums.add("skipped", loader.num_skipped)
    scorer.all_reduce(device, group)
    counted, skipped = int(scorer.sums.values["count"]), int(scorer.sums.values["skipped"])
    expected = manifest.num_samples(split)
    cut = max_samples is not None and max_samples < expected
    if not cut and counted + skipped != expected:
        raise DataError(f"{manifest.root / 'manifest.json'}: evaluation of split '{split}' on {world_size} rank(s) "
                        f"scored {counted} samples and skipped {skipped}, but the manifest lists {expected}")
    return {"split": split, "num_samples": counted, "num_skipped": skipped, **scorer.result(),
            "seconds": time.perf_counter() - start}
