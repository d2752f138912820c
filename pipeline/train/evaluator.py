"""The trainer's evaluation component: when to evaluate, on which split, the best metric so far,
and the attention pictures. `fit()` asks it (`due`, then `run`); it owns its state (`state_dict`).
`python -m pipeline.evaluate` uses it too (`score`: the metrics alone, no pictures).

    evaluator = Evaluator(cfg, env, manifest, task)
    if evaluator.due(step, final):
        metrics, improved = evaluator.run(model, step, monitor)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from pipeline.config import Config
from pipeline.tasks import task_of
from pipeline.train.checkpoint import rng_state, set_rng_state
from pipeline.train.distributed import DistEnv
from pipeline.train.signals import blocked_in_new_workers
from pipeline.train.viz import attention_picture


class Evaluator:
    def __init__(self, cfg: Config, env: DistEnv, manifest, task: str, split: Optional[str] = None,
                 max_samples: Optional[int] = None):
        """split: default data.eval_split; max_samples: score only the first N (None: all)."""
        self.cfg, self.env, self.manifest = cfg, env, manifest
        self.every, self.split = cfg.train.eval_every, split or cfg.data.eval_split
        self.max_samples = max_samples
        self.metric_name = task_of(task).best_metric
        self.best: Optional[float] = None
        self.metrics: Optional[Dict[str, Any]] = None
        self.picture: Optional[Path] = None  # drawn by the latest evaluation, not yet shown in TensorBoard
        self._viz_images: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def due(self, step: int, final: bool) -> bool:
        return step % self.every == 0 or final

    def run(self, model: nn.Module, step: int, monitor, evaluate=None) -> Tuple[Dict[str, Any], bool]:
        """Evaluate (with `evaluate()` when given: the trainer's hook), log to `monitor`, and track the
        best; returns (metrics, whether they are a new best)."""
        self.metrics = evaluate() if evaluate is not None else self.evaluate(model, step)
        if self.picture is not None:
            monitor.add_image("attention", self.picture, step)
            self.picture = None
        value = self.metrics.get(self.metric_name)
        improved = value is not None and (self.best is None or value > self.best)
        if improved:
            self.best = value
        monitor.record(step, self.split, self.metrics)
        monitor.message(f"step {step} {self.split}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in self.metrics.items() if isinstance(v, float) and "/" not in k))
        return self.metrics, improved

    def score(self, model: nn.Module) -> Dict[str, Any]:
        """The split's metrics on every rank (all-reduced over the ranks)."""
        from pipeline.evaluation import evaluate
        return evaluate(model, self.cfg, self.manifest, self.split, self.env.device, self.env.rank,
                        self.env.world_size, self.max_samples)

    def evaluate(self, model: nn.Module, step: int, memory_format=torch.contiguous_format) -> Dict[str, Any]:
        """The split's metrics (`score`), and rank 0's attention picture (`self.picture`)."""
        sync_buffers_from_rank0(model)
        model.eval()
        # Evaluation must not move the training RNGs (loaders draw seeds from them): a resumed run
        # evaluates (and loads picture images) at other moments than an uninterrupted one.
        rngs = rng_state()
        try:
            with blocked_in_new_workers():
                metrics = self.score(model)
            if self.env.is_main and getattr(model, "num_streams", 0) and self.cfg.train.num_viz > 0:
                self.picture = self.draw_attention(model, step, memory_format)
        finally:
            model.train()
            set_rng_state(rngs)
        return metrics

    def draw_attention(self, model: nn.Module, step: int, memory_format=torch.contiguous_format) -> Path:
        """The viz images with each stream's window (legend: stream colours), its crops, and per image
        the true and the predicted class (classification)."""
        from pipeline.data import normalize
        images, targets = self.viz_images()
        d = self.cfg.data
        with torch.no_grad():
            x = normalize(images.to(self.env.device), d.mean, d.std, memory_format == torch.channels_last)
            out = model.attend(x)
            captions = None
            if task_of(getattr(model, "task", "classification")).classifies:
                predicted = model(x).argmax(-1).cpu()
                captions = [f"true: {self.class_name(t)}\npred: {self.class_name(p)}"
                            for t, p in zip(targets.tolist(), predicted.tolist())]
        legend = [f"stream {i}" for i in range(out["boxes"].shape[1])]
        return attention_picture(images, out["boxes"], out["crops"], d.mean, d.std,
                                 Path(self.cfg.run.dir) / "viz" / f"step_{step:07d}.png", captions, legend)

    def class_name(self, index: int) -> str:
        classes = self.manifest.classes
        return classes[index] if 0 <= index < len(classes) else str(index)

    def viz_images(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(images, targets): the first train.num_viz of the evaluation split (the same at every evaluation)."""
        if self._viz_images is None:
            from pipeline.data import build_eval_loader
            loader = build_eval_loader(self.cfg, self.manifest, self.split, rank=0, world_size=1,
                                       batch_size=self.cfg.train.num_viz, num_workers=0)
            images, targets, _ = next(iter(loader))
            self._viz_images = (images[:self.cfg.train.num_viz], targets[:self.cfg.train.num_viz])
        return self._viz_images

    def state_dict(self) -> Dict[str, Any]:
        return {"best_metric": self.best, "metric_name": self.metric_name, "metrics": self.metrics}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.metrics = state["best_metric"], state["metrics"]


def sync_buffers_from_rank0(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics) before an evaluation.

    DDP copies rank 0's buffers to the others at the start of each training forward, and then every
    rank updates its own from its own batch: after the last step they differ. Rank 0's are the ones
    the checkpoint keeps, so without this the metrics logged (and the best checkpoint chosen by
    them) would not be those of the checkpoint (measured: top-1 0.1451 logged, 0.1435 re-evaluated).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    net = model.module if hasattr(model, "module") else model
    for buffer in net.buffers():
        dist.broadcast(buffer, src=0)
