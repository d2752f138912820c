"""Training speed of the digits runner (the Trainer) against a plain PyTorch loop, side by side.

    .venv/bin/python benchmarks/bench_digits_speed.py                      # 1 thread, RTS, batch 128
    .venv/bin/python benchmarks/bench_digits_speed.py --threads 2          # two intra-op threads
    .venv/bin/python benchmarks/bench_digits_speed.py --compile            # the runner under torch.compile
    .venv/bin/python benchmarks/bench_digits_speed.py --channels-last      # + plain loops in channels_last

The plain loop is a few lines of PyTorch, the way a paper's script trains Table 1's RTS models: the
digits held in memory as float tensors, a fresh RTS distortion drawn for every batch with
F.affine_grid / F.grid_sample, Adam, forward, backward, step. The runner's step is the real one of
`python -m pipeline.experiments distorted`: `Trainer.train_step` on its training stream (webdataset
shards of undistorted digits written by `data_prep digits --fresh-train`, PNG decode, the fresh
distortion of `data.distortion`, normalisation), with configs/digits/{cnn,st_cnn}.yaml as they are
(channels_last on CPU: `train.cpu_channels_last`) at the plain models' size (CNN conv 9x9x32 - 7x7x64: `model.extra.width=32`). Both sides train the same models
on the same 42 px RTS digits with the same batch.

Measured in rounds that alternate the variants (machine load hits each alike); the figure is images
per CPU-second of the process (one thread by default: on a shared machine wall time measures the
neighbours), and ratio = runner / plain (>= 1: the runner is at least as fast). The plain loop is
in PyTorch's default (contiguous) layout, as such scripts are; `--channels-last` adds the plain
loops in channels_last and the runner in the contiguous layout, so each layout is compared with itself.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.digits import DigitsOptions, load_split, prepare  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.train.distributed import DistEnv  # noqa: E402
from pipeline.train.trainer import Trainer  # noqa: E402

MNIST = REPO / "tests" / "data" / "mnist"


# ---- the plain loop ------------------------------------------------------------------------------

def rts(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each 28x28 digit rotated (+-45 deg), scaled (0.7-1.2) and placed at random in a 42x42 canvas."""
    b = x.shape[0]
    angle = torch.deg2rad(torch.rand(b, generator=g) * 90 - 45)
    half = 28 * (torch.rand(b, generator=g) * 0.5 + 0.7) / 42
    t = (torch.rand(b, 2, generator=g) * 2 - 1) * (1 - half)[:, None]
    c, s = torch.cos(angle), torch.sin(angle)
    a = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2) / half[:, None, None]
    theta = torch.cat([a, -(a @ t[..., None])], -1)
    return F.grid_sample(x, F.affine_grid(theta, (b, 1, 42, 42), align_corners=False), align_corners=False)


class PlainCNN(nn.Module):
    def __init__(self, size: int = 42):
        super().__init__()
        pad = 4 if size < 28 else 0
        self.c1, self.c2 = nn.Conv2d(1, 32, 9, padding=pad), nn.Conv2d(32, 64, 7)
        side = ((size + 2 * pad - 8) // 2 - 6) // 2
        self.fc = nn.Linear(64 * side * side, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        return self.fc(F.max_pool2d(F.relu(self.c2(x)), 2).flatten(1))


class PlainSTCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.loc = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 20, 5),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(320, 20), nn.ReLU(), nn.Linear(20, 6))
        nn.init.zeros_(self.loc[-1].weight)
        self.loc[-1].bias.data.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))
        self.cnn = PlainCNN(21)

    def forward(self, x):
        theta = self.loc(x).view(-1, 2, 3)
        y = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)
        return self.cnn(F.avg_pool2d(y, 2))


class PlainLoop:
    def __init__(self, model: nn.Module, digits: torch.Tensor, labels: torch.Tensor, batch: int,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.model, self.digits, self.labels, self.batch = model.to(memory_format=memory_format), digits, labels, batch
        self.memory_format = memory_format
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.g = torch.Generator().manual_seed(0)

    def step(self) -> None:
        idx = torch.randint(0, len(self.digits), (self.batch,), generator=self.g)
        x = rts(self.digits[idx], self.g).contiguous(memory_format=self.memory_format)
        loss = F.cross_entropy(self.model(x), self.labels[idx])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


# ---- the runner's step ---------------------------------------------------------------------------

class RunnerLoop:
    def __init__(self, config: str, data_root: Path, batch: int, extra: list):
        cfg = load_config(REPO / "configs" / "digits" / config, [
            f"data.root={data_root}", f"train.global_batch_size={batch}", "model.extra.width=32", "train.device=cpu",
            "run.dir=/tmp/unused", *extra])
        self.trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False))
        self.model = self.trainer.learner.model
        self.stream = self.trainer.train_stream()

    def step(self) -> None:
        self.trainer.train_step(self.stream)


def cpu_seconds_per_step(loop, steps: int) -> tuple:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loop.step()
    return (time.process_time() - cpu) / steps, (time.perf_counter() - wall) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="the runner's models under torch.compile (train.compile=true)")
    p.add_argument("--channels-last", action="store_true",
                   help="also the plain loops with channels_last models and inputs (the trainer uses it on CUDA only)")
    p.add_argument("--out", default=None, help="write the JSON figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rts"
        prepare(DigitsOptions(idx_root=str(MNIST), out=str(root), distortion="RTS", train_count=8000, fresh_train=True,
                              shard_size=2000))
        images, labels = load_split(MNIST, "test")
        digits = torch.from_numpy(images[:8000].copy()).float().div(255)[:, None]
        targets = torch.from_numpy(labels[:8000].astype("int64"))
        extra = ["train.compile=true"] if args.compile else []
        variants = {"plain cnn": PlainLoop(PlainCNN(), digits, targets, args.batch),
                    "runner cnn": RunnerLoop("cnn.yaml", root, args.batch, extra),
                    "plain st-cnn": PlainLoop(PlainSTCNN(), digits, targets, args.batch),
                    "runner st-cnn": RunnerLoop("st_cnn.yaml", root, args.batch, extra)}
        if args.channels_last:  # the same layout on both sides, and the runner in the default layout
            last = torch.channels_last
            variants["plain cnn channels_last"] = PlainLoop(PlainCNN(), digits, targets, args.batch, last)
            variants["plain st-cnn channels_last"] = PlainLoop(PlainSTCNN(), digits, targets, args.batch, last)
            contiguous = extra + ["train.cpu_channels_last=false"]
            variants["runner cnn contiguous"] = RunnerLoop("cnn.yaml", root, args.batch, contiguous)
            variants["runner st-cnn contiguous"] = RunnerLoop("st_cnn.yaml", root, args.batch, contiguous)
        params = {name: sum(q.numel() for q in v.model.parameters()) for name, v in variants.items()}
        for v in variants.values():  # warm-up (compiles, fills the loader's shuffle buffer)
            cpu_seconds_per_step(v, 3)
        cpu = {name: [] for name in variants}
        wall = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, v in variants.items():
                c, w = cpu_seconds_per_step(v, args.steps)
                cpu[name].append(c)
                wall[name].append(w)
    rate = {name: args.batch / statistics.median(values) for name, values in cpu.items()}
    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": args.threads, "batch": args.batch, "compile": args.compile,
        "steps_per_round": args.steps, "rounds": args.rounds, "parameters": params,
        "images_per_cpu_s": {k: round(v, 1) for k, v in rate.items()},
        "wall_s_per_step": {k: round(statistics.median(v), 4) for k, v in wall.items()},
        "ratio_runner_over_plain": {m: round(rate[f"runner {m}"] / rate[f"plain {m}"], 3) for m in ("cnn", "st-cnn")},
    }
    if args.channels_last:
        result["ratio_runner_over_plain_channels_last"] = {
            m: round(rate[f"runner {m}"] / rate[f"plain {m} channels_last"], 3) for m in ("cnn", "st-cnn")}
        result["ratio_runner_contiguous_over_plain"] = {
            m: round(rate[f"runner {m} contiguous"] / rate[f"plain {m}"], 3) for m in ("cnn", "st-cnn")}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
