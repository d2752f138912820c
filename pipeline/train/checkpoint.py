"""Checkpoints: atomic writes, `last` / `best` / the newest K periodic files, RNG states.

A checkpoint holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)` (no arbitrary unpickling):
    model, optimizer, schedule, scaler   state dicts (the model unwrapped from DDP / compile)
    step, images_seen, best_metric       progress
    rng                                  one entry per rank: torch, numpy, python, cuda states
    config                               the resolved config as a dict (pipeline.config.to_dict)
    metrics                              the latest evaluation, if any
Layout under `<run.dir>/checkpoints/`: `step_NNNNNNN.pt` (newest `keep` kept), `last.pt` and
`best.pt` (hard links to a step file when the filesystem allows, else copies).
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch


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


def load(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise CheckpointError(f"{path}: not a loadable checkpoint: {str(err).splitlines()[0]}") from None
    for key in ("model", "step", "config"):
        if key not in state:
            raise CheckpointError(f"{path}: not a pipeline checkpoint (no '{key}' entry)")
    return state


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

    def _rotate(self) -> None:
        periodic = sorted(self.root.glob("step_*.pt"))
        for old in periodic[:max(0, len(periodic) - self.keep)]:
            old.unlink(missing_ok=True)

    def load_resume(self, resume: Optional[str]) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """(path, state) of the checkpoint to resume from, or None to start afresh.

        With train.resume=auto a last.pt that cannot be loaded (a file damaged after it was written:
        writes are atomic) falls back, with a warning, to the newest loadable step_*.pt; an
        explicit path never falls back."""
        path = self.resume_path(resume)
        if path is None:
            return None
        try:
            return path, load(path)
        except CheckpointError as err:
            if resume != "auto":
                raise
            for older in sorted(self.root.glob("step_*.pt"), reverse=True):
                if older.samefile(path):  # last.pt's own hard link: the same damaged bytes
                    continue
                try:
                    state = load(older)
                except CheckpointError:
                    continue
                log.warning("%s; train.resume=auto goes on from the newest loadable checkpoint, %s", err, older)
                return older, state
            raise CheckpointError(f"{err}; no loadable step_*.pt beside it to fall back on (train.resume=auto)") from None

    def resume_path(self, resume: Optional[str]) -> Optional[Path]:
        """The file `train.resume` points at: null -> none, auto -> last.pt if present, else a path."""
        if resume is None:
            return None
        if resume == "auto":
            return self.last if self.last.is_file() else None
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"train.resume={resume}: checkpoint not found")
        return path


class Checkpointer:
    """The trainer's checkpoint component: when a checkpoint is due, what one holds, and resuming.

    A checkpoint is due every train.checkpoint_every steps, after the last step, when a stop signal
    came, and on a new best evaluation. Its contents are `state_dict()` of the training parts plus
    progress and every rank's RNG states: the format is written by `pack` and read by `unpack`, here
    only (`pipeline.evaluate.load_model` reads the same file through `load`).
    """

    def __init__(self, run_dir: str | Path, every: int, keep: int, resume: Optional[str]):
        self.dir = CheckpointDir(Path(run_dir) / "checkpoints", keep)
        self.every, self.resume = every, resume
        self.dir.resume_path(resume)  # a missing train.resume file fails here, before any work

    @property
    def last(self) -> Path:
        return self.dir.last

    def due(self, step: int, final: bool, stopping: bool, improved: bool = False) -> bool:
        return step % self.every == 0 or final or stopping or improved

    def ends_segment(self, step: int, final: bool) -> bool:
        """A periodic checkpoint ends a segment of the training stream (the trainer starts a new one)."""
        return step % self.every == 0 and not final

    @staticmethod
    def pack(parts: Dict[str, Any], progress: Dict[str, Any], rngs: list, config: Dict[str, Any]) -> Dict[str, Any]:
        """The checkpoint: each part's state_dict() (model, optimizer, schedule, scaler), progress
        (step, images_seen, epoch, best_metric, metric_name, metrics), rng (one per rank), config."""
        return {**{name: part.state_dict() for name, part in parts.items()}, **progress, "rng": rngs, "config": config}

    @staticmethod
    def unpack(state: Dict[str, Any], parts: Dict[str, Any], path: Path, model_name: str) -> Dict[str, Any]:
        """Load `state` into the parts; returns the progress and the RNG states."""
        load_weights(parts["model"], state["model"], path, model_name)
        for name, part in parts.items():
            if name != "model":
                part.load_state_dict(state[name])
        return {key: state[key] for key in ("step", "images_seen", "best_metric", "metrics", "rng")}

    def save(self, state: Dict[str, Any], step: int, is_best: bool) -> Path:
        return self.dir.save(state, step, is_best)

    def load(self) -> Optional[Tuple[Path, Dict[str, Any]]]:
        return self.dir.load_resume(self.resume)
