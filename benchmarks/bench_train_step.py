"""Training-step cost of the N x ST-CNN against N+1 passes of its bare backbone, side by side.

    .venv/bin/python benchmarks/bench_train_step.py                       # CPU: resnet10t, 224 -> 112 crops
    .venv/bin/python benchmarks/bench_train_step.py --device cuda         # GPU: inception_v3, 448 -> 224, bf16
    .venv/bin/python benchmarks/bench_train_step.py --backbone resnet10t --input-size 128 --streams 2 4
    .venv/bin/python benchmarks/bench_train_step.py --device cuda --compile --streams 2   # torch.compile'd variants

Each variant is the trainer's own step (`Learner.step` and the loss read back: normalise, forward, loss, backward,
optimiser, schedule; channels_last and bf16 autocast on CUDA) on a fixed uint8 batch, so data
loading is not timed. Measured in rounds that alternate the variants (machine load hits each alike):
  nxst N     nxst_cnn with N streams at --input-size, crops of --crop-size
  backbone   the bare backbone classifier (cub_baseline) on --crop-size images, same batch size
(with --stream-mode vmap also nxst N_vmap: the streams as one torch.func.vmap call; with --compile
every variant runs under torch.compile (train.compile=true, --compile-mode) and its name ends in
_compiled, so the ratio compares like with like), and the figure of merit is
ratio = step(nxst N) / ((N + 1) x step(backbone)):  the N streams plus
the localisation trunk are N+1 backbone passes at the crop size, so 1.0 means the transformers
cost nothing beyond them (plain PyTorch reference on GPU: 1.06 for N=2, 1.10 for N=4). Step times
are wall time on GPU; on CPU they are the process's CPU time with one thread (neighbours on a
shared machine inflate wall time, not that), and wall times are reported beside them.
The warm-up steps are timed one by one (`warmup_step_s`); for compiled variants `compile_s` is
their sum minus as many steady steps: the compile time. Each variant's line is printed as soon as
its warm-up ends, so a run cut short by a timeout still shows the compile times reached (compiled,
the nxst variants go first, the backbone baseline last).
Peak memory (--memory auto: in-process on GPU, a fresh process on CPU): in-process, the bytes the
variant allocated when built plus torch.cuda.max_memory_allocated over its warm-up steps after
the first (whose compiling is left out) above what was allocated before its first step (the other
variants' weights are not counted); in a fresh process that builds only that variant and trains
3 steps, torch.cuda.max_memory_allocated on GPU, and on CPU the peak RSS (VmHWM) and that peak
minus the RSS after the imports.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.train.distributed import DistEnv  # noqa: E402
from pipeline.train.trainer import Learner  # noqa: E402

GPU_DEFAULTS = {"backbone": "inception_v3", "input_size": 448, "crop_size": 224, "batch": 32}
CPU_DEFAULTS = {"backbone": "resnet10t", "input_size": 224, "crop_size": 112, "batch": 8}


def variant_name(streams: int, stream_mode: str = "loop", compiled: bool = False) -> str:
    name = f"nxst{streams}" if streams else "backbone"
    if streams and stream_mode != "loop":
        name += f"_{stream_mode}"
    return name + ("_compiled" if compiled else "")


def variant_overrides(args, streams: int, stream_mode: str = "loop") -> list:
    """Config overrides of one variant (streams 0 = the bare backbone at the crop size)."""
    size = args.input_size if streams else args.crop_size
    model = ["model.name=nxst_cnn", f"model.num_streams={streams}", "optim.lr_scale.localisation=1e-4",
             f"model.extra.stream_mode={stream_mode}"] if streams else ["model.name=cub_baseline"]
    compiled = ["train.compile=true"] + ([f"train.compile_mode={args.compile_mode}"] if args.compile_mode else []) \
        if args.compile else []
    return [*model, f"model.backbone={args.backbone}", f"model.input_size={size}",
            f"model.crop_size={args.crop_size}", "model.pretrained=null",
            f"train.global_batch_size={args.batch}", f"train.precision={args.precision}",
            f"train.device={args.device}", *compiled]


def make_trainer(args, device: torch.device, streams: int, stream_mode: str = "loop"):
    """(world-size-1 learner, fixed uint8 batch, bytes it allocated when built) for `streams` streams
    (0 = the bare backbone at the crop size)."""
    size = args.input_size if streams else args.crop_size
    cfg = load_config(None, variant_overrides(args, streams, stream_mode))
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    learner = Learner(cfg, DistEnv(0, 1, 0, device, owns_group=False))
    built_bytes = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else 0
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    targets = torch.randint(0, cfg.model.num_classes, (args.batch,))
    if device.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    return learner, (images, targets), built_bytes


def timed_steps(variant, steps: int) -> Tuple[float, float]:
    """(wall, CPU) seconds per training step over `steps` steps (CUDA synchronised at both ends).

    On CPU the ratio uses the process's CPU time: on a shared machine wall time mostly measures
    the neighbours, while the CPU time of a one-thread process is its own work."""
    learner, batch, _ = variant
    device = learner.env.device
    forever = iter(lambda: batch, None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        learner.step(forever)[0].item()  # the trainer reads each step's loss back (its NaN check)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory(args, streams: int, stream_mode: str = "loop") -> dict:
    """Peak memory of a fresh process that builds only this variant and trains 3 steps."""
    cmd = [sys.executable, __file__, "--memory-child", str(streams), "--backbone", args.backbone,
           "--input-size", str(args.input_size), "--crop-size", str(args.crop_size), "--batch", str(args.batch),
           "--threads", str(args.threads), "--device", args.device, "--precision", args.precision,
           "--stream-mode", stream_mode]
    if args.compile:
        cmd += ["--compile"] + (["--compile-mode", args.compile_mode] if args.compile_mode else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_child(args) -> None:
    """GPU: torch.cuda.max_memory_allocated. CPU: peak RSS (VmHWM), and that peak minus the RSS
    after the imports (the variant's own footprint)."""
    imported = _proc_status_mb("VmRSS")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    variant = make_trainer(args, device, args.memory_child, args.stream_mode[0])
    timed_steps(variant, 3)
    if device.type == "cuda":
        print(json.dumps({"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}))
    else:
        peak = _proc_status_mb("VmHWM")
        print(json.dumps({"peak_rss_mb": peak, "peak_rss_over_imports_mb": peak - imported}))


def warm_up(name: str, variant, steps: int) -> dict:
    """Time the first `steps` steps one by one (they include torch.compile's compile) and, on CUDA,
    the variant's peak memory (see the module docstring)."""
    learner, _, built_bytes = variant
    device = learner.env.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for i in range(steps):
        times.append(timed_steps(variant, 1)[0])
        if cuda and i == 0 and steps > 1:
            # The peak of the later steps (the optimiser state exists by then), without what a
            # compiler allocated for itself while compiling in the first.
            torch.cuda.reset_peak_memory_stats(device)
    row = {"warmup_step_s": times}
    if cuda:
        row["inproc_peak_memory_mb"] = (built_bytes + torch.cuda.max_memory_allocated(device) - before) / 2**20
    print(f"{name}: warm-up steps " + ", ".join(f"{t:.2f}" for t in times) + " s"
          + (f" (first - last: {times[0] - times[-1]:.1f} s)" if steps > 1 else "")
          + (f", peak {row['inproc_peak_memory_mb']:.0f} MiB" if cuda else ""), flush=True)
    return row


def measure(args, device: torch.device) -> dict:
    backbone = variant_name(0, compiled=args.compile)
    variants = {variant_name(n, mode, args.compile): (n, mode) for n in args.streams for mode in args.stream_mode}
    # Compiled, the N x ST-CNN compiles first: a timeout then cuts the baseline, not the goal's compile time.
    variants = {**variants, backbone: (0, "loop")} if args.compile else {backbone: (0, "loop"), **variants}
    trainers, warm, failed = {}, {}, {}
    for name, (n, mode) in variants.items():  # built and warmed up one after another: compile times apart
        try:
            trainers[name] = make_trainer(args, device, n, mode)
            warm[name] = warm_up(name, trainers[name], args.warmup)
        except Exception as err:  # e.g. out of memory, or a compiler error: the other variants still count
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"{name}: FAILED, left out: {failed[name]}", flush=True)
            trainers.pop(name, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    variants = {name: spec for name, spec in variants.items() if name in trainers}
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved so that load changes hit every variant alike
        for name, trainer in trainers.items():
            w, c = timed_steps(trainer, args.steps)
            wall[name].append(w)
            cpu[name].append(c)
    # The figure of merit: GPU wall time; on CPU the CPU time (see timed_steps).
    basis = wall if device.type == "cuda" else cpu
    step = {name: statistics.median(t) for name, t in basis.items()}
    results = {}
    for name, (n, mode) in variants.items():
        row = {"streams": n, "stream_mode": mode if n else None, "compiled": args.compile,
               "precision": trainers[name][0].precision, "timed": "wall" if basis is wall else "cpu",
               "step_s": step[name], "images_per_s": args.batch / step[name],
               "wall_step_s": statistics.median(wall[name]), "wall_step_s_all_rounds": wall[name],
               "cpu_step_s_all_rounds": cpu[name]}
        row.update(warm[name])
        if args.compile:
            row["compile_s"] = sum(row["warmup_step_s"]) - len(row["warmup_step_s"]) * row["wall_step_s"]
        if n and backbone in step:
            row["ratio_to_n_plus_1_backbone_steps"] = step[name] / ((n + 1) * step[backbone])
            # Per round too: neighbours in time share the machine's state, so their spread is honest.
            row["ratio_all_rounds"] = [t / ((n + 1) * b) for t, b in zip(basis[name], basis[backbone])]
        results[name] = row
    # In-process figures exist on CUDA only; CPU's RSS needs a fresh process per variant.
    memory = "inproc" if args.memory == "auto" and device.type == "cuda" else args.memory
    memory = "child" if memory in ("auto", "inproc") and device.type != "cuda" else memory
    for name, (n, mode) in variants.items():  # after the timing, so a slow child costs only its own time
        if memory == "inproc":
            results[name]["peak_memory_mb"] = results[name]["inproc_peak_memory_mb"]
        elif memory == "child":
            results[name].update(peak_memory(args, n, mode))
    results.update({name: {"error": error} for name, error in failed.items()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backbone")
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--crop-size", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--streams", type=int, nargs="+", default=None, help="default: 2 on CPU, 2 4 on GPU")
    parser.add_argument("--precision", default="bf16", help="bf16 | fp16 | fp32 (CPU runs fp32: see train.cpu_autocast)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable on a shared machine)")
    parser.add_argument("--stream-mode", nargs="+", choices=["loop", "vmap"], default=["loop"],
                        help="model.extra.stream_mode of the nxst variants (several: one variant each)")
    parser.add_argument("--compile", action="store_true", help="every variant under torch.compile (train.compile)")
    parser.add_argument("--compile-mode", default=None, help="train.compile_mode (default: torch's default)")
    parser.add_argument("--memory", choices=["auto", "inproc", "child", "none"], default="auto",
                        help="peak memory: auto = inproc on GPU, child (a fresh process per variant) on CPU")
    parser.add_argument("--json", default=None, help="default: runs/bench_train_step_<device>.json")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.streams = args.streams or ([2, 4] if args.device == "cuda" else [2])
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        return memory_child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    results = measure(args, device)
    report = {
        "benchmark": "train_step", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "settings": {k: getattr(args, k) for k in ("device", "backbone", "input_size", "crop_size", "batch",
                                                    "streams", "stream_mode", "compile", "compile_mode",
                                                    "precision", "steps", "rounds", "warmup", "memory")},
        "results": results,
    }
    for name, row in results.items():
        if "error" in row:
            print(f"{name:16s} FAILED: {row['error']}")
            continue
        ratio = row.get("ratio_to_n_plus_1_backbone_steps")
        extra = f"  ratio {ratio:.3f}" if ratio is not None else ""
        if "compile_s" in row:
            extra += f"  compile {row['compile_s']:.1f} s"
        memory = row.get("peak_memory_mb", row.get("peak_rss_over_imports_mb"))
        memory = f"{memory:8.1f} MiB" if memory is not None else "     n/a"
        print(f"{name:16s} step {row['step_s'] * 1000:8.1f} ms ({row['timed']})  {row['images_per_s']:8.1f} img/s  "
              f"peak {memory}{extra}")
    out = Path(args.json or REPO / "runs" / f"bench_train_step_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
