"""Fast paths of the spatial-transformer core against their plain versions, side by side in one run.

    .venv/bin/python benchmarks/bench_st_core.py --json runs/bench_st_core.json            # GPU: paper sizes
    .venv/bin/python benchmarks/bench_st_core.py --device cpu --batch 4 --input-size 224 --crop-size 112 \\
        --backbone resnet10t --json runs/bench_st_core_cpu.json                            # CPU: a small version

For each N in --num-streams, forward + backward (median of --repeats after --warmup):
  crops    `warp_many` (N grids stacked in one grid_sample, the input read in place) against the plain
           reference (the input expanded to N copies + affine_grid + grid_sample, as a plain
           N x ST-CNN does); gradients flow to theta, as in training. Also peak memory on CUDA.
  streams  the N x ST-CNN train step with its streams in a loop against `stream_mode="vmap"`, and
           both against N + 1 passes of the bare backbone (the ratio the issue asks to bring to 1.0).
Prints one JSON line per figure and writes them all to --json with the machine, versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models import create_model  # noqa: E402
from pipeline.models.localisation import create_timm  # noqa: E402
from pipeline.models.spatial_transformer import theta_to_affine, tiling_windows, warp_many  # noqa: E402


def plain_crops(x: torch.Tensor, theta: torch.Tensor, crop: int, scale: float) -> torch.Tensor:
    """The reference: N expanded copies of the input, one affine_grid + grid_sample over B*N."""
    b, n = theta.shape[:2]
    matrix = theta_to_affine(theta.reshape(b * n, 2), "translation", scale)
    grid = F.affine_grid(matrix, [b * n, x.shape[1], crop, crop], align_corners=False)
    copies = x[:, None].expand(b, n, *x.shape[1:]).reshape(b * n, *x.shape[1:])
    return F.grid_sample(copies, grid, align_corners=False).view(b, n, x.shape[1], crop, crop)


def timed(fn, device: str, warmup: int, repeats: int) -> dict:
    """Median seconds per call and (CUDA) peak GiB of `fn`."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"s": statistics.median(times), "peak_gib": peak}


def bench_crops(args, n: int) -> dict:
    x = torch.randn(args.batch, 3, args.input_size, args.input_size, device=args.device)
    centres = tiling_windows(n, args.scale)[:, 1:].float().to(args.device)
    theta = (centres + 0.01 * torch.randn(args.batch, n, 2, device=args.device)).requires_grad_()

    def run(fn):
        def step():
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
                fn(x, theta).float().square().mean().backward()
        return step

    plain = timed(run(lambda a, t: plain_crops(a, t, args.crop_size, args.scale)), args.device, args.warmup, args.repeats)
    fast = timed(run(lambda a, t: warp_many(a, t, "translation", args.crop_size, scale=args.scale)),
                 args.device, args.warmup, args.repeats)
    return {"plain_s": plain["s"], "warp_many_s": fast["s"], "speedup": plain["s"] / fast["s"],
            "plain_peak_gib": plain["peak_gib"], "warp_many_peak_gib": fast["peak_gib"]}


def train_step(model, x, y, args):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_streams(args, n: int, backbone_s: float) -> dict:
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.input_size, args.input_size, device=args.device).to(memory_format=fmt)
    y = torch.randint(0, 200, (args.batch,), device=args.device)
    out = {}
    for mode in ("loop", "vmap"):
        model = create_model("nxst_cnn", backbone=args.backbone, num_streams=n, input_size=args.input_size,
                             crop_size=args.crop_size, stream_mode=mode).to(args.device, memory_format=fmt)
        out[f"{mode}_s"] = timed(train_step(model, x, y, args), args.device, args.warmup, args.repeats)["s"]
        del model
    out["vmap_speedup"] = out["loop_s"] / out["vmap_s"]
    out["loop_over_(n+1)_backbone"] = out["loop_s"] / ((n + 1) * backbone_s)
    out["vmap_over_(n+1)_backbone"] = out["vmap_s"] / ((n + 1) * backbone_s)
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=448)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--num-streams", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-streams", action="store_true", help="only the crop sampler")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.bf16 = args.device == "cuda"
    args.channels_last = args.device == "cuda"
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "settings": {k: v for k, v in vars(args).items() if k != "json"}, "results": {}}
    if not args.skip_streams:
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        backbone = create_timm(args.backbone, None, num_classes=200).to(args.device, memory_format=fmt)
        x = torch.randn(args.batch, 3, args.crop_size, args.crop_size, device=args.device).to(memory_format=fmt)
        y = torch.randint(0, 200, (args.batch,), device=args.device)
        backbone_s = timed(train_step(backbone, x, y, args), args.device, args.warmup, args.repeats)["s"]
        report["results"]["backbone_step_s"] = backbone_s
        print(json.dumps({"backbone_step_s": backbone_s}), flush=True)
        del backbone
    for n in args.num_streams:
        figures = {"crops": bench_crops(args, n)}
        if not args.skip_streams:
            figures["streams"] = bench_streams(args, n, backbone_s)
        report["results"][f"N={n}"] = figures
        print(json.dumps({f"N={n}": figures}), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
