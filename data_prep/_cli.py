"""Command-line options shared by the dataset commands (cub, svhn, digits): job splitting and safety flags."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

from . import DataPrepError
from .jobs import JobOptions, job_options_from_env

if TYPE_CHECKING:  # argparse is imported by the commands' main, not by `from data_prep import cub`
    import argparse


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("jobs (pieces, resume, finalise)")
    group.add_argument("--workers", type=int, default=1, help="processes on this machine (default 1)")
    group.add_argument("--num-jobs", type=int, default=None,
                       help="split the shards over J jobs (default: $SLURM_ARRAY_TASK_COUNT or 1)")
    group.add_argument("--job-index", type=int, default=None,
                       help="this job's piece, 0..J-1 (default: $SLURM_ARRAY_TASK_ID, else every piece)")
    group.add_argument("--finalize-only", action="store_true",
                       help="write no shards; check that all are complete and write manifest.json")
    group.add_argument("--no-finalize", action="store_true",
                       help="write this job's shards only; leave manifest.json to --finalize-only")
    group.add_argument("--overwrite", action="store_true",
                       help="replace an output folder that holds another dataset or other options")
    group.add_argument("--strict", action="store_true", help="a corrupt image is an error, not a skip")


def job_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The job flags as keyword arguments of cub.prepare / svhn.prepare."""
    return asdict(job_options(args))


def print_summary(dataset: str, manifest: Optional[Dict[str, Any]], out: str) -> None:
    if manifest is None:
        return
    counts = ", ".join(f"{s}: {v['num_samples']} in {len(v['shards'])} shards" for s, v in manifest["splits"].items())
    print(f"{dataset}: {counts}; {len(manifest['skipped'])} skipped; manifest {Path(out) / 'manifest.json'}")


def job_options(args: argparse.Namespace) -> JobOptions:
    num_jobs, job_index = job_options_from_env(args.num_jobs, args.job_index)
    if args.workers < 1:
        raise DataPrepError(f"--workers must be >= 1, got {args.workers}")
    return JobOptions(workers=args.workers, num_jobs=num_jobs, job_index=job_index,
                      finalize=not args.no_finalize, finalize_only=args.finalize_only,
                      overwrite=args.overwrite, strict=args.strict)
