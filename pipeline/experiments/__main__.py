"""python -m pipeline.experiments distorted --idx-root DIR [--train-count N] [--profile quick|standard|paper] ...
   python -m pipeline.experiments addition --idx-root DIR [--train-count N] [--profile quick|standard] ...
   python -m pipeline.experiments coloc --idx-root DIR --classes 3,5,8 [--profile quick|standard] ...
   python -m pipeline.experiments window-gradient --checkpoint RUN/checkpoints/best.pt

Thin launcher: the experiments live in the importable modules of this package.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from data_prep import DataPrepError

EXPERIMENTS = ("distorted", "addition", "coloc", "window-gradient")
USAGE = """usage: python -m pipeline.experiments <experiment> [--help | options]

experiments:
  distorted        the paper's Table 1: FCN, CNN, ST-FCN, ST-CNN on distorted digits, each run through the
                   trainer (profiles quick, standard, paper); the table, results.json and pictures
  addition         the paper's Table 4: FCN, CNN, ST-FCN, 2xST-FCN on MNIST addition (two RTS digits, one
                   per channel, labelled with their sum); the table, each transformer's channel shares,
                   addition_mnist.json and the transformers' outputs
  coloc            the paper's Table 5: co-localisation of MNIST digits (T, TC) with a triplet loss, each run
                   through the trainer; the table, coloc_mnist.json and the boxes over the optimisation
  window-gradient  probe a checkpoint: does the gradient through the sampler point the windows at the object?
"""


def digits_parser(name: str, description: str, profiles, profile_help: str, out_stem: str) -> argparse.ArgumentParser:
    """The options the digits experiments share (data, output, profile, budget, report)."""
    p = argparse.ArgumentParser(prog=f"python -m pipeline.experiments {name}", description=description)
    p.add_argument("--idx-root", required=True, help="folder with the MNIST (or Fashion-MNIST) IDX files")
    p.add_argument("--train-count", type=int, default=None,
                   help="split one IDX pair: its first N digits train, the rest test (e.g. 8000 for MNIST's t10k)")
    p.add_argument("--out", default=None, help=f"results, cached shards, runs (default runs/{out_stem}_<profile>)")
    p.add_argument("--profile", default="standard", choices=tuple(profiles), help=profile_help)
    p.add_argument("--quick", dest="profile", action="store_const", const="quick", help="same as --profile quick")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per table cell")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (the profile's lr milestones scale)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--train-limit", type=int, default=None, help="first N training digits (default: profile's)")
    p.add_argument("--test-limit", type=int, default=None, help="first N test images (default: profile's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the CNNs (default: CPU cores)")
    p.add_argument("--num-examples", type=int, default=None, help="test images in each picture")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table and pictures from the runs OUT already holds")
    return p


def parse_distorted(argv: List[str]) -> argparse.Namespace:
    from .distorted import DISTORTIONS, MODEL_KEYS, PROFILES, ROWS

    p = digits_parser("distorted", "Paper Table 1: FCN/CNN/ST-FCN/ST-CNN on distorted digits.", PROFILES,
                      "quick: every code path, minutes; standard: the 2-core table; paper: the paper's schedule",
                      "digits")
    p.add_argument("--distortions", default=",".join(DISTORTIONS), help="comma-separated subset of R,RTS,P,E,TC")
    p.add_argument("--models", default=",".join(MODEL_KEYS),
                   help=f"comma-separated subset of {','.join(ROWS)} (default: Table 1's {len(MODEL_KEYS)} rows)")
    p.add_argument("--loc-lr-scale", type=float, default=None, help="localisation lr = lr x this")
    return p.parse_args(argv)


def parse_addition(argv: List[str]) -> argparse.Namespace:
    from .addition import PROFILES, ROWS

    p = digits_parser("addition", "Paper Table 4: FCN/CNN/ST-FCN/2xST-FCN on MNIST addition.", PROFILES,
                      "quick: every code path in about a minute; standard: the 2-core table (3 seeds)", "addition")
    p.add_argument("--models", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--first-seed", type=int, default=None,
                   help="train seeds from this one on (runners sharing --out can split the seeds)")
    return p.parse_args(argv)


def parse_coloc(argv: List[str]) -> argparse.Namespace:
    from .coloc import PROFILES

    p = argparse.ArgumentParser(prog="python -m pipeline.experiments coloc",
                                description="Paper Table 5: co-localisation of MNIST digits, plain (T) and cluttered (TC).")
    p.add_argument("--idx-root", required=True, help="folder with the MNIST IDX files (one pair, e.g. t10k)")
    p.add_argument("--classes", default="3,5,8", help="comma-separated digits: one co-localisation run per class")
    p.add_argument("--clutter", default="T,TC", help="comma-separated subset of T,TC")
    p.add_argument("--out", default=None, help="results, cached shards, runs (default runs/coloc_<profile>)")
    p.add_argument("--profile", default="standard", choices=tuple(PROFILES),
                   help="quick: every code path in about a minute; standard: the 2-core table")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per (clutter, class)")
    p.add_argument("--count", type=int, default=None, help="images per class (paper: 100)")
    p.add_argument("--train-count", type=int, default=None,
                   help="the IDX pair's first N digits train the feature CNN, the images come from the rest (8000)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps per co-localisation run")
    p.add_argument("--feature-steps", type=int, default=None, help="training steps of the feature CNN")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--margin", type=float, default=None, help="the triplet hinge's margin (paper: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per co-localisation run (default 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config override of every co-localisation run (repeatable), e.g. model.transform=translation")
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

    from . import addition, coloc, distorted

    experiment, parse = {"addition": (addition, parse_addition), "coloc": (coloc, parse_coloc)}.get(
        argv[0], (distorted, parse_distorted))
    args = parse(argv[1:])
    # coloc has no --report-only: its finished runs are found and reused (train.resume=auto)
    run_kwargs = {} if experiment is coloc else {"train_missing": not args.report_only}
    try:
        profile = replace(experiment.profile_from_args(args),
                          extra={"command": "python -m pipeline.experiments " + " ".join(argv)})
        result = experiment.run(profile, **run_kwargs)
    except (distorted.ExperimentError, DataPrepError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"wrote {result['table_path']} and {len(result['pictures'])} picture(s) in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
