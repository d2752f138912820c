"""Score a checkpoint: python -m pipeline.evaluate --checkpoint PATH [--split test] [--json] [overrides]

    python -m pipeline.evaluate --checkpoint runs/st2/checkpoints/best.pt
    torchrun --nproc_per_node 4 -m pipeline.evaluate --checkpoint runs/st2/checkpoints/best.pt --split test
    python -m pipeline.evaluate --checkpoint last.pt --data-root /data/cub_shards train.device=cpu --json

The model is rebuilt from the config stored in the checkpoint (dotted overrides apply on top of
it, e.g. a different data.root on another machine), the weights load with
`torch.load(weights_only=True)`, and every sample of the split is scored exactly once over all
ranks by the trainer's own Evaluator. Rank 0 prints a short readable summary: the checkpoint,
split and samples, the task's metrics, each stream's window (centre, spread of the centres, scale)
and, when the data has parts, each part's hit-rate per stream. With --json it prints one JSON
object instead (for scripts): checkpoint, step, split, num_samples, num_skipped, the task's
metrics, windows, part_hit_rate, seconds.
Exit codes: 0 done, 2 bad input (one line `error: ...`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from pipeline.config import Config, apply_overrides, from_dict


def checkpoint_config(stored: Dict[str, Any], overrides: Sequence[str], source: str) -> Config:
    """A checkpoint's stored config with dotted `overrides` applied, parsed as pipeline.train parses them."""
    cfg = apply_overrides(from_dict(stored, source), overrides)
    from pipeline.models.normalisation import resolve_normalisation
    resolve_normalisation(cfg)  # a no-op for checkpoints that stored what training resolved (before pretrained=None)
    cfg.model.pretrained = None  # the checkpoint supplies the weights: never download them
    return cfg


def load_model(path: str | Path, overrides: Sequence[str] = ()):
    """(model in eval mode on the CPU, its config, the Checkpoint) rebuilt from a checkpoint."""
    from pipeline.models import build_model
    from pipeline.train import checkpoint as ckpt

    checkpoint = ckpt.read(path)
    cfg = checkpoint_config(checkpoint.config, overrides, f"{path} + overrides")
    model = build_model(cfg.model)
    ckpt.load_weights(model, checkpoint.model, path, cfg.model.name)
    return model.eval(), cfg, checkpoint


def evaluate_checkpoint(path: str | Path, split: Optional[str] = None, overrides: Sequence[str] = (),
                        max_samples: Optional[int] = None) -> Dict[str, Any]:
    """Metrics of the checkpoint at `path` on `split` (default: the config's data.eval_split)."""
    from pipeline.data import read_manifest
    from pipeline.train.distributed import setup, teardown
    from pipeline.train.evaluator import Evaluator

    model, cfg, checkpoint = load_model(path, overrides)
    env = setup(cfg.train.device)
    try:
        if not cfg.data.root:
            raise ValueError(f"{path}: the stored config has no data.root; pass --data-root")
        manifest = read_manifest(cfg.data.root)
        model.to(env.device)
        evaluator = Evaluator(cfg, env, manifest, getattr(model, "task", manifest.task), split, max_samples)
        metrics = evaluator.score(model)
        return {"checkpoint": str(path), "step": checkpoint.step, "rank": env.rank, **metrics}
    finally:
        teardown(env)


def summary_lines(result: Dict[str, Any]) -> List[str]:
    """The readable summary of an evaluation result (see the module docstring), aligned lines."""
    rows = [("checkpoint", f"{result['checkpoint']} (step {result['step']})"),
            ("split", f"{result['split']}: {result['num_samples']} samples"
                      + (f", {result['num_skipped']} skipped as corrupt" if result.get("num_skipped") else ""))]
    rows += [(name, f"{value:.4f}") for name, value in result.items()
             if isinstance(value, float) and name != "seconds"]
    indent = max(12, max(len(name) for name, _ in rows) + 2)
    lines = [f"{name:<{indent}}{value}" for name, value in rows]
    lines += _window_lines(result.get("windows"), indent) + _part_lines(result.get("part_hit_rate"), indent)
    return [line.rstrip() for line in lines]


def _window_lines(windows: Optional[Dict[str, Any]], indent: int) -> List[str]:
    """Per stream: mean window centre, spread (std) of the centres, and scale (side / image side);
    coordinates run from -1 (left, top) to 1 (right, bottom)."""
    streams = (windows or {}).get("streams") or []
    if not streams:
        return []
    lines = [f"{'windows':<{indent}}{'stream':<8}{'centre x, y':<16}{'spread x, y':<16}{'scale w, h':<14}outside"]
    for i, w in enumerate(streams):
        lines.append(f"{'':<{indent}}{i:<8}{w['center_x']:+.2f}, {w['center_y']:+.2f}{'':<4}"
                     f"{w['spread_x']:.2f}, {w['spread_y']:.2f}{'':<6}{w['width'] / 2:.2f}, {w['height'] / 2:.2f}"
                     f"{'':<4}{w['outside']:.2f}")
    if len(streams) > 1:
        lines.append(f"{'':<{indent}}mean overlap (IoU) between the streams' windows {windows['mean_overlap_iou']:.2f}")
    return lines


def _part_lines(hits: Optional[List[Dict[str, float]]], indent: int) -> List[str]:
    """Per part: the share of images (where it is visible) whose window holds it, one column per stream."""
    if not hits:
        return []
    parts = list(dict.fromkeys(part for stream in hits for part in stream))
    width = max(len(p) for p in parts) + 2
    lines = [f"{'part hits':<{indent}}{'part':<{width}}" + "".join(f"stream {i:<3}" for i in range(len(hits)))]
    for part in parts:
        cells = "".join(f"{stream[part]:<10.2f}" if part in stream else f"{'-':<10}" for stream in hits)
        lines.append(f"{'':<{indent}}{part:<{width}}" + cells)
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by pipeline.train (.pt)")
    parser.add_argument("--split", default=None, help="split of the manifest to score (default: data.eval_split)")
    parser.add_argument("--data-root", default=None, help="folder holding manifest.json (default: the checkpoint's)")
    parser.add_argument("--max-samples", type=int, default=None, help="score only the first N samples")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of the summary")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.device=cpu")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    from pipeline.train import INPUT_ERRORS
    try:
        result = evaluate_checkpoint(args.checkpoint, args.split, overrides, args.max_samples)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.pop("rank") == 0:
        print(json.dumps(result, indent=None, default=str) if args.json else "\n".join(summary_lines(result)),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
