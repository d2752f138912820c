"""Optimiser with per-module learning rates, and the learning-rate schedules.

The model declares its parameter roles (`model.parameter_groups() -> {role: [params]}`); each
role becomes up to two optimiser groups (with and without weight decay) whose lr is
`optim.lr * optim.lr_scale.get(role, 1.0)`. The schedule is one multiplier applied to every
group, so the ratios between roles (paper: localisation x1e-4 on CUB, x0.1 on SVHN) stay fixed;
`optim.lr_start.<role>` holds a role at lr 0 until that step (e.g. the streams learn to read
before the localisation net moves the windows).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from pipeline.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> List[dict]:
    """Optimiser groups from the model's roles; each group carries its `role` for logging."""
    roles: Dict[str, List[nn.Parameter]] = model.parameter_groups()
    for key, named in (("lr_scale", cfg.lr_scale), ("lr_start", cfg.lr_start)):
        unknown = sorted(set(named) - set(roles))
        if unknown:
            raise ValueError(f"optim.{key} names role(s) {', '.join(unknown)} that model "
                             f"'{type(model).__name__}' does not have; its roles: {', '.join(sorted(roles))}")
    seen: set[int] = set()
    groups = []
    for role, params in roles.items():
        params = [p for p in params if p.requires_grad]
        if any(id(p) in seen for p in params):
            raise ValueError(f"model.parameter_groups() lists a parameter in more than one role ('{role}')")
        seen.update(id(p) for p in params)
        lr = cfg.lr * cfg.lr_scale.get(role, 1.0)
        # Norm weights and biases (ndim <= 1) get no decay: decaying them only hurts (timm, big_vision).
        decay = [p for p in params if cfg.decay_norm_and_bias or p.ndim > 1]
        no_decay = [p for p in params if not (cfg.decay_norm_and_bias or p.ndim > 1)]
        for chunk, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            if chunk:
                groups.append({"params": chunk, "lr": lr, "weight_decay": wd, "role": role})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"model.parameter_groups() misses {len(missing)} trainable parameter(s), "
                         f"e.g. {missing[0]}")
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    # Fused kernels on CUDA; foreach (multi-tensor) elsewhere; plain loops only when asked.
    kernel = ({"fused": True} if device.type == "cuda" else {"foreach": True}) if cfg.fused else {"foreach": False}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **kernel)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kernel)
    raise ValueError(f"optim.name={cfg.name!r} is not one of sgd, adamw")


def lr_multiplier(cfg: ScheduleConfig, max_steps: int) -> Callable[[int], float]:
    """step -> factor of the base lr (the lr used for the optimiser step number `step`, from 0)."""
    warmup = cfg.warmup_steps

    def warm(step: int) -> float:
        return (step + 1) / warmup if step < warmup else 1.0

    if cfg.name == "constant":
        return warm
    if cfg.name == "step":
        if cfg.step_every:
            return lambda step: warm(step) * cfg.gamma ** (step // cfg.step_every)
        return lambda step: warm(step) * cfg.gamma ** sum(step >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        def cosine(step: int) -> float:
            if step < warmup:
                return warm(step)
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return cosine
    raise ValueError(f"schedule.name={cfg.name!r} is not one of step, cosine, constant")


def build_schedule(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int,
                   lr_start: Optional[Dict[str, int]] = None) -> torch.optim.lr_scheduler.LambdaLR:
    # One function for every group: ratios between roles are fixed by construction (a role held
    # back by `lr_start` is 0 until its step, then on the common schedule).
    common = lr_multiplier(cfg, max_steps)
    lr_start = lr_start or {}

    def held_back(start: int) -> Callable[[int], float]:
        return lambda step: common(step) if step >= start else 0.0

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [held_back(lr_start[g["role"]]) if g.get("role") in lr_start else common
                    for g in optimizer.param_groups])


def lrs_by_role(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    return {g["role"]: g["lr"] for g in optimizer.param_groups}
