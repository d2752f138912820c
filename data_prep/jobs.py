"""Deterministic pieces, resumable shard writing and manifest finalisation, shared by cub and svhn.

A dataset command turns its raw input into a *plan*: an ordered list of `ShardSpec`s, each naming
one output shard and the work items that go into it. The plan depends only on the raw data and the
content options, never on timing, `--workers` or `--num-jobs`, so every run writes the same bytes:

- shard g of the plan (counting over splits in order) belongs to job `g % num_jobs`;
- a shard is written by one process from its spec alone (items in sorted order, fixed tar times);
- after a shard is renamed into place its manifest entry and skip list go to
  `OUT/.data_prep/shards/<shard>.json`; a shard with both is complete and a rerun leaves it alone;
- the manifest is written once every shard of the plan is complete (by whichever job finishes
  last, or by `--finalize-only`).

`OUT/.data_prep/options.json` records what the folder holds (dataset, content options, plan
digest), so a run with other data or options is refused unless `overwrite=True`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import DataPrepError
from .contract import SHARD_FILE, new_manifest, partial_files, shard_name, write_json_atomic
from .shards import ShardWriter, fsync_files

STATE_DIR = ".data_prep"

# (samples, skipped): samples are webdataset dicts; skipped is [{"key", "reason"}]
ShardContent = Tuple[Iterator[Dict[str, Any]], List[Dict[str, str]]]


@dataclass(frozen=True)
class ShardSpec:
    """One output shard: its split, index within the split, and the (picklable) work items."""

    split: str
    index: int
    items: Tuple[Any, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


@dataclass(frozen=True)
class JobOptions:
    """How to run a plan; none of these change what is written."""

    workers: int = 1
    num_jobs: int = 1
    job_index: Optional[int] = None  # None: every piece (all jobs' shards) in this process
    finalize: bool = True
    finalize_only: bool = False
    overwrite: bool = False
    strict: bool = False


@dataclass
class Plan:
    """What a dataset command will write, and what identifies it in an output folder."""

    dataset: str
    specs: List[ShardSpec]
    splits: List[str]
    options: Dict[str, Any]  # content options only (not workers/jobs): part of the identity
    root: str
    manifest_extra: Dict[str, Any] = field(default_factory=dict)  # classes, parts, task, ...
    skipped: List[Dict[str, str]] = field(default_factory=list)  # found while planning
    plan_digest: Optional[str] = None  # default: digest of the specs' items (must be JSON-able)

    def __post_init__(self) -> None:
        if self.plan_digest is None:
            self.plan_digest = digest([[s.split, s.index, list(s.items)] for s in self.specs] + [self.skipped])

    @property
    def identity(self) -> Dict[str, Any]:
        # through JSON so that it compares equal to the copy read back from options.json
        return json.loads(json.dumps({"dataset": self.dataset, "options": self.options,
                                      "plan_digest": self.plan_digest}))


def job_options_from_env(num_jobs: Optional[int], job_index: Optional[int]) -> Tuple[int, Optional[int]]:
    """--num-jobs/--job-index, defaulting to a SLURM array's task count and id when set."""
    env = os.environ
    if num_jobs is None and env.get("SLURM_ARRAY_TASK_COUNT"):
        num_jobs = _env_int("SLURM_ARRAY_TASK_COUNT")
    if job_index is None and env.get("SLURM_ARRAY_TASK_ID"):
        # array ids may start anywhere and skip (--array=1-15:2): count from the smallest, by the step
        first = _env_int("SLURM_ARRAY_TASK_MIN") if env.get("SLURM_ARRAY_TASK_MIN") else 0
        step = _env_int("SLURM_ARRAY_TASK_STEP") if env.get("SLURM_ARRAY_TASK_STEP") else 1
        job_index = (_env_int("SLURM_ARRAY_TASK_ID") - first) // max(step, 1)
    num_jobs = 1 if num_jobs is None else num_jobs
    if num_jobs < 1:
        raise DataPrepError(f"--num-jobs must be >= 1, got {num_jobs}")
    if job_index is not None and not 0 <= job_index < num_jobs:
        raise DataPrepError(f"--job-index must be in [0, {num_jobs}), got {job_index}")
    return num_jobs, job_index


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise DataPrepError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def chunk_specs(split: str, items: Sequence[Any], shard_size: int) -> List[ShardSpec]:
    """Pieces of at most `shard_size` items of an ordered item list, in order.

    Where the last piece would hold less than half a shard (33 items in shards of 16: 16, 16, 1),
    the items are spread evenly over as many shards instead (11, 11, 11): training draws every
    shard equally often, so a one-sample shard would show its sample a dozen times as often as
    the rest, and each shard costs an open and a tar header however little it holds.
    """
    if shard_size < 1:
        raise DataPrepError(f"--shard-size must be >= 1, got {shard_size}")
    count, remainder = -(-len(items) // shard_size), len(items) % shard_size
    if remainder and 2 * remainder < shard_size:
        bounds = [len(items) * i // count for i in range(count + 1)]
    else:
        bounds = [*range(0, len(items), shard_size), len(items)]
    return [ShardSpec(split, i, tuple(items[start:stop])) for i, (start, stop) in enumerate(zip(bounds, bounds[1:]))]


class ExistsCheck:
    """os.path.exists(os.path.join(images_dir, rel)), from one listing per folder instead of a stat
    per image (CUB: 200 folders, 11,788 images; SVHN: 3 folders, 248,823 images; on a cluster file
    system a stat is a round trip).

    A name listed in its folder and not a symlink exists; anything else (a symlink, a folder that
    cannot be listed, a name spelt otherwise than listed, a missing file) is asked of os.path.exists.
    """

    def __init__(self, images_dir: str) -> None:
        self.images_dir = images_dir
        self.listed: Dict[str, Optional[set]] = {}

    def __call__(self, rel: str) -> bool:
        folder, _, name = rel.rpartition("/")
        try:
            names = self.listed[folder]
        except KeyError:
            names = self.listed[folder] = self._list(os.path.join(self.images_dir, folder))
        if names is not None and name in names:
            return True
        return os.path.exists(os.path.join(self.images_dir, rel))  # os.path: pathlib costs ~10 us per call

    @staticmethod
    def _list(folder: str) -> Optional[set]:
        try:
            with os.scandir(folder) as entries:
                return {entry.name for entry in entries if not entry.is_symlink()}
        except (OSError, ValueError):  # ValueError: a NUL in the name (os.path.exists says False)
            return None


def digest(obj: Any) -> str:
    """sha256 of a JSON-able object (the plan's fingerprint in options.json)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_plan(out: str | Path, plan: Plan, build: Callable[[ShardSpec, bool], ShardContent],
             opts: JobOptions) -> Optional[Dict[str, Any]]:
    """Write this job's missing shards, then the manifest if the whole plan is complete.

    `build(spec, strict)` must be a module-level function (it runs in worker processes).
    Returns the manifest, or None when other jobs' shards are still missing.
    """
    out = Path(out)
    if not opts.finalize_only:
        claim_output(out, plan, opts.overwrite)
        mine = [s for g, s in enumerate(plan.specs) if opts.job_index is None or g % opts.num_jobs == opts.job_index]
        todo = [s for s in mine if not _complete(out, s)]
        for spec in todo:  # a killed run's temporary file; its shard is ours alone to write
            for stale in partial_files(out, spec.name):
                stale.unlink(missing_ok=True)
        _write_all(out, todo, build, opts)
        print(f"{plan.dataset}: wrote {len(todo)} shard(s), {len(mine) - len(todo)} already complete", file=sys.stderr)
    elif not (out / STATE_DIR / "options.json").is_file():
        raise DataPrepError(f"{out}: no data-prep run to finalise (missing {STATE_DIR}/options.json)")
    else:
        _check_identity(out, plan, overwrite=False)
    if not (opts.finalize or opts.finalize_only):
        return None
    missing = [s.name for s in plan.specs if not _complete(out, s)]
    if missing:
        if opts.finalize_only:
            raise DataPrepError(f"{out}: {len(missing)} shard(s) not written yet, first {missing[0]}; run the missing jobs first")
        print(f"{plan.dataset}: {len(missing)} shard(s) of other jobs still missing; the last job "
              "(or --finalize-only) writes the manifest", file=sys.stderr)
        return None
    manifest = _manifest(out, plan)
    fsync_files(out / spec.name for spec in plan.specs)  # the manifest vouches for them: on disk first
    write_json_atomic(out / "manifest.json", manifest)
    _warn_skipped(manifest["skipped"])
    return manifest


def _write_all(out: Path, todo: List[ShardSpec], build, opts: JobOptions) -> None:
    progress = _Progress(len(todo))
    if opts.workers <= 1 or len(todo) <= 1:
        _write_in_thread(out, todo, build, opts.strict, progress.done)
    else:
        _write_in_pool(out, todo, build, opts, progress.done)


def _write_in_thread(out: Path, todo: List[ShardSpec], build, strict: bool, done: Callable[[str], Any]) -> None:
    """One process: this thread reads the images of shard k+1 while the writer threads finish shard k."""
    skipped_of: Dict[str, List[Dict[str, str]]] = {}

    def written(entry: Dict[str, Any]) -> None:  # on the writer thread, once the shard is in place
        _record(out, entry, skipped_of.pop(entry["name"]))
        done(entry["name"])

    with ShardWriter(durable=False, on_written=written) as writer:
        for spec in todo:
            samples, skipped_of[spec.name] = build(spec, strict)  # `skipped` fills up as samples are read
            writer.write(out / spec.name, samples)


def _write_in_pool(out: Path, todo: List[ShardSpec], build, opts: JobOptions, done: Callable[[str], Any]) -> None:
    """Worker processes, each given runs of a few shards (its writer thread then works across them).

    The workers get the shard list once, as they start, and tasks name runs of it by position.
    Forked workers share the parent's copy: sending the specs with the tasks took 0.1 s of pickling
    in the parent and 0.4 s of unpickling in the workers for CUB's 11,788 items. Where fork is not
    safe (a parent with other threads, which may hold locks the child then waits on forever) or
    not there, each worker unpickles the list once.
    """
    import multiprocessing  # ~10 ms of imports that one worker does not need
    from concurrent.futures import ProcessPoolExecutor

    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        method = "fork"
    else:
        method = "forkserver" if "forkserver" in methods else "spawn"
    per_task = max(1, min(8, len(todo) // (4 * opts.workers)))  # >= 4 tasks per worker balance the load
    pool = ProcessPoolExecutor(max_workers=opts.workers, mp_context=multiprocessing.get_context(method),
                               initializer=_receive_work, initargs=(out, todo, build, opts.strict))
    futures = [pool.submit(_write_run, start, start + per_task) for start in range(0, len(todo), per_task)]
    try:
        for future in as_completed(futures):
            for name in future.result():  # re-raises the first error (e.g. --strict on a corrupt image)
                done(name)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # shards already started finish; no new ones
        raise
    pool.shutdown(wait=True)


# a pool worker's share of the job: (out, todo, build, strict), set once as the worker starts
_work: Optional[Tuple[Path, List[ShardSpec], Callable, bool]] = None


def _receive_work(out: Path, todo: List[ShardSpec], build, strict: bool) -> None:
    global _work
    _work = (out, todo, build, strict)


def _write_run(start: int, stop: int) -> List[str]:
    out, todo, build, strict = _work
    names: List[str] = []
    _write_in_thread(out, todo[start:stop], build, strict, names.append)
    return names


class _Progress:
    """A line on stderr at most every `every` seconds, so long jobs show they are moving."""

    def __init__(self, total: int, every: float = 30.0):
        self.total, self.every, self.count = total, every, 0
        self.start = self.last = time.monotonic()

    def done(self, name: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = self.count / (now - self.start)
            print(f"  {self.count}/{self.total} shards ({name}), {rate * 60:.1f} shards/min, "
                  f"~{(self.total - self.count) / rate / 60:.1f} min left", file=sys.stderr)


def _record(out: Path, entry: Dict[str, Any], skipped: List[Dict[str, str]]) -> None:
    """Mark a shard complete. Neither file is fsynced here: shards are flushed before the manifest
    is written, and a shard a power cut truncated has the wrong size, so `_complete` redoes it."""
    write_json_atomic(_state_file(out, entry["name"]), {"entry": entry, "skipped": skipped}, durable=False)


def _state_file(out: Path, shard: str) -> Path:
    return out / STATE_DIR / "shards" / f"{shard[:-4]}.json"


def _complete(out: Path, spec: ShardSpec) -> bool:
    state, shard = _state_file(out, spec.name), out / spec.name
    if not (state.is_file() and shard.is_file()):
        return False
    try:
        entry = json.loads(state.read_text())["entry"]
    except (ValueError, KeyError):
        return False
    return entry.get("bytes") == shard.stat().st_size


def _manifest(out: Path, plan: Plan) -> Dict[str, Any]:
    splits: Dict[str, Any] = {name: {"num_samples": 0, "shards": []} for name in plan.splits}
    skipped = list(plan.skipped)
    for spec in plan.specs:
        record = json.loads(_state_file(out, spec.name).read_text())
        splits[spec.split]["shards"].append(record["entry"])
        splits[spec.split]["num_samples"] += record["entry"]["num_samples"]
        skipped.extend(record["skipped"])
    return new_manifest(plan.dataset, splits, skipped, extra=plan.manifest_extra,
                        source={"root": plan.root, "options": plan.options, "plan_digest": plan.plan_digest})


def _warn_skipped(skipped: List[Dict[str, str]]) -> None:
    if not skipped:
        return
    kinds: Dict[str, int] = {}
    for s in skipped:
        kind = s["reason"].split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    detail = ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))
    print(f"warning: {len(skipped)} sample(s) left out ({detail}); listed in manifest.json 'skipped'", file=sys.stderr)


# ---- output folder ownership ----------------------------------------------------------------

def claim_output(out: Path, plan: Plan, overwrite: bool) -> None:
    """Make `out` ours for this plan: refuse (or with overwrite, clear) a folder holding other data."""
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"{out}: --out exists and is not a folder")
    _check_identity(out, plan, overwrite)
    try:
        (out / STATE_DIR / "shards").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataPrepError(f"{out}: cannot create the output folder ({err.strerror})") from None
    options = out / STATE_DIR / "options.json"
    if not options.is_file():
        write_json_atomic(options, plan.identity)


def _check_identity(out: Path, plan: Plan, overwrite: bool) -> None:
    held = _held_identity(out)
    if held is None:
        strangers = [p.name for p in out.glob("*.tar")] if out.is_dir() else []
        if strangers and not overwrite:
            raise DataPrepError(f"{out} already holds shards of unknown origin (e.g. {strangers[0]}); "
                                "choose another --out or pass --overwrite")
        if strangers:
            clear_output(out)
        return
    if held == plan.identity:
        return
    diff = _first_difference(held, plan.identity)
    if not overwrite:
        raise DataPrepError(f"{out} already holds a different data-prep output ({diff}); "
                            "choose another --out or pass --overwrite")
    clear_output(out)


def _held_identity(out: Path) -> Optional[Dict[str, Any]]:
    for path in (out / STATE_DIR / "options.json", out / "manifest.json"):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                raise DataPrepError(f"{path}: not valid JSON; pass --overwrite to replace the folder's contents") from None
            if path.name == "manifest.json":  # a manifest without our state: compare what it records
                source = data.get("source", {})
                data = {"dataset": data.get("dataset"), "options": source.get("options"),
                        "plan_digest": source.get("plan_digest")}
            return data
    return None


def _first_difference(held: Dict[str, Any], wanted: Dict[str, Any], prefix: str = "") -> str:
    """The first key whose value differs, down to the option: 'options.shard_size: 45 there, 30 now'."""
    for key in sorted(set(held) | set(wanted)):
        old, new = held.get(key), wanted.get(key)
        if old == new:
            continue
        if key == "plan_digest":
            return "the raw data or the selected samples differ"
        if isinstance(old, dict) and isinstance(new, dict):
            return _first_difference(old, new, f"{prefix}{key}.")
        return f"{prefix}{key}: {json.dumps(old)[:60]} there, {json.dumps(new)[:60]} now"
    return "unknown difference"


def clear_output(out: Path) -> None:
    """Remove what a data-prep run writes (shards, manifest, state); leave any other file alone."""
    for path in out.iterdir():
        if SHARD_FILE.match(path.name) or path.name == "manifest.json" or ".partial-" in path.name:
            path.unlink()
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
