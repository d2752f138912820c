"""Checkpoints: the format (defined and read here only), atomic writes, `last` / `best` / the
newest K periodic files, RNG states.

A checkpoint holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)` (no arbitrary unpickling). Format 1 (`format: 1`; files written
before the entry existed have the same layout and read as format 1):
    model, optimizer, schedule, scaler   state dicts (the model unwrapped from DDP / compile)
    step, images_seen, epoch, classes    progress (`Progress`; classes: the manifest's names)
    best_metric, metric_name, metrics    the evaluator's state: best so far, its name, the latest evaluation
    rng                                  one entry per rank: torch, numpy, python, cuda states
    config                               the resolved config as a dict (pipeline.config.to_dict)
`Checkpointer.state_dict()` writes it, `read(path) -> Checkpoint` reads it back (the trainer on
resume, `pipeline.evaluate`, `pipeline.predict` and models that load a trained part).
Layout under `<run.dir>/checkpoints/`: `step_NNNNNNN.pt` (newest `keep` kept), `last.pt` and
`best.pt` (hard links to a step file when the filesystem allows, else copies).
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from pipeline.config import to_dict
from pipeline.train.distributed import all_gather_object, barrier

log = logging.getLogger("pipeline.train")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names it."""


def rng_state() -> Dict[str, Any]:
    """This process's random states, as tensors and lists (weights_only-safe)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def atomic_save(obj: Any, path: Path) -> None:
    """Write `obj` to `path` so that `path` is either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_alias(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # filesystems without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


FORMAT = 1  # bump when an entry changes meaning; `read` names both formats on a mismatch
REQUIRED = ("model", "step", "config")  # every checkpoint of every format has these
TRAINING_PARTS = ("model", "optimizer", "schedule", "scaler")  # their state_dict()s, as they are


@dataclass
class Checkpoint:
    """One checkpoint file, read: the entries of the format (see the module docstring)."""

    path: Path
    model: Dict[str, Any]
    config: Dict[str, Any]
    step: int
    images_seen: int = 0
    epoch: float = 0.0
    classes: Optional[List[str]] = None
    best_metric: Optional[float] = None
    metric_name: Optional[str] = None
    metrics: Optional[Dict[str, Any]] = None
    rng: list = field(default_factory=list)
    optimizer: Optional[Dict[str, Any]] = None
    schedule: Optional[Dict[str, Any]] = None
    scaler: Optional[Dict[str, Any]] = None

    @classmethod
    def from_state(cls, state: Dict[str, Any], path: Path) -> "Checkpoint":
        version = state.get("format", 1)  # files from before the entry are format 1
        if version != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {version}; this version of pipeline reads format {FORMAT}")
        missing = [key for key in REQUIRED if key not in state]
        if missing:
            raise CheckpointError(f"{path}: not a pipeline checkpoint (format {FORMAT} needs "
                                  f"{', '.join(REQUIRED)}; no '{missing[0]}' entry)")
        known = {name for name in cls.__dataclass_fields__ if name != "path"}
        return cls(path=path, **{key: value for key, value in state.items() if key in known})

    def progress(self) -> Dict[str, Any]:
        return {"step": self.step, "images_seen": self.images_seen}

    def evaluator_state(self) -> Dict[str, Any]:
        return {"best_metric": self.best_metric, "metric_name": self.metric_name, "metrics": self.metrics}


def load(path: str | Path) -> Dict[str, Any]:
    """The raw entries of a checkpoint file (weights_only); CheckpointError names a bad file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise CheckpointError(f"{path}: not a loadable checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a pipeline checkpoint (format {FORMAT} is a dict of entries)")
    return state


def read(path: str | Path) -> Checkpoint:
    """The checkpoint at `path`, checked against the format; CheckpointError (one line) names what is wrong."""
    return Checkpoint.from_state(load(path), Path(path))


def load_weights(model: torch.nn.Module, weights: Dict[str, Any], path: Path, model_name: str) -> None:
    """Load a checkpoint's model weights, or raise a one-line CheckpointError saying what differs."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:])
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        if "localisation.fc.weight" in str(err) and "size mismatch" in str(err):
            # before the localisation fc read the whole map, it read the map pooled to 4 x 4
            detail += (" (a checkpoint from before the localisation fc read the whole map: add model.extra.loc_grid=4 "
                       "model.extra.bound=tanh_inside, its pooling and window bound)")
        raise CheckpointError(f"{path}: weights do not fit model.name={model_name}: {detail}") from None


class CheckpointDir:
    """`<run.dir>/checkpoints`: writes step files, keeps the newest `keep`, aliases last/best."""

    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = keep

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    def step_path(self, step: int) -> Path:
        return self.root / f"step_{step:07d}.pt"

    def save(self, state: Dict[str, Any], step: int, is_best: bool) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.step_path(step)
        atomic_save(state, path)
        _atomic_alias(path, self.last)
        if is_best:
            _atomic_alias(path, self.best)
        self._rotate()
        return path if path.exists() else self.last  # keep=0 rotates the step file away at once

    def step_files(self) -> List[Path]:
        """The periodic step_*.pt files, oldest first (their zero-padded steps sort by name)."""
        return sorted(self.root.glob("step_*.pt"))

    def _rotate(self) -> None:
        periodic = self.step_files()
        for old in periodic[:max(0, len(periodic) - self.keep)]:
            old.unlink(missing_ok=True)

    def load_resume(self, resume: Optional[str]) -> Optional[Checkpoint]:
        """The checkpoint to resume from, or None to start afresh.

        With train.resume=auto a last.pt that cannot be loaded (a file damaged after it was written:
        writes are atomic) falls back, with a warning, to the newest loadable step_*.pt; an
        explicit path never falls back."""
        path = self.resume_path(resume)
        if path is None:
            return None
        try:
            return read(path)
        except CheckpointError as err:
            if resume != "auto":
                raise
            for older in reversed(self.step_files()):
                if older.samefile(path):  # last.pt's own hard link: the same damaged bytes
                    continue
                try:
                    checkpoint = read(older)
                except CheckpointError:
                    continue
                log.warning("%s; train.resume=auto goes on from the newest loadable checkpoint, %s", err, older)
                return checkpoint
            raise CheckpointError(f"{err}; no loadable step_*.pt beside it to fall back on (train.resume=auto)") from None

    def resume_path(self, resume: Optional[str]) -> Optional[Path]:
        """The file `train.resume` points at: null -> none, auto -> last.pt if present (else the newest
        step_*.pt: a run killed between writing its step file and aliasing last.pt keeps that step),
        else a path."""
        if resume is None:
            return None
        if resume == "auto":
            if self.last.is_file():
                return self.last
            steps = self.step_files()
            return steps[-1] if steps else None
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"train.resume={resume}: checkpoint not found")
        return path


class Progress:
    """How far training has come: optimiser steps done and images seen (all ranks); its epoch and the
    class names go into the checkpoint beside them."""

    def __init__(self, num_train_samples: int, classes: Optional[List[str]]):
        self.step, self.images_seen = 0, 0
        self.num_train_samples, self.classes = max(1, num_train_samples), classes

    def advance(self, images: int) -> None:
        self.step += 1
        self.images_seen += images

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "images_seen": self.images_seen, "classes": self.classes,
                "epoch": self.images_seen / self.num_train_samples}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step, self.images_seen = state["step"], state["images_seen"]


class Checkpointer:
    """The trainer's checkpoint component: when a checkpoint is due, what one holds, and resuming.

    A checkpoint is due every train.checkpoint_every steps, after the last step, when a stop signal
    came, and on a new best evaluation. `state_dict()` combines the parts' own state dicts (model,
    optimizer, schedule, scaler), the progress, the evaluator's state, every rank's RNG states and the
    config: the format of the module docstring, written here and read back by `read`.
    """

    def __init__(self, cfg, env, parts: Dict[str, Any], progress: Progress, evaluator):
        """parts: {name: object with state_dict() / load_state_dict()} for model, optimizer, schedule,
        scaler; evaluator: anything with those two (its best metric and latest metrics)."""
        t = cfg.train
        self.cfg, self.env = cfg, env
        self.dir = CheckpointDir(Path(cfg.run.dir) / "checkpoints", t.keep_checkpoints)
        self.every, self.resume = t.checkpoint_every, t.resume
        self.parts, self.progress, self.evaluator = parts, progress, evaluator

    @property
    def last(self) -> Path:
        return self.dir.last

    def due(self, step: int, final: bool, stopping: bool, improved: bool = False) -> bool:
        return step % self.every == 0 or final or stopping or improved

    def ends_segment(self, step: int, final: bool) -> bool:
        """A periodic checkpoint ends a segment of the training stream (the trainer starts a new one)."""
        return step % self.every == 0 and not final

    def state_dict(self, rngs: list) -> Dict[str, Any]:
        """The checkpoint (format 1): `rngs` holds every rank's RNG states, rank by rank."""
        return {"format": FORMAT, **{name: part.state_dict() for name, part in self.parts.items()},
                **self.progress.state_dict(), **self.evaluator.state_dict(), "rng": rngs, "config": to_dict(self.cfg)}

    def save(self, is_best: bool) -> Path:
        """Rank 0 writes; every rank contributes its RNG states and waits until the file exists."""
        rngs = all_gather_object(self.env, rng_state())
        path = self.dir.step_path(self.progress.step)
        if self.env.is_main:
            path = self.dir.save(self.state_dict(rngs), self.progress.step, is_best)
        barrier(self.env)
        return path

    def restore(self) -> Optional[Checkpoint]:
        """Load the train.resume checkpoint into the parts, the progress, the evaluator and this rank's
        RNG states (when it was written by as many ranks); None: nothing to resume from."""
        checkpoint = self.dir.load_resume(self.resume)
        if checkpoint is None:
            return None
        absent = [name for name in self.parts if getattr(checkpoint, name) is None]
        if absent:
            raise CheckpointError(f"{checkpoint.path}: a format {FORMAT} checkpoint without '{absent[0]}': "
                                  "it cannot resume training (evaluate or predict with it)")
        load_weights(self.parts["model"], checkpoint.model, checkpoint.path, self.cfg.model.name)
        for name, part in self.parts.items():
            if name != "model":
                part.load_state_dict(getattr(checkpoint, name))
        self.progress.load_state_dict(checkpoint.progress())
        self.evaluator.load_state_dict(checkpoint.evaluator_state())
        if len(checkpoint.rng) == self.env.world_size:
            set_rng_state(checkpoint.rng[self.env.rank])
        return checkpoint
