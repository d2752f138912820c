"""The fit loop. `Trainer.fit()` is the outline; each step of it is a named method below.

Step numbering: `self.step` counts optimiser steps done. Evaluation, checkpoint and picture
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
import torch.nn.functional as F
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.config import Config, ConfigError, per_rank_batch, save_config, to_dict
from pipeline.data.manifest import DataError
from pipeline.models import build_model
from pipeline.models.normalisation import describe as describe_normalisation, follow_checkpoint, resolve_normalisation
from pipeline.precision import autocast, resolve_precision
import pipeline.train.checkpoint as ckpt
from pipeline.train.distributed import DistEnv, all_gather_object, any_rank, barrier
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
    """Mean cross-entropy; sequence logits (B, L, C) against targets (B, L) count every position.
    colocalisation: the model returns each image's own loss (B,) (its triplet hinge, no targets): their mean."""
    if task == "colocalisation":
        return logits.float().mean()
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, on_eval: Optional[OnEval] = None):
        self.cfg, self.env, self.on_eval = cfg, env, on_eval
        self.run_dir = Path(cfg.run.dir)
        self.micro_batch, self.accum_steps = per_rank_batch(cfg, env.world_size)
        self.step = 0
        self.images_seen = 0
        self.distortion = None  # data.distortion's fresh batch distortion, set by fit()
        self.evaluator: Optional[Evaluator] = None  # needs the data and the model: set by fit()
        t = cfg.train
        self.checkpointer = ckpt.Checkpointer(self.run_dir, t.checkpoint_every, t.keep_checkpoints, t.resume)
        self.previous_run = self.find_previous_run()

    # Files that mean run.dir already holds a run (what a fresh start would overwrite or mix with).
    RUN_FILES = ("checkpoints", "metrics.jsonl", "tb", "viz", "config.yaml")

    def find_previous_run(self) -> list:
        """The run files run.dir holds when this run does not continue them; refused unless run.overwrite.
        Every rank checks before any rank writes, so all refuse together."""
        if self.cfg.train.resume is not None:
            return []
        found = [name for name in self.RUN_FILES if (self.run_dir / name).exists()]
        if found and not self.cfg.run.overwrite:
            raise ConfigError(f"run.dir={self.run_dir} already holds a run ({', '.join(found)}): continue it with "
                              "train.resume=auto, start in another run.dir, or replace it with run.overwrite=true")
        return found

    # ------------------------------------------------------------------ the outline

    def fit(self) -> Dict[str, Any]:
        t = self.cfg.train
        self.manifest = self.read_data()
        self.distortion = self.fresh_distortion()
        self.build_model_and_optimiser()
        self.manifest.check_model(self.task, self.cfg.model.num_classes)  # labels fit the classifier
        self.evaluator = Evaluator(self.cfg, self.env, self.manifest, None, self.task)
        self.restore_or_start()
        self.monitor = Monitor(self.run_dir, self.env.is_main, t.max_steps, self.step, self.cfg)
        self.evaluator.monitor = self.monitor
        self.log_setup()
        stream = self.train_stream()
        window = Window(self.cfg.train.global_batch_size)
        try:
            with StopRequest() as stop:
                while self.step < t.max_steps:
                    loss, wait, stopping = self.train_step(stream, stop)
                    self.step += 1
                    self.images_seen += t.global_batch_size
                    window.add(loss, wait)
                    self.monitor.advance(self.step)
                    if self.step % t.log_every == 0:
                        self.log_train(window)
                    final = self.step == t.max_steps
                    evaluated = self.evaluator.due(self.step, final)
                    metrics, improved = self.evaluator.run(self.model, self.step, self.evaluate) \
                        if evaluated else (None, False)
                    due = self.checkpointer.due(self.step, final, stopping, improved)
                    path = self.save_checkpoint(is_best=improved) if due else None
                    if evaluated and self.on_eval is not None:
                        self.on_eval(self.step, dict(metrics), path)
                    if stopping and not final:
                        raise Preempted(self.step, stop.signal_name or "a signal on another rank",
                                        str(self.checkpointer.last))
                    if self.checkpointer.ends_segment(self.step, final):
                        stream.close()  # stops its workers now
                        stream = self.train_stream()  # a new segment: see the module docstring
                    if due or evaluated:
                        window.reset()  # rates measure training, not evaluations and checkpoints
        finally:
            stream.close()
            self.monitor.close(best={self.evaluator.metric_name: self.evaluator.best})
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

    def build_model_and_optimiser(self) -> None:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.normalisation = resolve_normalisation(cfg)  # before config.yaml and checkpoints are written: they keep it
        if env.is_main:
            log.info(describe_normalisation(cfg, self.normalisation))
        model = self.sync_batchnorm(build_model(cfg.model))
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
        self.train_model = self.wrap_model(self.model)
        self.seed_rngs(cfg.train.seed)

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """train.sync_bn on a distributed CUDA run: batch statistics over all ranks (small per-GPU batches)."""
        if not (self.cfg.train.sync_bn and self.env.distributed):
            return model
        if self.env.device.type == "cuda":
            # timm's converter keeps BatchNormAct2d's activation; torch's would drop it silently.
            return timm_convert_sync_batchnorm(model)
        if self.env.is_main:
            log.warning("train.sync_bn=true ignored: SyncBatchNorm needs CUDA; each rank keeps its own statistics")
        return model

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """DDP (when distributed), then torch.compile (when asked); `self.model` stays the bare module."""
        t = self.cfg.train
        if self.env.distributed:
            model = DDP(model, device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None,
                        bucket_cap_mb=t.ddp_bucket_cap_mb, gradient_as_bucket_view=True)
        if t.compile:
            model = torch.compile(model, mode=t.compile_mode)
        return model

    def seed_rngs(self, seed: int) -> None:
        # Per-rank seeds: ranks draw different dropout masks and augmentations.
        s = seed * 1000 + self.env.rank
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)

    def restore_or_start(self) -> None:
        resumed = self.checkpointer.load()
        if resumed is None:
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
        path, state = resumed
        changed = follow_checkpoint(self.cfg, state.get("config"), self.normalisation)
        if changed and self.env.is_main:
            log.warning(changed)
        progress = self.checkpointer.unpack(state, self.training_parts(), path, self.cfg.model.name)
        self.step, self.images_seen = progress["step"], progress["images_seen"]
        self.evaluator.load_state_dict(progress)
        rngs = progress["rng"]
        if len(rngs) == self.env.world_size:
            ckpt.set_rng_state(rngs[self.env.rank])
        else:  # another world size: fresh but reproducible per-rank streams
            self.seed_rngs(stream_seed(self.cfg.train.seed, self.step))
        if self.env.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            log.info("resumed from %s at step %d", path, self.step)

    def log_setup(self) -> None:
        t, env = self.cfg.train, self.env
        groups = {}
        for g in self.optimizer.param_groups:
            role = groups.setdefault(g["role"], {"params": 0, "lr": g["lr"]})
            role["params"] += sum(p.numel() for p in g["params"])
        self.monitor.message(
            f"world size {env.world_size} on {env.device.type}, global batch {t.global_batch_size} = "
            f"{env.world_size} ranks x micro batch {self.micro_batch} x {self.accum_steps} accumulation "
            f"step(s); precision {self.precision}; model {self.cfg.model.name} "
            f"({sum(g['params'] for g in groups.values()):,} parameters)")
        for role, g in groups.items():
            self.monitor.message(f"  group {role}: {g['params']:,} parameters, lr {g['lr']:.3g}")
        self.monitor.record(self.step, "setup", {
            "world_size": env.world_size, "micro_batch_size": self.micro_batch,
            "accumulation_steps": self.accum_steps, "global_batch_size": t.global_batch_size,
            "precision": self.precision, "device": env.device.type})

    # ------------------------------------------------------------------ training

    def train_stream(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        from pipeline.data import build_train_loader
        if self.distortion is not None:  # restarts with the stream: a resumed run draws the same distortions
            self.distortion.reseed(stream_seed(self.cfg.train.seed, self.step) * 1009 + self.env.rank)
        return iter(build_train_loader(self.cfg, self.manifest, self.env.rank, self.env.world_size,
                                       self.micro_batch, stream_seed(self.cfg.train.seed, self.step)))

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

    def train_step(self, stream, stop: Optional[StopRequest] = None) -> Tuple[torch.Tensor, float, bool]:
        """One optimiser step over `accum_steps` micro batches; returns (mean loss, data wait s,
        whether any rank's `stop` has received a signal by the end of the step: see `check_finite`)."""
        total, wait = torch.zeros((), device=self.env.device), 0.0
        for i in range(self.accum_steps):
            images, targets, w = self.next_batch(stream)
            wait += w
            total += self.forward_backward(images, targets, sync=i == self.accum_steps - 1)
        self.optimizer_step()
        stopping = self.check_finite(total, stop is not None and stop.received)
        return total, wait, stopping

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
            raise NonFiniteLoss(f"non-finite loss ({loss.item()}{where}) at step {self.step + 1}; stopping, "
                                f"{kept}; lower optim.lr or set optim.grad_clip")
        return stopping

    def log_train(self, window: Window) -> None:
        # roles scale this; the largest multiplier is the common schedule's (optim.lr_start holds some at 0)
        base_lr = self.cfg.optim.lr * max(f(self.schedule.last_epoch) for f in self.schedule.lr_lambdas)
        values = {**window.values(self.cfg.train.max_steps - self.step), "lr": base_lr}
        values.update({f"lr/{role}": lr for role, lr in lrs_by_role(self.optimizer).items()})
        self.monitor.record(self.step, "train", values)
        self.monitor.show(self.step, self.cfg.train.max_steps, values)
        window.reset()  # each log line reports the steps since the previous one

    # ------------------------------------------------------------------ evaluation and checkpoints

    def evaluate(self) -> Dict[str, Any]:
        """The evaluation split's metrics (the Evaluator's; a hook for tests and subclasses)."""
        return self.evaluator.evaluate(self.model, self.step, self.memory_format)

    def training_parts(self) -> Dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule, "scaler": self.scaler}

    def save_checkpoint(self, is_best: bool = False) -> Path:
        """Rank 0 writes; every rank contributes its RNG states and waits until the file exists."""
        rngs = all_gather_object(self.env, ckpt.rng_state())
        path = self.checkpointer.dir.step_path(self.step)
        if self.env.is_main:
            progress = {"step": self.step, "images_seen": self.images_seen, "classes": self.manifest.classes,
                        "epoch": self.images_seen / max(1, self.num_train_samples()), **self.evaluator.state_dict()}
            state = self.checkpointer.pack(self.training_parts(), progress, rngs, to_dict(self.cfg))
            path = self.checkpointer.save(state, self.step, is_best)
            self.monitor.message(f"checkpoint step {self.step}: {path}" + (" (best)" if is_best else ""))
        barrier(self.env)
        return path

    def num_train_samples(self) -> int:
        return self.manifest.num_samples(self.cfg.data.train_split)

    def summary(self) -> Dict[str, Any]:
        return {"step": self.step, "metrics": self.evaluator.metrics, "best_metric": self.evaluator.best,
                "checkpoint": str(self.checkpointer.last) if self.checkpointer.last.exists() else None,
                "run_dir": str(self.run_dir)}
