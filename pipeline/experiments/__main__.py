"""python -m pipeline.experiments distorted --idx-root DIR [--train-count N] [--profile quick|standard|paper] ...
   python -m pipeline.experiments window-gradient --checkpoint RUN/checkpoints/best.pt

Thin launcher: the experiments live in the importable modules of this package.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from data_prep import DataPrepError

EXPERIMENTS = ("distorted", "window-gradient")
USAGE = """usage: python -m pipeline.experiments <experiment> [--help | options]

experiments:
  distorted        the paper's Table 1: FCN, CNN, ST-FCN, ST-CNN on distorted digits, each run through the
                   trainer (profiles quick, standard, paper); the table, results.json and pictures
  window-gradient  probe a checkpoint: does the gradient through the sampler point the windows at the object?
"""


def parse_distorted(argv: List[str]) -> argparse.Namespace:
    from .distorted import DISTORTIONS, MODEL_KEYS, PROFILES, ROWS

    p = argparse.ArgumentParser(prog="python -m pipeline.experiments distorted",
                                description="Paper Table 1: FCN/CNN/ST-FCN/ST-CNN on distorted digits.")
    p.add_argument("--idx-root", required=True, help="folder with the MNIST or Fashion-MNIST IDX files")
    p.add_argument("--train-count", type=int, default=None,
                   help="split one IDX pair: its first N digits train, the rest test (e.g. 8000 for MNIST's t10k)")
    p.add_argument("--out", default=None, help="results, cached shards, runs (default runs/digits_<profile>)")
    p.add_argument("--profile", default="standard", choices=tuple(PROFILES),
                   help="quick: every code path, minutes; standard: the 2-core table; paper: the paper's schedule")
    p.add_argument("--quick", dest="profile", action="store_const", const="quick", help="same as --profile quick")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per (model, distortion)")
    p.add_argument("--distortions", default=",".join(DISTORTIONS), help="comma-separated subset of R,RTS,P,E,TC")
    p.add_argument("--models", default=",".join(MODEL_KEYS),
                   help=f"comma-separated subset of {','.join(ROWS)} (default: Table 1's {len(MODEL_KEYS)} rows)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (the profile's lr milestones scale)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--train-limit", type=int, default=None, help="first N training images (default: profile's)")
    p.add_argument("--test-limit", type=int, default=None, help="first N test images (default: profile's)")
    p.add_argument("--loc-lr-scale", type=float, default=None, help="localisation lr = lr x this")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPU cores)")
    p.add_argument("--num-examples", type=int, default=None, help="test images in each transformed-examples picture")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table and pictures from the runs OUT already holds")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in EXPERIMENTS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown experiment '{argv[0]}'; experiments: {', '.join(EXPERIMENTS)}", file=sys.stderr)
            return 2
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "window-gradient":
        from .window_gradient import main as window_gradient

        return window_gradient(argv[1:])
    from dataclasses import replace

    from .distorted import ExperimentError, profile_from_args, run

    args = parse_distorted(argv[1:])
    try:
        profile = replace(profile_from_args(args), extra={"command": "python -m pipeline.experiments " + " ".join(argv)})
        result = run(profile, train_missing=not args.report_only)
    except (ExperimentError, DataPrepError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"wrote {result['table_path']} and {len(result['pictures'])} picture(s) in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
