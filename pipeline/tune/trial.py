"""One Tune trial: the sweep's base config + the trial's sampled values -> `pipeline.train.run`.

Two shapes, one training code:
- `resources.workers == 1`: the trainer runs inside the Tune trial actor itself (no extra
  actors), and reports with `ray.tune.report(metrics, checkpoint=...)`.
- `resources.workers > 1`: the trial actor launches a `ray.train.torch.TorchTrainer` (Ray Train V2)
  whose workers form the DDP process group that `pipeline.train.run` joins; rank 0 attaches the
  checkpoint, every rank calls `ray.train.report` (a collective in Train V2), and
  `TuneReportCallback` forwards rank 0's (already all-reduced) metrics to Tune.

Each evaluation reports the trainer's metrics plus `step`, which the schedulers use as their
time unit (a resumed trial keeps counting from its checkpoint's step, unlike Tune's
`training_iteration`). A (re)started trial resumes from the newer of its Ray checkpoint and the
trainer's own `checkpoints/last.pt` in the trial's run folder (Ray's lags behind, or is missing,
when the driver was killed between a checkpoint and Tune's next experiment-state save). Every
start is appended to `<run dir>/trial_starts.jsonl` so that resumption can be audited.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from pipeline.tune.sweep import format_override

STARTS_FILE = "trial_starts.jsonl"


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a sweep shares (passed to trials with `tune.with_parameters`)."""
    base: Optional[str]
    overrides: List[str]
    metric: str
    workdir: str                     # the driver's working directory: relative paths start there
    runs_dir: str                    # trial run folders: <runs_dir>/<trial id>
    train_storage: str               # Ray Train's storage for DDP trials
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float


def trial_overrides(params: Dict[str, Any]) -> List[str]:
    """Tune's sampled values {dotted.key: value} as config overrides."""
    return [format_override(key, value) for key, value in sorted(params.items())]


def checkpoint_file(folder: Optional[str | Path]) -> Optional[Path]:
    """The single .pt file in a reported checkpoint folder."""
    if folder is None:
        return None
    files = sorted(Path(folder).glob("*.pt"))
    return files[0] if files else None


def trainer_last_checkpoint(run_dir: Path) -> Optional[Path]:
    """What train.resume=auto would continue from in `run_dir` (last.pt, else the newest step file)."""
    from pipeline.train.checkpoint import CheckpointDir

    return CheckpointDir(run_dir / "checkpoints", 0).resume_path("auto")


def _record_start(run_dir: Path, resume_from: Optional[str], source: str) -> None:
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized()  # Ray Train's, in a DDP trial
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / STARTS_FILE, "a") as f:
        f.write(json.dumps({"time": time.time(), "pid": os.getpid(), "resume_from": resume_from, "source": source,
                            "world_size": dist.get_world_size() if group else 1,
                            "backend": dist.get_backend() if group else None}) + "\n")


def _resolve_config(plan: TrialPlan, params: Dict[str, Any], run_dir: Path, resume: Optional[Path]):
    from pipeline.config import load_config
    extra = [*trial_overrides(params), f"run.dir={run_dir}"]
    cfg = load_config(plan.base, [*plan.overrides, *extra])
    cfg.train.resume = str(resume) if resume else None
    # A trial retried without a checkpoint starts its own folder afresh (what it holds is a failed attempt).
    cfg.run.overwrite = resume is None
    # Tune runs a trial in its own folder: paths the user gave relative to the driver's folder
    # must not change meaning.
    if cfg.data.root and not os.path.isabs(cfg.data.root):
        cfg.data.root = os.path.join(plan.workdir, cfg.data.root)
    if isinstance(cfg.model.pretrained, str) and not os.path.isabs(cfg.model.pretrained):
        cfg.model.pretrained = os.path.join(plan.workdir, cfg.model.pretrained)
    return cfg


def _report_hook(report: Callable[..., None], checkpoint_class: type, metric: str, attach_checkpoint: bool):
    """on_eval(step, metrics, path) -> report(metrics + step, checkpoint=folder holding the .pt)."""

    def on_eval(step: int, metrics: Dict[str, Any], path: Optional[Path]) -> None:
        if metric not in metrics:
            raise KeyError(f"sweep metric '{metric}' is not among the trainer's evaluation metrics: "
                           f"{', '.join(sorted(metrics))}")
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        values["step"] = step
        if not (attach_checkpoint and path is not None and Path(path).is_file()):
            report(values)
            return
        # Ray persists the whole folder it is given: hand it a folder with just this file.
        with tempfile.TemporaryDirectory(prefix="tune-ckpt-") as folder:
            target = Path(folder) / Path(path).name
            try:
                os.link(path, target)
            except OSError:  # another filesystem, or no hard links: copy
                shutil.copy2(path, target)
            report(values, checkpoint=checkpoint_class.from_directory(folder))

    return on_eval


def run_trial(params: Dict[str, Any], plan: TrialPlan) -> None:
    """The Tune function trainable (see the module docstring)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(plan.runs_dir) / trial_id
    if plan.workers > 1:
        _run_ddp_trial(params, plan, trial_id, run_dir)
    else:
        _train(plan, params, run_dir, tune.get_checkpoint(), tune.report, tune.Checkpoint, is_main=True)


def _pick_resume(ray_folder: Optional[str], run_dir: Path):
    """(checkpoint file to resume from or None, where it came from: ray | run_dir | none).

    The newer of Ray's checkpoint and the trainer's `last.pt`: Ray's lags behind when the driver
    died after the trainer wrote a checkpoint and before Tune saved its experiment state.
    """
    candidates = [(path, source) for path, source in ((checkpoint_file(ray_folder), "ray"),
                                                      (trainer_last_checkpoint(run_dir), "run_dir")) if path]
    if not candidates:
        return None, "none"
    # max() keeps the first of equals: Ray's checkpoint when both are the same file.
    return max(candidates, key=lambda c: c[0].stat().st_mtime)


def _train(plan: TrialPlan, params: Dict[str, Any], run_dir: Path, ray_checkpoint: Any,
           report: Callable[..., None], checkpoint_class: type, is_main: bool) -> None:
    """Resolve the trial's config, resume if there is something to resume from, train, report."""
    from pipeline.train import run

    def train(ray_folder: Optional[str]) -> None:
        resume, source = _pick_resume(ray_folder, run_dir)
        cfg = _resolve_config(plan, params, run_dir, resume)
        if is_main:
            _record_start(run_dir, cfg.train.resume, source)
        run(cfg, on_eval=_report_hook(report, checkpoint_class, plan.metric, attach_checkpoint=is_main))

    if ray_checkpoint is None:
        train(None)
    else:
        with ray_checkpoint.as_directory() as folder:  # a local copy only when storage is remote
            train(folder)


def _ddp_worker(loop_config: Dict[str, Any]) -> None:
    """Runs on every Ray Train worker; Ray has already initialised the process group."""
    import ray.train

    _train(loop_config["plan"], loop_config["params"], Path(loop_config["run_dir"]),
           ray.train.get_checkpoint(), ray.train.report, ray.train.Checkpoint,
           is_main=ray.train.get_context().get_world_rank() == 0)


def _run_ddp_trial(params: Dict[str, Any], plan: TrialPlan, trial_id: str, run_dir: Path) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"plan": plan, "params": params, "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers, use_gpu=plan.gpus_per_worker > 0,
            resources_per_worker={"CPU": plan.cpus_per_worker, "GPU": plan.gpus_per_worker}),
        # The same name and storage on a rerun: Ray Train V2 then hands the workers the run's
        # latest checkpoint (ray.train.get_checkpoint), which is how a DDP trial resumes.
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=plan.train_storage, callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
