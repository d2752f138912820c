"""Ray Tune sweeps over the trainer: `python -m pipeline.tune --config configs/sweeps/X.yaml`.

    from pipeline.tune import load_sweep, run_sweep
    result = run_sweep(load_sweep("configs/sweeps/tiny_cpu.yaml", ["data.root=/data/tiny"]))

Ray is imported only when a sweep runs, so validating sweep files needs no Ray.
"""
from pipeline.tune.runner import SweepResult, run_sweep
from pipeline.tune.sweep import Resources, SweepConfig, SweepError, format_override, load_sweep, sweep_from_dict

__all__ = ["Resources", "SweepConfig", "SweepError", "SweepResult", "format_override", "load_sweep",
           "run_sweep", "sweep_from_dict"]
