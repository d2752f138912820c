"""Shared pieces of the trainer tests (no tests here): tiny run overrides and CLI launchers."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import List, Sequence

import pytest
import torch

from conftest import PYTHON, REPO, subprocess_env

# A whole N x ST-CNN run in seconds on CPU: timm's tiny convnext (LayerNorm, so per-sample
# gradients do not depend on how a batch is split), 64 px inputs, 32 px crops, random init.
TINY_MODEL = ["model.backbone=test_convnext", "model.input_size=64", "model.crop_size=32",
              "model.pretrained=null", "model.num_classes=3", "model.num_streams=2", "data.resize=72"]


def tiny_run(root: Path, run_dir: Path, *overrides: str) -> List[str]:
    """Overrides for a short CPU run on the tiny shards at `root` writing to `run_dir`."""
    return [*TINY_MODEL, f"data.root={root}", f"run.dir={run_dir}", "data.shuffle_buffer=8",
            "train.global_batch_size=4", "train.num_workers=0", "train.num_viz=2", "train.log_every=1",
            "train.device=cpu", "optim.lr=0.01", "optim.lr_scale.localisation=1e-4", *overrides]


def train_cmd(overrides: Sequence[str], nproc: int = 1, module: str = "pipeline.train") -> List[str]:
    if nproc == 1:
        return [PYTHON, "-m", module, *overrides]
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", module, *overrides]


def run_cli(overrides: Sequence[str], nproc: int = 1, module: str = "pipeline.train",
            timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(overrides, nproc, module), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def explain(result: subprocess.CompletedProcess) -> str:
    """A failed run's own error lines first (torchrun's summary would bury them), then the tail."""
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Traceback"))
              or "Error:" in line]
    return "\n".join(errors[:20]) + "\n--- stderr tail ---\n" + result.stderr[-2000:]


