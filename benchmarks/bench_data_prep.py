"""Throughput of `python -m data_prep cub` against the bound of reading the same bytes, side by side.

    .venv/bin/python benchmarks/bench_data_prep.py --images 11788 --workers 1 2 --cache warm cold \
        --json runs/bench_data_prep.json

Builds a CUB-like root of N images (11,788 = all of CUB; the real CUB JPEGs of tests/data, or
of --jpeg-dir, repeated under new ids, else synthetic JPEGs of CUB's size), then times, in
turn and `--repeats` times each (median reported):
  read bound   `tar cf - images | cat > /dev/null`  (GNU tar skips reading when -f is /dev/null)
  tar bound    `tar cf OUT/all.tar images`           (read + write the bytes once: the job's own I/O)
  durable tar  the same, then `sync OUT/all.tar` (fsync): on disk, as data_prep's shards are before
               its manifest is written
  copy floor   a Python loop that reads, sha256-hashes and writes every file once (no tar, no fsync):
               the least work any job that writes checksummed shards must do
  plan only    start Python, import data_prep, read and check the metadata: data_prep's fixed cost
  data_prep    `python -m data_prep cub --workers W` for each W (and `--check full` with one worker)
and prints samples/s and each one's time over the read bound's (goal: <= 2 for data_prep with one
worker), in wall-clock and in CPU seconds (user + system of the command and its children).

--cache warm (default): the folder is in the page cache for every variant, the harshest bound
(memory speed). --cache cold: the page cache is dropped before every variant (root only:
`echo 1 > /proc/sys/vm/drop_caches`), so every variant reads from the disk, as a job on a
cluster does with a dataset it has not read lately. --cache warm cold measures both in one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CUB = REPO / "tests" / "data" / "cub" / "CUB_200_2011"


def build_root(dest: Path, num_images: int, jpeg_dir: Path = SAMPLE_CUB / "images") -> Path:
    """A CUB_200_2011 layout with `num_images` images in 200 classes, half train, 15 parts."""
    root = dest / "CUB_200_2011"
    shutil.rmtree(root, ignore_errors=True)
    sources = sorted(jpeg_dir.rglob("*.jpg")) if jpeg_dir.is_dir() else []
    synthetic = None if sources else _synthetic_jpegs(8)
    (root / "parts").mkdir(parents=True)
    classes = [f"{c:03d}.Class_{c}" for c in range(1, 201)]
    images, labels, split, boxes, locs = [], [], [], [], []
    for i in range(1, num_images + 1):
        cls = (i - 1) % 200 + 1
        rel = f"{classes[cls - 1]}/img_{i:06d}.jpg"
        path = root / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if sources:
            shutil.copyfile(sources[i % len(sources)], path)
        else:
            path.write_bytes(synthetic[i % len(synthetic)])
        images.append(f"{i} {rel}")
        labels.append(f"{i} {cls}")
        split.append(f"{i} {i % 2}")
        boxes.append(f"{i} 10.0 20.0 100.0 120.0")
        locs.extend(f"{i} {p} {50.0 + p} {60.0 + p} 1" for p in range(1, 16))
    files = {"classes.txt": [f"{c} {n}" for c, n in enumerate(classes, 1)], "images.txt": images,
             "image_class_labels.txt": labels, "train_test_split.txt": split, "bounding_boxes.txt": boxes,
             "parts/parts.txt": [f"{p} part {p}" for p in range(1, 16)], "parts/part_locs.txt": locs}
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def _synthetic_jpegs(count: int) -> list:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        smooth = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)
        Image.fromarray(smooth).resize((500, 375), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


COPY_FLOOR = """
import hashlib, os, sys
root, out = sys.argv[1], sys.argv[2]
sha = hashlib.sha256()
with open(out, "wb") as sink:
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            sha.update(data)
            sink.write(data)
"""


def timed(cmd, shell: bool = False, cold: bool = False) -> Tuple[float, float]:
    """(wall seconds, CPU seconds of the command and all its children: user + system)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if cold:
        drop_page_cache()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, shell=shell, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def drop_page_cache() -> None:
    """Write dirty pages back, then drop the clean ones, so the next command reads from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=6000, help="images in the CUB-like root (default 6000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", nargs="+", choices=["warm", "cold"], default=["warm"],
                        help="page cache state for every timed variant (see the top of this file)")
    parser.add_argument("--jpeg-dir", default=str(SAMPLE_CUB / "images"),
                        help="real JPEGs to repeat (default: the CUB samples of tests/data; synthetic if absent)")
    parser.add_argument("--skip-full", action="store_true", help="leave out the --check full variant")
    parser.add_argument("--json", default="runs/bench_data_prep.json")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)

    if "cold" in args.cache and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        # found out now, not after every warm variant has run
        print("warning: --cache cold needs to write /proc/sys/vm/drop_caches (root); measuring warm only",
              file=sys.stderr)
        args.cache = [c for c in args.cache if c != "cold"] or ["warm"]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        root = build_root(work, args.images, Path(args.jpeg_dir))
        nbytes = sum(p.stat().st_size for p in (root / "images").rglob("*.jpg"))
        timed(f"tar cf - -C {root} images | cat > /dev/null", shell=True)  # warm the page cache

        def data_prep(workers: int, check: str, cold: bool):
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            return timed([sys.executable, "-m", "data_prep", "cub", "--root", str(root), "--out", str(out),
                          "--workers", str(workers), "--check", check], cold=cold)

        variants = [(w, "fast") for w in args.workers] + ([] if args.skip_full else [(1, "full")])
        tables = {}
        for cache in args.cache:
            cold = cache == "cold"
            runs = {"read_bound": [], "tar_bound": [], "durable_tar": [], "copy_floor": [], "plan_only": []}
            for w, check in variants:
                runs[f"data_prep_w{w}_{check}"] = []
            for _ in range(args.repeats):  # interleaved so that machine load hits every variant alike
                runs["read_bound"].append(timed(f"tar cf - -C {root} images | cat > /dev/null", shell=True, cold=cold))
                runs["tar_bound"].append(timed(["tar", "cf", str(work / "all.tar"), "-C", str(root), "images"], cold=cold))
                (work / "all.tar").unlink()
                runs["durable_tar"].append(timed(f"tar cf {work / 'all.tar'} -C {root} images && sync {work / 'all.tar'}",
                                                 shell=True, cold=cold))
                (work / "all.tar").unlink()
                runs["copy_floor"].append(timed([sys.executable, "-c", COPY_FLOOR, str(root / "images"),
                                                 str(work / "all.bin")], cold=cold))
                (work / "all.bin").unlink()
                runs["plan_only"].append(timed([sys.executable, "-c", f"from data_prep import cub; cub.make_plan({str(root)!r})"],
                                               cold=cold))
                for w, check in variants:
                    runs[f"data_prep_w{w}_{check}"].append(data_prep(w, check, cold))
            tables[cache] = summarise(runs, args.images)
        result = {
            "command": "benchmarks/bench_data_prep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_avg_1m": os.getloadavg()[0]},
            "images": args.images, "megabytes": round(nbytes / 1e6, 1), "repeats": args.repeats,
            "page_cache": tables,
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    for cache, table in tables.items():
        print(f"page cache {cache}: {args.images} images, {nbytes / 1e6:.1f} MB")
        print(f"{'variant':<22}{'wall s':>9}{'samples/s':>11}{'x read bound':>14}{'x tar bound':>13}"
              f"{'x durable tar':>15}{'CPU s':>9}{'x read CPU':>12}")
        seconds = table["seconds_median"]
        for name, wall in seconds.items():
            cpu = table["cpu_seconds_median"][name]
            print(f"{name:<22}{wall:>9.3f}{table['samples_per_s'][name]:>11.1f}{wall / seconds['read_bound']:>14.2f}"
                  f"{wall / seconds['tar_bound']:>13.2f}{wall / seconds['durable_tar']:>15.2f}"
                  f"{cpu:>9.3f}{cpu / table['cpu_seconds_median']['read_bound']:>12.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


def summarise(runs: dict, images: int) -> dict:
    """Medians over the repeats and each data_prep variant's time over each baseline's."""
    median = {name: statistics.median(wall for wall, _ in times) for name, times in runs.items()}
    cpu = {name: statistics.median(c for _, c in times) for name, times in runs.items()}
    prep = [k for k in runs if k.startswith("data_prep")]
    return {
        "seconds_median": {k: round(v, 3) for k, v in median.items()},
        "seconds_each": {k: [round(wall, 3) for wall, _ in times] for k, times in runs.items()},  # spread, outliers
        "cpu_seconds_median": {k: round(v, 3) for k, v in cpu.items()},
        "samples_per_s": {k: round(images / v, 1) for k, v in median.items()},
        # how many times slower than each baseline (wall clock; and in CPU time, which a busy
        # shared machine distorts less)
        "slowdown_vs_read_bound": {k: round(median[k] / median["read_bound"], 2) for k in prep},
        "slowdown_vs_tar_bound": {k: round(median[k] / median["tar_bound"], 2) for k in prep},
        "slowdown_vs_durable_tar": {k: round(median[k] / median["durable_tar"], 2) for k in prep},
        "slowdown_vs_copy_floor": {k: round(median[k] / median["copy_floor"], 2) for k in prep},
        "cpu_slowdown_vs_read_bound": {k: round(cpu[k] / cpu["read_bound"], 2) for k in prep},
        "cpu_slowdown_vs_tar_bound": {k: round(cpu[k] / cpu["tar_bound"], 2) for k in prep},
    }


if __name__ == "__main__":
    sys.exit(main())
