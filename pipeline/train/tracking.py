"""Experiment trackers of `train.report_to`: TensorBoard, MLflow and Weights & Biases.

The Monitor (rank 0 only) starts them and hands each the same things: the resolved config once,
every record it writes to metrics.jsonl as `<split>/<metric>` scalars at their step, the attention
pictures, and at the end the best metric and how the run ended. A resumed run continues the same
MLflow / W&B run: their run ids are kept in `<run.dir>/trackers.json`.

    check_installed(cfg.train.report_to)        # torch-free: before the process group and the model
    trackers = start_trackers(cfg, run_dir, start_step)

Where each tracker's settings come from (docs/tracking.md): a config key when set, else the
tracker's standard environment variable, else a default that works on a node without network.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from pipeline.config import Config, ConfigError, to_dict

log = logging.getLogger("pipeline.train")

# tracker -> (the module it imports, the package that brings it alone; the `track` extra brings them all)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}
DEFAULT_EXPERIMENT = "stn-pipeline"
IDS_FILE = "trackers.json"  # {tracker: run id} of the MLflow / W&B runs this run directory reports to


def check_installed(report_to: List[str]) -> None:
    """A one-line ConfigError for the first chosen tracker whose package is missing (nothing is imported)."""
    for name in report_to:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            raise ConfigError(f"train.report_to includes {name}, but the {PACKAGES[name][0]} package is not "
                              f"installed: pip install -e '.[track]' (or pip install {PACKAGES[name][1]})")


def start_trackers(cfg: Config, run_dir: Path, start_step: int) -> List[Any]:
    """The trackers of train.report_to, started; a resumed run (start_step > 0) continues the runs
    named in trackers.json, a fresh one starts new runs and rewrites the file."""
    from data_prep.contract import write_json_atomic

    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if start_step and ids_path.is_file() else {}
    names = [name for name in dict.fromkeys(cfg.train.report_to) if name in TRACKERS]  # in order, once each
    trackers = []
    try:
        for name in names:
            trackers.append(TRACKERS[name](cfg, run_dir, start_step, ids.get(name)))
    except BaseException:  # e.g. W&B not logged in: the runs already started end as failed, not running
        for tracker in trackers:
            tracker.close("FAILED", {}, start_step)
        raise
    ids.update({name: t.run_id for name, t in zip(names, trackers) if t.run_id})
    if ids:
        write_json_atomic(ids_path, ids, durable=False)
    else:  # a fresh start without MLflow / W&B: a later resume must not continue an earlier run's
        ids_path.unlink(missing_ok=True)
    return trackers


def run_name(cfg: Config) -> str:
    return cfg.run.name or Path(cfg.run.dir).name


def flat_params(values: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
    """The nested config as {"optim.lr": "0.1", ...}: MLflow params are flat strings."""
    flat: Dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, name))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) or value is None else str(value)
    return flat


def run_status(error: Optional[BaseException]) -> str:
    """How the run ended, in MLflow's words: FINISHED, KILLED (a stop signal, Ctrl-C) or FAILED."""
    from pipeline.train.signals import Preempted
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, (Preempted, KeyboardInterrupt)) else "FAILED"


class TensorBoard:
    """Scalars and the attention pictures under <run.dir>/tb (the default)."""
    run_id = None  # nothing to continue: a resumed run appends to the same folder

    def __init__(self, cfg: Config, run_dir: Path, start_step: int, run_id: Optional[str]):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only on rank 0
        # A resumed run drops what a killed attempt logged after its checkpoint.
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image
        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self, status: str, best: Dict[str, float], step: int) -> None:
        self.writer.close()


def mlflow_uri(cfg: Config) -> str:
    """train.mlflow_uri, else $MLFLOW_TRACKING_URI, else ./mlruns (a file store: no server, no database)."""
    uri = cfg.train.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
    if urlparse(uri).scheme == "":  # a plain folder: absolute, so the run finds it from any working directory
        uri = Path(uri).resolve().as_uri()
    return uri


class MLflow:
    """One MLflow run per run directory, through MlflowClient (no global active run: a Ray worker or a
    notebook may hold its own). Params: the flattened config; metrics at their steps; pictures as artifacts."""
    BATCH = 100  # MLflow's limit of params per log_batch call (metrics: 1000)

    def __init__(self, cfg: Config, run_dir: Path, start_step: int, run_id: Optional[str]):
        uri = mlflow_uri(cfg)
        if urlparse(uri).scheme == "file":
            # MLflow 3 refuses file stores unless told: it is the store the light client (mlflow-skinny)
            # writes without a database or server; `mlflow ui` / `mlflow server` read it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        self.client = MlflowClient(uri)
        experiment = cfg.train.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.continued(run_id) if run_id else None
        if self.run_id is None:
            run = self.client.create_run(experiment_id, run_name=run_name(cfg),
                                         tags={"run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
        self.log_params(flat_params(to_dict(cfg)))
        log.info("MLflow: run %s in experiment %s at %s", self.run_id, experiment, uri)

    def continued(self, run_id: str) -> Optional[str]:
        try:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception as err:  # another tracking URI than the first attempt's: start a new run
            log.warning("MLflow: cannot continue run %s (%s); starting a new one", run_id, str(err).splitlines()[0])
            return None

    def log_params(self, params: Dict[str, str]) -> None:
        """Params are write-once in MLflow: a resumed run adds the keys the run lacks and keeps the
        first values of those it changed (train.resume, train.max_steps ...), saying which."""
        from mlflow.entities import Param
        known = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in known and known[k] != v)
        if changed:
            log.info("MLflow: params keep their first values; this attempt changed %s", ", ".join(changed))
        new = [Param(k, v) for k, v in params.items() if k not in known]
        for i in range(0, len(new), self.BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + self.BATCH])

    @staticmethod
    def metric_name(key: str) -> str:
        """`train/lr/localisation` -> `train/lr.localisation`: the split stays MLflow's chart section; below
        it dots, since a file store keeps `train/lr` as a file and could not also make it a folder."""
        split, _, name = key.partition("/")
        return f"{split}/{name.replace('/', '.')}"

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(self.metric_name(key), value, now, step) for key, value in metrics.items()]
        for i in range(0, len(batch), 10 * self.BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 10 * self.BATCH])

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=tag)

    def close(self, status: str, best: Dict[str, float], step: int) -> None:
        if best:
            self.log_metrics(best, step)
        self.client.set_terminated(self.run_id, status)


class Wandb:
    """One W&B run per run directory; WANDB_MODE=offline writes it under the W&B folder for a later
    `wandb sync`. Its files go to $WANDB_DIR, else to <run.dir>/wandb."""

    def __init__(self, cfg: Config, run_dir: Path, start_step: int, run_id: Optional[str]):
        import wandb
        self.wandb = wandb
        try:
            self.run = wandb.init(
                project=cfg.train.experiment or os.environ.get("WANDB_PROJECT") or DEFAULT_EXPERIMENT,
                entity=cfg.train.wandb_entity or os.environ.get("WANDB_ENTITY"), name=run_name(cfg),
                id=run_id, resume="allow" if run_id else None,
                # Read here, not left to wandb: it keeps the first run's settings for the whole process.
                mode=os.environ.get("WANDB_MODE"), dir=os.environ.get("WANDB_DIR") or str(run_dir))
        except wandb.errors.UsageError as err:  # no API key: the run has not started anything yet
            raise ConfigError(f"train.report_to includes wandb, but W&B refused to start: {str(err).splitlines()[0]} "
                              "(wandb login, or WANDB_API_KEY; or WANDB_MODE=offline and wandb sync later)") from None
        # allow_val_change: a resumed attempt's config may differ (train.resume, a longer train.max_steps).
        self.run.config.update(to_dict(cfg), allow_val_change=True)
        self.run_id = self.run.id

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self, status: str, best: Dict[str, float], step: int) -> None:
        self.run.summary.update(best)
        if status == "KILLED":
            self.run.mark_preempting()  # shown as preempted, not crashed: the requeued job resumes it
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


TRACKERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb}
