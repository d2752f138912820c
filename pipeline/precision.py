"""Numeric precision, one leaf module: which precision a run uses, and its autocast context.

    precision = resolve_precision(cfg.train.precision, device, cfg.train.cpu_autocast)
    with autocast(device, precision):
        logits = model(images)

The trainer and the evaluation both use it (so they agree), and it imports nothing of the project.
"""
from __future__ import annotations

import contextlib

import torch


def resolve_precision(asked: str, device: torch.device, cpu_autocast: bool) -> str:
    """The precision a run uses: as asked on CUDA; on CPU fp32 unless bf16 autocast is asked for
    (train.cpu_autocast), since CPU autocast is slow or missing for many kernels."""
    if device.type == "cpu":
        return "bf16" if asked == "bf16" and cpu_autocast else "fp32"
    return asked


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
