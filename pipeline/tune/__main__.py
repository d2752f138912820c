"""python -m pipeline.tune --config configs/sweeps/X.yaml [key=value ...] [--resume] [--address ADDR]

Runs a Ray Tune sweep over the trainer (see pipeline/tune/runner.py and docs/tune.md).
Exit codes: 0 every trial finished or was stopped early by the scheduler; 1 some trial failed
(after its retries) or the sweep was interrupted (rerun the same command to resume it); 2 a bad
sweep file or override (a one-line `error: ...`, before any trial starts).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from pipeline.config import ConfigError
from pipeline.data.manifest import DataError, read_manifest
from pipeline.tune.runner import DEFAULT_DASHBOARD_PORT, run_sweep
from pipeline.tune.sweep import SweepError, load_sweep


def check_data(sweep) -> None:
    """Every trial reads data.root (the base config's, or each searched value): its manifest and shards
    must be there, as seen from this machine (on a cluster: the shared filesystem the workers see)."""
    roots = sweep.space.get("data.root", {}).get("values") or [sweep.base_config().data.root]
    for root in roots:
        read_manifest(root)  # DataError naming data.root or the missing file


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="sweep keys (num_trials=8, scheduler.grace_period=200) or experiment "
                             "config keys applied to every trial (data.root=/data/cub)")
    parser.add_argument("--resume", action="store_true",
                        help="resume the interrupted sweep in the experiment folder (rerunning without "
                             "it resumes too; --resume fails if there is nothing to resume)")
    parser.add_argument("--address", default=None,
                        help="join this running Ray cluster (default: RAY_ADDRESS, else start a local Ray)")
    parser.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                        help="port of a local Ray's dashboard, bound to 127.0.0.1 (default %(default)s)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs a local Ray offers to trials (default: all of this machine's)")
    parser.add_argument("--check", action="store_true", help="validate the sweep file and exit")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.config, args.overrides)
        check_data(sweep)  # before Ray starts: a trial that cannot read its data would only fail and retry
        if args.check:
            print(f"{args.config}: ok ({len(sweep.space)} searched keys, experiment {sweep.experiment_dir})")
            return 0
        result = run_sweep(sweep, address=args.address, resume=args.resume,
                           dashboard_port=args.dashboard_port, num_cpus=args.num_cpus)
    except (SweepError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.counts.get("interrupted") or result.counts.get("not started"):
        print("the sweep stopped before all trials ended: rerun the same command to resume it", file=sys.stderr)
        return 1
    return 1 if result.counts.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
