"""Sweep overhead: wall time of an N-trial tiny sweep against N times the same training run alone.

    python benchmarks/bench_sweep_overhead.py --trials 4 --out runs/bench/sweep_overhead.json

All sides train the same tiny config (configs/sweeps/tiny_cpu.yaml's overrides, one learning
rate, no early stopping) on the same tiny shards, one trial at a time:
  alone     `python -m pipeline.train` run N times in a row (each a fresh process, as a user would)
  alone_1p  N calls of `pipeline.train.run` in one process (imports paid once, like a reused actor)
  sweep     `python -m pipeline.tune` with N identical trials and max_concurrent=1, counting Ray's
            start and shutdown, Tune's bookkeeping and its checkpoint copies
Prints the times and the ratios sweep / alone and sweep / alone_1p, the time Tune reports inside
the trials, and writes all as JSON. With trials this small the fixed costs dominate: the figures
bound the overhead of real (minutes-long) trials from above.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import free_port  # noqa: E402
from shard_fixtures import write_tiny_cub_shards  # noqa: E402

TINY = REPO / "configs" / "sweeps" / "tiny_cpu.yaml"


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    env.pop("RAY_ADDRESS", None)
    return env


def _timed(command: list, cwd: Path) -> float:
    start = time.perf_counter()
    run = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="train.max_steps of every run")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="runs/bench/sweep_overhead.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        shards = write_tiny_cub_shards(tmp / "cub")
        sweep = yaml.safe_load(TINY.read_text())
        overrides = [o for o in sweep["overrides"] if not o.startswith("train.max_steps=")]
        overrides += [f"train.max_steps={args.steps}", f"data.root={shards}"]

        baseline = []
        for i in range(args.trials):
            baseline.append(_timed([sys.executable, "-m", "pipeline.train", *overrides, f"optim.lr={args.lr}",
                                    f"run.dir={tmp / 'alone' / str(i)}"], REPO))
            print(f"alone run {i + 1}/{args.trials}: {baseline[-1]:.1f} s", flush=True)

        one_process = ("import sys; from pipeline.config import load_config; from pipeline.train import run\n"
                       f"for i in range({args.trials}):\n"
                       f"    run(load_config(None, sys.argv[1:] + [f'run.dir={tmp / 'one'}/{{i}}']))")
        alone_1p = _timed([sys.executable, "-c", one_process, *overrides, f"optim.lr={args.lr}"], REPO)
        print(f"{args.trials} runs in one process: {alone_1p:.1f} s", flush=True)

        sweep.update(name="bench", overrides=overrides, scheduler="none", num_trials=args.trials, max_concurrent=1,
                     space={"optim.lr": {"type": "choice", "values": [args.lr]}}, storage_path=str(tmp / "sweeps"))
        sweep_file = tmp / "bench.yaml"
        sweep_file.write_text(yaml.safe_dump(sweep, sort_keys=False))
        sweep_s = _timed([sys.executable, "-m", "pipeline.tune", "--config", str(sweep_file),
                          "--dashboard-port", str(free_port())], REPO)
        print(f"sweep of {args.trials} trials: {sweep_s:.1f} s", flush=True)
        # Tune's own clock inside each trial (training, evaluation, reporting and checkpoint copies).
        in_trials = [json.loads(f.read_text().splitlines()[-1])["time_total_s"]
                     for f in (tmp / "sweeps" / "bench").glob("*/result.json")]

    alone_s = sum(baseline)
    result = {
        "trials": args.trials, "steps_per_trial": args.steps,
        "alone_total_s": round(alone_s, 2), "alone_runs_s": [round(t, 2) for t in baseline],
        "alone_one_process_s": round(alone_1p, 2),
        "sweep_total_s": round(sweep_s, 2), "sweep_time_in_trials_s": round(sum(in_trials), 2),
        "sweep_fixed_cost_s": round(sweep_s - sum(in_trials), 2),
        "ratio_sweep_over_alone": round(sweep_s / alone_s, 3),
        "ratio_sweep_over_alone_one_process": round(sweep_s / alone_1p, 3),
        "overhead_per_trial_s": round((sweep_s - alone_s) / args.trials, 2),
        "overhead_per_trial_vs_one_process_s": round((sweep_s - alone_1p) / args.trials, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
    }
    print(f"N={args.trials}: sweep {sweep_s:.1f} s (in trials {sum(in_trials):.1f} s) vs {args.trials} x alone "
          f"{alone_s:.1f} s -> ratio {result['ratio_sweep_over_alone']:.2f}; vs one process {alone_1p:.1f} s "
          f"-> ratio {result['ratio_sweep_over_alone_one_process']:.2f} "
          f"({result['overhead_per_trial_vs_one_process_s']:+.1f} s per trial)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
