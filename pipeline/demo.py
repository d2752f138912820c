"""The main job on a laptop, end to end:  make demo   (or: python -m pipeline.demo [--out demo_out])

generate the embedded fine-grained dataset -> shard it -> train a 2xST-CNN with DDP on 2 processes
(torchrun, gloo) -> evaluate the best checkpoint -> draw the attention -> write a short report.
Everything runs on CPU without downloads. `--baseline` also trains configs/demo_baseline.yaml (the
bare backbone on the same data and budget) and puts both in the report.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
BASELINE_CONFIG = REPO / "configs" / "demo_baseline.yaml"


def _stage(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # Two ranks on a small machine: one compute thread each, so they do not fight over cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    return env


def _run(cmd: List[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=_child_env(), cwd=REPO)


def make_dataset(out: Path, classes: int, images_per_class: int, size: int, seed: int) -> Path:
    from data_prep import cub, synthetic_cub

    raw = out / "raw"
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        _stage(f"generating the synthetic fine-grained dataset ({classes} classes x {images_per_class} images, {size}px)")
        synthetic_cub.generate(raw, classes=classes, images_per_class=images_per_class, size=size, seed=seed,
                               test_fraction=0.3)
        _stage(f"sharding it with the real CUB data-prep path -> {shards}")
        cub.prepare(raw, shards, overwrite=True, shard_size=16)
    else:
        _stage(f"dataset already sharded at {shards}")
    return shards


def train(config: Path, shards: Path, run_dir: Path, nproc: int, overrides: List[str]) -> None:
    _stage(f"training {config.name} with DDP on {nproc} processes (torchrun, gloo) -> {run_dir}")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
          "-m", "pipeline.train", "--config", str(config), f"data.root={shards}", f"run.dir={run_dir}",
          "train.resume=auto", *overrides])


def evaluate(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints" / "best.pt"
    if not ckpt.exists():
        ckpt = run_dir / "checkpoints" / "last.pt"
    _stage(f"evaluating {ckpt} on the test split")
    out = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(ckpt), "--split", "test"],
                         check=True, env=_child_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stream_tables(metrics: dict) -> List[str]:
    """Markdown tables of the per-stream window statistics and part hit-rates from evaluation."""
    streams = (metrics.get("windows") or {}).get("streams") or []
    if not streams:
        return []
    keys = list(streams[0])
    lines = ["| stream | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(f"{s[k]:.3f}" for k in keys) + " |" for i, s in enumerate(streams)]
    overlap = metrics["windows"].get("mean_overlap_iou")
    if overlap is not None:
        lines += ["", f"Mean overlap (IoU) between the streams' windows: {overlap:.3f}"]
    hits = metrics.get("part_hit_rate") or []
    if hits:
        parts = list(hits[0])
        lines += ["", "Part hit-rate: the fraction of test images whose window contains the (visible) part.", "",
                  "| stream | " + " | ".join(parts) + " |", "|---" * (len(parts) + 1) + "|"]
        lines += [f"| {i} | " + " | ".join(f"{h.get(p, float('nan')):.2f}" for p in parts) + " |"
                  for i, h in enumerate(hits)]
    return lines


def write_report(out: Path, run_dir: Path, metrics: dict, baseline: Optional[dict], seconds: float) -> Path:
    pictures = sorted((run_dir / "viz").glob("*.png"))
    lines = ["# Demo report", "",
             f"- test accuracy (2xST-CNN): **{metrics.get('top1', float('nan')):.3f}** on {metrics.get('num_samples')} images"]
    if baseline is not None:
        lines.append(f"- test accuracy (bare backbone, same data and budget): **{baseline.get('top1', float('nan')):.3f}**")
    lines += [f"- wall time: {seconds / 60:.1f} min", f"- run directory: {run_dir}",
              f"- metrics: {run_dir / 'metrics.jsonl'}", f"- checkpoints: {run_dir / 'checkpoints'}",
              f"- attention pictures: {', '.join(str(p) for p in pictures[-1:]) or 'none'}", ""]
    table = _stream_tables(metrics)
    if table:
        lines += ["## Per-stream attention", ""] + table + [""]
    lines += ["## All metrics", "", "```json", json.dumps(metrics, indent=1), "```", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "demo_out")
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--images-per-class", type=int, default=120)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--baseline", action="store_true", help="also train configs/demo_baseline.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for the demo run, e.g. train.max_steps=50")
    args = parser.parse_args(argv)

    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    shards = make_dataset(args.out, args.classes, args.images_per_class, args.size, args.seed)
    overrides = [f"model.num_classes={args.classes}", *args.overrides]
    run_dir = args.out / "run"
    train(DEMO_CONFIG, shards, run_dir, args.nproc, overrides)
    metrics = evaluate(run_dir)
    baseline = None
    if args.baseline:
        base_dir = args.out / "run_baseline"
        train(BASELINE_CONFIG, shards, base_dir, args.nproc, overrides)
        baseline = evaluate(base_dir)
    report = write_report(args.out, run_dir, metrics, baseline, time.time() - start)
    _stage(f"done in {(time.time() - start) / 60:.1f} min")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
