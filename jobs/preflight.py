"""Pre-flight checks for cluster jobs: bad input fails here, before a job waits for GPUs.

    python jobs/preflight.py train CONFIG [section.key=value ...] [--world-size N] [--print-run-dir]
    python jobs/preflight.py sweep SWEEP.yaml [key=value ...]
    python jobs/preflight.py prep DATASET --root RAW --out OUT [data_prep options ...]   (prints OUT)

`jobs/submit` runs these on the login node before `sbatch`, and every job script runs them again
as its first step (the files may have moved while the job was queued). A failure prints one
line, `error: ...`, naming the file, key or value, and exits 2. Only light modules are imported
(the config schema, the sweep schema, the manifest reader): a check takes about a second, not a
torch import.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import this checkout's packages
    sys.path.insert(0, str(REPO))

# the data_prep commands built on data_prep.jobs.run_plan: array pieces, --no-finalize, --finalize-only
PREP_DATASETS = ("cub", "svhn")


class PreflightError(Exception):
    """One line naming what is wrong and where."""


def check_data_root(root: Optional[str], splits: Sequence[str], where: str = "data.root") -> int:
    """The shard folder holds a manifest.json that the trainer will accept (read_manifest: keys,
    counts, every listed shard present with its listed size) and that names `splits`.

    Returns the number of samples of the first split.
    """
    from pipeline.data.manifest import DataError, read_manifest  # json and stat: no torch

    if not root:
        raise PreflightError(f"{where} is not set: pass {where}=/path/to/shards (a folder holding manifest.json "
                             "from python -m data_prep) or set DATA_ROOT")
    folder = Path(root)
    if not folder.is_dir():
        raise PreflightError(f"{where}={root}: folder not found")
    if not (folder / "manifest.json").is_file():
        raise PreflightError(f"{where}={root}: no manifest.json there; prepare the shards first "
                             "(python -m data_prep ... or jobs/submit prep ...)")
    try:
        manifest = read_manifest(folder)
        counts = [manifest.num_samples(split) for split in splits]  # an unknown split is named here
    except DataError as err:
        raise PreflightError(str(err)) from None
    return counts[0] if counts else 0


def check_weights(cfg) -> None:
    """Where model.pretrained's weights will come from (a file, the local hub cache, the network),
    before any allocation: a compute node without network would retry the hub for a minute and die."""
    from pipeline.models.weights import check_pretrained

    pretrained = cfg.model.pretrained
    if isinstance(pretrained, str) and pretrained.lower() in ("true", "timm"):
        pretrained = True
    if pretrained in (None, False) or cfg.model.name not in ("nxst_cnn", "cub_baseline"):
        return
    names = {cfg.model.backbone} | ({cfg.model.loc_backbone} if cfg.model.loc_backbone else set())
    for name in sorted(names):
        try:
            check_pretrained(name, pretrained, probe_network=True)
        except ValueError as err:
            raise PreflightError(str(err)) from None


def check_train(config: Optional[str], overrides: Sequence[str], world_size: Optional[int] = None):
    """Load and validate the experiment config as the trainer will; check its data and weights."""
    from pipeline.config import ConfigError, load_config, validate

    if not config:
        raise PreflightError("no experiment config given: pass CONFIG (e.g. configs/cub/st2_448.yaml)")
    try:
        cfg = load_config(config, overrides)
        if world_size:
            validate(cfg, world_size)
    except ConfigError as err:
        raise PreflightError(str(err)) from None
    num_train = check_data_root(cfg.data.root, [cfg.data.train_split, cfg.data.eval_split])
    check_weights(cfg)
    print(f"preflight ok: {config}: data.root={cfg.data.root} ({num_train} {cfg.data.train_split} samples), "
          f"run.dir={cfg.run.dir}" + (f", world size {world_size}" if world_size else ""), file=sys.stderr)
    return cfg


def check_sweep(config: Optional[str], overrides: Sequence[str]):
    """The sweep file and the experiment config of its trials, and their data root."""
    from pipeline.config import ConfigError
    from pipeline.tune.sweep import SweepError, load_sweep

    if not config:
        raise PreflightError("no sweep config given: pass SWEEP.yaml (e.g. configs/sweeps/tiny_cpu.yaml)")
    try:
        sweep = load_sweep(config, overrides)
        cfg = sweep.base_config()
    except (SweepError, ConfigError) as err:
        raise PreflightError(str(err)) from None
    check_data_root(cfg.data.root, [cfg.data.train_split, cfg.data.eval_split])
    print(f"preflight ok: {config}: data.root={cfg.data.root}, experiment {sweep.experiment_dir}", file=sys.stderr)
    return sweep


def _option(args: Sequence[str], name: str) -> Optional[str]:
    """The value of `--name V` or `--name=V` in a data_prep argument list."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def check_prep(args: Sequence[str]) -> Path:
    """A data_prep command line: known dataset, raw root present, output not a file. Returns --out."""
    if not args or args[0] not in PREP_DATASETS:
        got = args[0] if args else "nothing"
        raise PreflightError(f"data_prep dataset '{got}' is not one of {', '.join(PREP_DATASETS)}")
    root, out = _option(args, "--root"), _option(args, "--out")
    if not root:
        raise PreflightError(f"data_prep {args[0]}: --root RAW is required")
    if not Path(root).exists():
        raise PreflightError(f"data_prep {args[0]}: --root {root}: raw dataset folder not found")
    if not out:
        raise PreflightError(f"data_prep {args[0]}: --out OUT is required")
    if Path(out).exists() and not Path(out).is_dir():
        raise PreflightError(f"data_prep {args[0]}: --out {out} exists and is not a folder")
    return Path(out)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "sweep", "prep"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    kind, rest = argv[0], argv[1:]
    world_size, print_run_dir = None, False
    if "--print-run-dir" in rest:
        rest.remove("--print-run-dir")
        print_run_dir = True
    if "--world-size" in rest:
        i = rest.index("--world-size")
        world_size = int(rest[i + 1])
        del rest[i:i + 2]
    try:
        if kind == "train":
            cfg = check_train(rest[0] if rest else None, rest[1:], world_size)
            if print_run_dir:
                print(cfg.run.dir)
        elif kind == "sweep":
            check_sweep(rest[0] if rest else None, rest[1:])
        else:
            print(check_prep(rest))
    except PreflightError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
