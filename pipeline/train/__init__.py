"""The DDP trainer: `run(cfg)` from Python (a Ray worker, a notebook), `main(argv)` for the CLI.

    python -m pipeline.train --config configs/cub/st2_448.yaml run.dir=runs/st2 optim.lr=0.01
    torchrun --nproc_per_node 8 -m pipeline.train --config ...       # one node, 8 GPUs
    srun --ntasks-per-node 8 python -m pipeline.train --config ...    # SLURM: ranks from SLURM_*

Exit codes of the CLI: 0 done; 2 bad input (config, data, checkpoint: a one-line `error: ...`);
1 the loss became NaN/inf; REQUEUE_EXIT_CODE (3) stopped by SIGTERM/SIGUSR1 after writing
`checkpoints/last.pt` -- requeue the job and it continues with `train.resume=auto`.
torchrun itself exits 1 when it is signalled, whatever its workers return (their checkpoint is
written all the same): a batch script that launches torchrun requeues from its own signal trap;
under `srun` (one task per GPU) the task's exit code is the trainer's.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

# Only torch-free modules here: `python -m pipeline.train` reports a config error in about a second,
# before torch is imported; the trainer and the process group come in with run().
from pipeline.config import Config, ConfigError, load_config, validate
from pipeline.data.manifest import DataError
from pipeline.train.signals import REQUEUE_EXIT_CODE, Preempted

__all__ = ["run", "main", "REQUEUE_EXIT_CODE", "INPUT_ERRORS", "Preempted", "NonFiniteLoss", "Trainer"]


def __getattr__(name: str) -> Any:
    if name in ("Trainer", "NonFiniteLoss"):  # imported on first use (they bring torch)
        from pipeline.train import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(cfg: Config, on_eval: Optional[Callable[[int, Dict[str, Any], Optional[Path]], None]] = None) -> Dict[str, Any]:
    """Train `cfg` on this process's share of the job; returns {step, metrics, best_metric, checkpoint, run_dir}.

    Joins the process group that exists (Ray Train), or the one torchrun / srun describe, or runs
    alone. `on_eval(step, metrics, checkpoint_path_or_None)` is called on every rank after each
    evaluation with the all-reduced metrics. Raises Preempted after a stop signal's checkpoint,
    NonFiniteLoss on a NaN/inf loss, ConfigError / ValueError on bad input.
    """
    from pipeline.train.tracking import check_installed
    check_installed(cfg.train.report_to)  # a missing tracker package fails before the process group forms
    from pipeline.train.distributed import planned_world_size, setup, teardown
    from pipeline.train.trainer import Trainer

    _default_logging()
    validate(cfg, planned_world_size())  # before the rendezvous: a bad batch size fails at once
    env = setup(cfg.train.device)
    try:
        return Trainer(cfg, env, on_eval).fit()
    finally:
        teardown(env)


def _default_logging() -> None:
    # Log lines must show up in batch jobs and Ray workers that configured no logging themselves.
    logger = logging.getLogger("pipeline")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# Bad input of any kind (config, data, checkpoint: all ValueErrors, CheckpointError too) -> `error: ...`, exit 2.
INPUT_ERRORS = (ConfigError, DataError, ValueError, FileNotFoundError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (only what differs from the defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.01 train.max_steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # torch is not imported yet: a bad key fails in a second
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pipeline.train.trainer import NonFiniteLoss
    try:
        summary = run(cfg)
    except Preempted as stop:
        print(f"{stop}; exiting with {REQUEUE_EXIT_CODE} so the job is requeued", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.getLogger("pipeline.train").info("done: step %d, best %s, checkpoint %s",
                                              summary["step"], summary["best_metric"], summary["checkpoint"])
    return 0
