"""Run a sweep: connect to Ray, start or resume the Tune experiment, summarise the trials.

    result = run_sweep(load_sweep("configs/sweeps/tiny_cpu.yaml"))
    result.best_config_path   # YAML that `python -m pipeline.train --config` runs as is

Ray: with no address (argument or RAY_ADDRESS) a new local Ray starts, of its own even when
another runs on this machine, with every Ray process, the dashboard included, listening on
127.0.0.1 only (pipeline/tune/local_ray.py; a reachable dashboard runs anyone's code), and Ray's
token authentication stays as Ray sets it (on by default; the token is in ~/.ray/auth_token).

Experiment folder `<storage_path>/<name>/`:
    sweep.yaml          the validated sweep (a rerun with a different sweep is refused)
    <trial id>/         Tune's trial folders (results, Tune checkpoints)
    runs/<trial id>/    each trial's run folder (trainer checkpoints, metrics.jsonl, TensorBoard)
    train/              Ray Train's storage for DDP trials
    trials.csv, trials.md, best_config.yaml   written when the sweep ends
Rerunning the same command resumes an interrupted sweep: finished trials are kept, unfinished
and errored ones continue from their checkpoints.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from data_prep.contract import write_text_atomic
from pipeline.config import to_dict
from pipeline.tune.local_ray import init_local_ray
from pipeline.tune.sweep import SweepConfig, SweepError, num_grid_points, scheduler_options
from pipeline.tune.trial import TrialPlan, run_trial, trial_overrides

SWEEP_FILE = "sweep.yaml"
DEFAULT_DASHBOARD_PORT = 8265
# A DDP trial's Tune actor only drives a TorchTrainer, whose workers reserve their own CPUs/GPUs;
# Tune refuses an empty request, so the actor takes a token share of one CPU.
DDP_DRIVER_CPUS = 0.01


@dataclass
class SweepResult:
    experiment_dir: Path
    rows: List[Dict[str, Any]]             # one per trial: id, sampled values, metric, step, status
    best: Optional[Dict[str, Any]]
    best_config_path: Optional[Path]
    table: str                             # the markdown table that was printed
    dashboard_url: Optional[str] = None
    resumed: bool = False
    counts: Dict[str, int] = field(default_factory=dict)


def connect_ray(address: Optional[str] = None, dashboard_port: int = DEFAULT_DASHBOARD_PORT,
                num_cpus: Optional[int] = None) -> Optional[str]:
    """Join the Ray at `address` / RAY_ADDRESS, or start a local one; returns the dashboard URL."""
    # `ray` is imported only where needed: a local Ray must set itself up before that import.
    joined = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if joined:
        context = None
    elif address or os.environ.get("RAY_ADDRESS"):
        import ray
        context = ray.init(address=address or None, log_to_driver=True)
    else:
        context = init_local_ray(include_dashboard=True, dashboard_port=dashboard_port, num_cpus=num_cpus)
    url = getattr(context, "dashboard_url", None) if context is not None else None
    if url:
        url = url if url.startswith("http") else f"http://{url}"
        print(f"Ray dashboard: {url}  (from another machine: ssh -L 8265:{url.split('//')[1]} user@this-host, "
              f"then open http://127.0.0.1:8265)", flush=True)
    return url


def _plan(sweep: SweepConfig, exp_dir: Path) -> TrialPlan:
    r = sweep.resources
    return TrialPlan(base=str(Path(sweep.base).resolve()) if sweep.base else None,
                     overrides=list(sweep.overrides), metric=sweep.metric, workdir=str(Path.cwd()),
                     runs_dir=str(exp_dir / "runs"), train_storage=str(exp_dir / "train"),
                     workers=r.workers, cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker)


def _trainable(sweep: SweepConfig, plan: TrialPlan):
    from ray import tune

    r = sweep.resources
    if r.workers > 1:
        resources = {"CPU": DDP_DRIVER_CPUS}
    else:
        resources = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
    return tune.with_resources(tune.with_parameters(run_trial, plan=plan), resources)


def param_space(sweep: SweepConfig) -> Dict[str, Any]:
    from ray import tune

    grid_choices = sweep.search["name"] == "grid"
    space = {}
    for key, spec in sweep.space.items():
        kind = spec["type"]
        if kind == "grid" or (kind == "choice" and grid_choices):
            space[key] = tune.grid_search(list(spec["values"]))
        elif kind == "choice":
            space[key] = tune.choice(list(spec["values"]))
        elif kind == "loguniform":
            space[key] = tune.loguniform(spec["low"], spec["high"])
        elif kind == "uniform":
            space[key] = tune.uniform(spec["low"], spec["high"])
        else:
            space[key] = tune.randint(spec["low"], spec["high"])
    return space


def _scheduler(sweep: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    name, options = sweep.scheduler["name"], scheduler_options(sweep)
    if name == "asha":  # time unit: the trainer's step (survives resumes, unlike training_iteration)
        return ASHAScheduler(time_attr="step", **options)
    if name == "median":
        return MedianStoppingRule(time_attr="step", **options)
    return FIFOScheduler()


def _search(sweep: SweepConfig):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sweep.search["name"] == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
        searcher = OptunaSearch(seed=sweep.search.get("seed"))
        return ConcurrencyLimiter(searcher, sweep.max_concurrent) if sweep.max_concurrent else searcher
    # Tune ignores max_concurrent_trials for a variant generator: it takes its own limit.
    return BasicVariantGenerator(random_state=sweep.search.get("seed"), max_concurrent=sweep.max_concurrent or 0)


def _check_same_sweep(sweep: SweepConfig, exp_dir: Path) -> None:
    saved = exp_dir / SWEEP_FILE
    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text())
    if before != sweep.to_dict():
        changed = sorted(k for k in set(before) | set(sweep.to_dict()) if before.get(k) != sweep.to_dict().get(k))
        raise SweepError(f"{exp_dir} holds a sweep started with different settings ({', '.join(changed)}); "
                         f"resume it with the same sweep file and overrides, or choose another name=")


def build_tuner(sweep: SweepConfig, resume: bool = False):
    """(Tuner, resumed?): a new experiment, or the one already in the experiment folder."""
    from ray import tune

    exp_dir = sweep.experiment_dir
    plan = _plan(sweep, exp_dir)
    trainable = _trainable(sweep, plan)
    if tune.Tuner.can_restore(str(exp_dir)):
        _check_same_sweep(sweep, exp_dir)
        # Unfinished trials continue; errored ones resume from their checkpoints (never restart
        # from scratch a trial that has one).
        return tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space(sweep)), True
    if resume:
        raise SweepError(f"--resume: no sweep to resume in {exp_dir}")
    exp_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(exp_dir / SWEEP_FILE, yaml.safe_dump(sweep.to_dict(), sort_keys=False), durable=False)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_trials,
            scheduler=_scheduler(sweep), search_alg=_search(sweep),
            # A finished trial's process (torch, timm, CUDA context already loaded) runs the next one.
            reuse_actors=sweep.resources.workers == 1,
            trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=sweep.storage_path,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=1),
    )
    return tuner, False


def _warn_if_too_small(sweep: SweepConfig) -> None:
    """A trial that needs more than the whole cluster waits forever (unless an autoscaler adds nodes)."""
    import ray

    r = sweep.resources
    need = {"CPU": r.workers * r.cpus_per_worker + (DDP_DRIVER_CPUS if r.workers > 1 else 0),
            "GPU": r.workers * r.gpus_per_worker}
    have = ray.cluster_resources()
    short = [f"{need[k]:g} {k}s (the cluster has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0)]
    if short:
        print(f"warning: one trial needs {' and '.join(short)}; trials will wait until the cluster grows",
              file=sys.stderr, flush=True)


def run_sweep(sweep: SweepConfig, address: Optional[str] = None, resume: bool = False,
              dashboard_port: int = DEFAULT_DASHBOARD_PORT, num_cpus: Optional[int] = None) -> SweepResult:
    """Run (or resume) `sweep` to the end; print and save the trial table and the best config."""
    if resume and not sweep.experiment_dir.is_dir():
        raise SweepError(f"--resume: no sweep to resume in {sweep.experiment_dir}")
    url = connect_ray(address, dashboard_port, num_cpus)
    total = sweep.num_trials * num_grid_points(sweep)
    _warn_if_too_small(sweep)
    tuner, resumed = build_tuner(sweep, resume)
    print(f"{'Resuming' if resumed else 'Starting'} sweep '{sweep.name}' in {sweep.experiment_dir}: "
          f"{total} trials, metric {sweep.metric} ({sweep.mode}), scheduler {sweep.scheduler['name']}, "
          f"{sweep.resources.workers} worker(s) per trial", flush=True)
    results = tuner.fit()
    result = summarise(sweep, results)
    result.dashboard_url, result.resumed = url, resumed
    return result


# ---------------------------------------------------------------------------------------- summary


def _trial_config(sweep: SweepConfig, params: Dict[str, Any]):
    return sweep.base_config(trial_overrides({k: params[k] for k in sweep.space if k in params}))


def _status(tune_status: Optional[str], error: Any, step: Optional[int], max_steps: int) -> str:
    """finished | early-stopped (by the scheduler) | error | interrupted (resume by rerunning) | not started."""
    if error is not None or tune_status == "ERROR":
        return "error"
    if tune_status not in (None, "TERMINATED"):  # RUNNING / PENDING / PAUSED: the sweep was stopped
        return "interrupted" if step is not None else "not started"
    if step is None:
        return "not started"
    return "finished" if step >= max_steps else "early-stopped"


def _tune_statuses(exp_dir: Path) -> Dict[str, str]:
    """Tune's own status of each trial (TERMINATED, ERROR, RUNNING, ...) from the saved state."""
    from ray.tune import ExperimentAnalysis
    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(exp_dir)).trials}
    except Exception:  # no readable state: fall back to errors and steps alone
        return {}


def _error_line(error: Any) -> str:
    """The exception's own message: the last line of Ray's error text (the first is Ray's frame)."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def trial_rows(sweep: SweepConfig, results) -> List[Dict[str, Any]]:
    rows = []
    statuses = _tune_statuses(sweep.experiment_dir)
    for res in results:
        metrics = res.metrics or {}
        params = {k: res.config.get(k) for k in sweep.space} if res.config else {}
        cfg = _trial_config(sweep, params)
        step = metrics.get("step")
        history = res.metrics_dataframe
        best_value = None
        if history is not None and sweep.metric in history:
            column = history[sweep.metric].dropna()
            if len(column):
                best_value = float(column.max() if sweep.mode == "max" else column.min())
        trial_id = metrics.get("trial_id") or Path(res.path).name
        rows.append({
            "trial": trial_id,
            **params,
            sweep.metric: _number(metrics.get(sweep.metric)),
            f"best_{sweep.metric}": best_value,
            "step": step,
            "max_steps": cfg.train.max_steps,
            "status": _status(statuses.get(trial_id), res.error, step, cfg.train.max_steps),
            "error": _error_line(res.error),
        })
    return sorted(rows, key=lambda r: r["trial"])


def best_row(rows: List[Dict[str, Any]], metric: str, mode: str) -> Optional[Dict[str, Any]]:
    """The best last-reported metric among trials that trained to the end (else among all)."""
    scored = [r for r in rows if r[metric] is not None and r["status"] != "error"]
    finished = [r for r in scored if r["status"] == "finished"]
    pool = finished or scored
    if not pool:
        return None
    return (max if mode == "max" else min)(pool, key=lambda r: r[metric])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)"
    columns = [c for c in rows[0] if c != "error" or any(r["error"] for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_best_config(sweep: SweepConfig, row: Dict[str, Any], path: Path) -> Path:
    """The best trial's resolved config, ready for `python -m pipeline.train --config path`."""
    cfg = _trial_config(sweep, {k: row[k] for k in sweep.space})
    cfg.run.dir = str(sweep.experiment_dir / "best")
    cfg.train.resume = None
    if cfg.data.root:  # runs "as is" from any folder
        cfg.data.root = str(Path(cfg.data.root).resolve())
    header = (f"# python -m pipeline.train --config {path}\n"
              f"# Best trial {row['trial']} of sweep '{sweep.name}': {sweep.metric}={_fmt(row[sweep.metric])} "
              f"at step {row['step']}; the full resolved config (edit run.dir to train elsewhere).\n")
    write_text_atomic(path, header + yaml.safe_dump(to_dict(cfg), sort_keys=False), durable=False)
    return path


def summarise(sweep: SweepConfig, results) -> SweepResult:
    exp_dir = sweep.experiment_dir
    rows = trial_rows(sweep, results)
    table = markdown_table(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(exp_dir / "trials.csv", buf.getvalue(), durable=False)
    write_text_atomic(exp_dir / "trials.md", f"# Sweep '{sweep.name}': {sweep.metric} ({sweep.mode})\n\n{table}\n",
                      durable=False)
    best = best_row(rows, sweep.metric, sweep.mode)
    best_path = write_best_config(sweep, best, exp_dir / "best_config.yaml") if best else None
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"\nTrials of sweep '{sweep.name}' ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}):\n"
          f"{table}\nSaved {exp_dir / 'trials.csv'} and {exp_dir / 'trials.md'}", flush=True)
    if best_path:
        print(f"Best trial {best['trial']}: {sweep.metric}={_fmt(best[sweep.metric])}; its config: {best_path}\n"
              f"  python -m pipeline.train --config {best_path}", flush=True)
    return SweepResult(exp_dir, rows, best, best_path, table, counts=counts)
