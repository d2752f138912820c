"""The fit loop. `Trainer.fit()` is the outline; each step of it is a named method below.

The Trainer is built whole (data, `Learner`, `Evaluator`, `Checkpointer`, progress); `fit()` restores
or starts the run and loops: a step, then the evaluator, then the checkpointer.

Step numbering: `progress.step` counts optimiser steps done. Evaluation, checkpoint and picture
happen after step s when s is a multiple of their interval, and after the last step.

Determinism (CPU, fixed seeds): the training stream is rebuilt from (train.seed, step) at the start
and after every periodic checkpoint, and every rank's RNG states are saved in the checkpoint, so a
run resumed from a periodic checkpoint sees the same batches and dropout masks as an
uninterrupted one. A checkpoint written on a stop signal sits mid-segment: the resumed run then
draws a fresh stream from (seed, that step), so it trains on other (equally distributed) batches
than an uninterrupted run would have. On CUDA, `grid_sample`'s backward is not deterministic.

Per step, two small synchronisations keep the ranks in agreement: the loss is read back to stop at
the first NaN/inf before anything is written, and a one-int all-reduce on a gloo group tells
every rank whether any of them received a stop signal (so they all checkpoint at the same step).
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.config import Config, ConfigError, per_rank_batch, save_config
from pipeline.data.manifest import DataError
from pipeline.models import build_model
from pipeline.models.normalisation import describe as describe_normalisation, follow_checkpoint, resolve_normalisation
from pipeline.precision import autocast, resolve_precision
from pipeline.tasks import task_of
import pipeline.train.checkpoint as ckpt
from pipeline.train.distributed import DistEnv, any_rank, barrier
from pipeline.train.monitor import Monitor, Window
from pipeline.train.optim import build_optimizer, build_schedule, lrs_by_role
from pipeline.train.signals import Preempted, StopRequest, blocked_in_new_workers
from pipeline.train.evaluator import Evaluator

log = logging.getLogger("pipeline.train")
OnEval = Callable[[int, Dict[str, Any], Optional[Path]], None]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; nothing was written after it."""


def stream_seed(seed: int, step: int) -> int:
    """Seed of the training stream that starts at `step` (distinct for steps below 1,000,003)."""
    return seed * 1_000_003 + step


def task_loss(logits: torch.Tensor, targets: torch.Tensor, task: str = "classification") -> torch.Tensor:
    """The batch mean of the task's loss (pipeline.tasks)."""
    return task_of(task).loss(logits, targets)


def sync_batchnorm(model: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    """train.sync_bn on a distributed CUDA run: batch statistics over all ranks (small per-GPU batches)."""
    if not (cfg.train.sync_bn and env.distributed):
        return model
    if env.device.type == "cuda":
        # timm's converter keeps BatchNormAct2d's activation; torch's would drop it silently.
        return timm_convert_sync_batchnorm(model)
    if env.is_main:
        log.warning("train.sync_bn=true ignored: SyncBatchNorm needs CUDA; each rank keeps its own statistics")
    return model


def wrap_model(model: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    """DDP (when distributed), then torch.compile (when asked); the bare module stays unwrapped."""
    t = cfg.train
    if env.distributed:
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                    bucket_cap_mb=t.ddp_bucket_cap_mb, gradient_as_bucket_view=True)
    if t.compile:
        model = torch.compile(model, mode=t.compile_mode)
    return model


class Learner:
    """The model and what updates it: optimiser, schedule, loss scaler, precision and memory layout,
    built from the config alone (no data); `step(stream)` is one optimiser step over micro batches.
    The DDP equivalence test and the train-step benchmark drive it without a Trainer.

    `model` is the bare module (checkpoints, evaluation); `train_model` its DDP / compiled wrapper."""

    def __init__(self, cfg: Config, env: DistEnv, distortion=None):
        """distortion: data.distortion's fresh batch distortion (None without it)."""
        self.cfg, self.env, self.distortion = cfg, env, distortion
        self.micro_batch, self.accum_steps = per_rank_batch(cfg, env.world_size)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.normalisation = resolve_normalisation(cfg)  # before config.yaml and checkpoints are written: they keep it
        if env.is_main:
            log.info(describe_normalisation(cfg, self.normalisation))
        model = sync_batchnorm(build_model(cfg.model), cfg, env)
        self.task = getattr(model, "task", "classification")
        on_cpu = env.device.type == "cpu"
        self.memory_format = torch.channels_last if cfg.train.channels_last and (not on_cpu or cfg.train.cpu_channels_last) \
            else torch.contiguous_format
        # On the device before the optimiser is built: fused kernels check where the parameters live.
        self.model = model.to(env.device, memory_format=self.memory_format)
        self.optimizer = build_optimizer(self.model, cfg.optim, env.device)
        self.schedule = build_schedule(self.optimizer, cfg.schedule, cfg.train.max_steps, cfg.optim.lr_start)
        self.precision = resolve_precision(cfg.train.precision, env.device, cfg.train.cpu_autocast)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.precision == "fp16")
        self.wants_targets = bool(getattr(model, "wants_targets", False))
        if self.wants_targets and self.scaler.is_enabled():
            raise ValueError("a model whose window gradient is estimated from the loss (model.extra.window_gradient="
                             "finite_difference) cannot train with train.precision=fp16: the estimate bypasses the "
                             "loss scaler; use bf16 or fp32")
        self.train_model = wrap_model(self.model, cfg, env)

    def parts(self) -> Dict[str, Any]:
        """What a checkpoint keeps of it, by the names of the checkpoint format."""
        return {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule, "scaler": self.scaler}

    def autocast(self):
        return autocast(self.env.device, self.precision)

    def to_device(self, images: torch.Tensor, targets: torch.Tensor,
                  distort: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        from pipeline.data import normalize
        d = self.cfg.data
        images = images.to(self.env.device, non_blocking=True)
        targets = targets.to(self.env.device, non_blocking=True)
        if distort and self.distortion is not None:  # on the uint8 pixels: the warp's zero padding stays black
            images, targets = self.distortion.apply(images, targets)
        return normalize(images, d.mean, d.std, self.memory_format == torch.channels_last), targets

    def next_batch(self, stream) -> Tuple[torch.Tensor, torch.Tensor, float]:
        start = time.perf_counter()
        with blocked_in_new_workers():
            images, targets = next(stream)
        wait = time.perf_counter() - start
        images, targets = self.to_device(images, targets, distort=True)
        return images, targets, wait

    def step(self, stream) -> Tuple[torch.Tensor, float]:
        """One optimiser step over `accum_steps` micro batches; returns (mean loss, data wait s)."""
        total, wait = torch.zeros((), device=self.env.device), 0.0
        for i in range(self.accum_steps):
            images, targets, w = self.next_batch(stream)
            wait += w
            total += self.forward_backward(images, targets, sync=i == self.accum_steps - 1)
        self.optimizer_step()
        return total, wait

    def forward_backward(self, images: torch.Tensor, targets: torch.Tensor, sync: bool = True) -> torch.Tensor:
        """Loss of one micro batch, scaled for accumulation, and its gradients (all-reduced if `sync`)."""
        no_sync = getattr(self.train_model, "no_sync", None)
        skip_sync = contextlib.nullcontext() if sync or no_sync is None else no_sync()
        with skip_sync:
            with self.autocast():
                # Models that estimate a gradient from the loss itself (finite-difference windows) get the targets.
                extra = {"targets": targets} if self.wants_targets else {}
                loss = task_loss(self.train_model(images, **extra), targets, self.task) / self.accum_steps
            self.scaler.scale(loss).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()

    def base_lr(self) -> float:
        """optim.lr at the schedule's point (roles scale it; the largest multiplier is the common
        schedule's: optim.lr_start holds some roles at 0)."""
        return self.cfg.optim.lr * max(f(self.schedule.last_epoch) for f in self.schedule.lr_lambdas)


class Trainer:
    # Files that mean run.dir already holds a run (what a fresh start would overwrite or mix with).
    RUN_FILES = ("checkpoints", "metrics.jsonl", "tb", "viz", "config.yaml")

    def __init__(self, cfg: Config, env: DistEnv, on_eval: Optional[OnEval] = None):
        """Everything the run needs, checked before anything is written: run.dir, train.resume, the
        data, the model and its optimiser, the evaluator and the checkpointer."""
        self.cfg, self.env, self.on_eval = cfg, env, on_eval
        self.run_dir = Path(cfg.run.dir)
        self.previous_run = self.find_previous_run()
        self.manifest = self.read_data()
        self.learner = Learner(cfg, env, self.fresh_distortion())
        self.manifest.check_model(self.learner.task, cfg.model.num_classes)  # labels fit the classifier
        self.seed_rngs(cfg.train.seed)
        self.progress = ckpt.Progress(self.manifest.num_samples(cfg.data.train_split), self.manifest.classes)
        self.evaluator = Evaluator(cfg, env, self.manifest, self.learner.task, max_samples=cfg.train.eval_max_samples)
        self.checkpointer = ckpt.Checkpointer(cfg, env, self.learner.parts(), self.progress, self.evaluator)

    def find_previous_run(self) -> list:
        """The run files run.dir holds when this run does not continue them; refused unless run.overwrite.
        Every rank checks before any rank writes, so all refuse together. A train.resume file that
        does not exist fails here too, before any work."""
        resume = self.cfg.train.resume
        ckpt.CheckpointDir(self.run_dir / "checkpoints", 0).resume_path(resume)
        if resume is not None:
            return []
        found = [name for name in self.RUN_FILES if (self.run_dir / name).exists()]
        if found and not self.cfg.run.overwrite:
            raise ConfigError(f"run.dir={self.run_dir} already holds a run ({', '.join(found)}): continue it with "
                              "train.resume=auto, start in another run.dir, or replace it with run.overwrite=true")
        return found

    # ------------------------------------------------------------------ the outline

    def fit(self) -> Dict[str, Any]:
        t = self.cfg.train
        self.restore_or_start()
        monitor = Monitor(self.run_dir, self.env.is_main, t.max_steps, self.progress.step, self.cfg)
        self.log_setup(monitor)
        stream = self.train_stream()
        window = Window(t.global_batch_size)
        try:
            with StopRequest() as stop:
                while self.progress.step < t.max_steps:
                    loss, wait, stopping = self.train_step(stream, stop)
                    self.progress.advance(t.global_batch_size)
                    step, final = self.progress.step, self.progress.step == t.max_steps
                    window.add(loss, wait)
                    monitor.advance(step)
                    if step % t.log_every == 0:
                        self.log_train(monitor, window)
                    evaluated = self.evaluator.due(step, final)
                    metrics, improved = self.evaluator.run(self.learner.model, step, monitor, self.evaluate) \
                        if evaluated else (None, False)
                    due = self.checkpointer.due(step, final, stopping, improved)
                    path = self.save_checkpoint(monitor, improved) if due else None
                    if evaluated and self.on_eval is not None:
                        self.on_eval(step, dict(metrics), path)
                    if stopping and not final:
                        raise Preempted(step, stop.signal_name or "a signal on another rank",
                                        str(self.checkpointer.last))
                    if self.checkpointer.ends_segment(step, final):
                        stream.close()  # stops its workers now
                        stream = self.train_stream()  # a new segment: see the module docstring
                    if due or evaluated:
                        window.reset()  # rates measure training, not evaluations and checkpoints
        finally:
            stream.close()
            monitor.close(best={self.evaluator.metric_name: self.evaluator.best})
        return self.summary()

    # ------------------------------------------------------------------ setup

    def read_data(self):
        from pipeline.data import read_manifest
        return read_manifest(self.cfg.data.root)

    def fresh_distortion(self):
        """data.distortion's batch distortion (None without it), checked against what the shards hold."""
        asked, where = self.cfg.data.distortion, self.manifest.root / "manifest.json"
        stored_fresh = self.manifest.raw.get("train_distortion") == "fresh"
        wanted = self.manifest.raw.get("distortion")
        if stored_fresh and asked != wanted:
            raise DataError(f"{where}: its training digits are stored undistorted, to be distorted afresh with "
                            f"data.distortion={wanted} (the test split's distortion); got data.distortion={asked}")
        if asked is not None and not stored_fresh:
            raise DataError(f"data.distortion={asked}: {where} holds no undistorted training digits to distort "
                            "(write them with python -m data_prep digits --fresh-train)")
        if asked is None:
            return None
        from data_prep.distortions import FreshDistortion, FreshPairs
        return (FreshPairs if self.manifest.raw.get("addition") else FreshDistortion)(asked)

    def seed_rngs(self, seed: int) -> None:
        # Per-rank seeds: ranks draw different dropout masks and augmentations.
        s = seed * 1000 + self.env.rank
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)

    def restore_or_start(self) -> None:
        checkpoint = self.checkpointer.restore()
        if checkpoint is None:
            if self.env.is_main:
                if self.previous_run:  # run.overwrite=true: the user asked to replace it
                    log.warning("run.overwrite=true: replacing the run in %s (%s)", self.run_dir,
                                ", ".join(self.previous_run))
                    for name in self.previous_run:
                        path = self.run_dir / name
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
                save_config(self.cfg, self.run_dir / "config.yaml")
            barrier(self.env)  # no rank writes into run.dir before it is cleared
            return
        changed = follow_checkpoint(self.cfg, checkpoint.config, self.learner.normalisation)
        if changed and self.env.is_main:
            log.warning(changed)
        if len(checkpoint.rng) != self.env.world_size:  # another world size: fresh but reproducible per-rank streams
            self.seed_rngs(stream_seed(self.cfg.train.seed, self.progress.step))
        if self.env.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            log.info("resumed from %s at step %d", checkpoint.path, self.progress.step)

    def log_setup(self, monitor: Monitor) -> None:
        t, env, learner = self.cfg.train, self.env, self.learner
        groups = {}
        for g in learner.optimizer.param_groups:
            role = groups.setdefault(g["role"], {"params": 0, "lr": g["lr"]})
            role["params"] += sum(p.numel() for p in g["params"])
        monitor.message(
            f"world size {env.world_size} on {env.device.type}, global batch {t.global_batch_size} = "
            f"{env.world_size} ranks x micro batch {learner.micro_batch} x {learner.accum_steps} accumulation "
            f"step(s); precision {learner.precision}; model {self.cfg.model.name} "
            f"({sum(g['params'] for g in groups.values()):,} parameters)")
        for role, g in groups.items():
            monitor.message(f"  group {role}: {g['params']:,} parameters, lr {g['lr']:.3g}")
        monitor.record(self.progress.step, "setup", {
            "world_size": env.world_size, "micro_batch_size": learner.micro_batch,
            "accumulation_steps": learner.accum_steps, "global_batch_size": t.global_batch_size,
            "precision": learner.precision, "device": env.device.type})

    # ------------------------------------------------------------------ training

    def train_stream(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        from pipeline.data import build_train_loader
        seed = stream_seed(self.cfg.train.seed, self.progress.step)
        if self.learner.distortion is not None:  # restarts with the stream: a resumed run draws the same distortions
            self.learner.distortion.reseed(seed * 1009 + self.env.rank)
        return iter(build_train_loader(self.cfg, self.manifest, self.env.rank, self.env.world_size,
                                       self.learner.micro_batch, seed))

    def train_step(self, stream, stop: Optional[StopRequest] = None) -> Tuple[torch.Tensor, float, bool]:
        """The learner's step; returns (mean loss, data wait s, whether any rank's `stop` has received
        a signal by the end of the step: see `check_finite`)."""
        total, wait = self.learner.step(stream)
        stopping = self.check_finite(total, stop is not None and stop.received)
        return total, wait, stopping

    def check_finite(self, loss: torch.Tensor, stop_requested: bool = False) -> bool:
        """Stop at the first non-finite loss, on every rank together, before anything is written.

        The check syncs with the device once per step; a NaN step is never followed by a checkpoint.
        Its all-reduce also carries this rank's stop request (SIGTERM/SIGUSR1): one collective per
        step, not two. Returns whether any rank has one.
        """
        bad = not math.isfinite(loss.item())
        any_bad, stopping = any_rank(self.env, bad, stop_requested)
        if any_bad:
            where = f" on rank {self.env.rank}" if bad and self.env.distributed else ""
            last = self.checkpointer.last
            kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written"
            raise NonFiniteLoss(f"non-finite loss ({loss.item()}{where}) at step {self.progress.step + 1}; stopping, "
                                f"{kept}; lower optim.lr or set optim.grad_clip")
        return stopping

    def log_train(self, monitor: Monitor, window: Window) -> None:
        step, max_steps = self.progress.step, self.cfg.train.max_steps
        values = {**window.values(max_steps - step), "lr": self.learner.base_lr()}
        values.update({f"lr/{role}": lr for role, lr in lrs_by_role(self.learner.optimizer).items()})
        monitor.record(step, "train", values)
        monitor.show(step, max_steps, values)
        window.reset()  # each log line reports the steps since the previous one

    # ------------------------------------------------------------------ evaluation and checkpoints

    def evaluate(self) -> Dict[str, Any]:
        """The evaluation split's metrics (the Evaluator's; a hook for tests and subclasses)."""
        return self.evaluator.evaluate(self.learner.model, self.progress.step, self.learner.memory_format)

    def save_checkpoint(self, monitor: Monitor, is_best: bool = False) -> Path:
        path = self.checkpointer.save(is_best)
        monitor.message(f"checkpoint step {self.progress.step}: {path}" + (" (best)" if is_best else ""))
        return path

    def summary(self) -> Dict[str, Any]:
        return {"step": self.progress.step, "metrics": self.evaluator.metrics, "best_metric": self.evaluator.best,
                "checkpoint": str(self.checkpointer.last) if self.checkpointer.last.exists() else None,
                "run_dir": str(self.run_dir)}
