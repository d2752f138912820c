"""Score a checkpoint: python -m pipeline.evaluate --checkpoint PATH [--split test] [overrides]

    python -m pipeline.evaluate --checkpoint runs/st2/checkpoints/best.pt
    torchrun --nproc_per_node 4 -m pipeline.evaluate --checkpoint runs/st2/checkpoints/best.pt --split test
    python -m pipeline.evaluate --checkpoint last.pt --data-root /data/cub_shards train.device=cpu

The model is rebuilt from the config stored in the checkpoint (dotted overrides apply on top of
it, e.g. a different data.root on another machine), the weights load with
`torch.load(weights_only=True)`, and every sample of the split is scored exactly once over all
ranks. Rank 0 prints one JSON object: checkpoint, step, split, num_samples and the task's metrics.
Exit codes: 0 done, 2 bad input (one line `error: ...`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from pipeline.config import Config, apply_overrides, from_dict


def checkpoint_config(state: Dict[str, Any], overrides: Sequence[str], source: str) -> Config:
    """The checkpoint's config with dotted `overrides` applied, parsed as pipeline.train parses them."""
    cfg = apply_overrides(from_dict(state["config"], source), overrides)
    from pipeline.models.normalisation import resolve_normalisation
    resolve_normalisation(cfg)  # a no-op for checkpoints that stored what training resolved (before pretrained=None)
    cfg.model.pretrained = None  # the checkpoint supplies the weights: never download them
    return cfg


def load_model(path: str | Path, overrides: Sequence[str] = ()):
    """(model in eval mode on the CPU, its config, the checkpoint state) rebuilt from a checkpoint."""
    from pipeline.models import build_model
    from pipeline.train import checkpoint as ckpt

    state = ckpt.load(path)
    cfg = checkpoint_config(state, overrides, f"{path} + overrides")
    model = build_model(cfg.model)
    ckpt.load_weights(model, state["model"], path, cfg.model.name)
    return model.eval(), cfg, state


def evaluate_checkpoint(path: str | Path, split: Optional[str] = None, overrides: Sequence[str] = (),
                        max_samples: Optional[int] = None) -> Dict[str, Any]:
    """Metrics of the checkpoint at `path` on `split` (default: the config's data.eval_split)."""
    from pipeline.data import read_manifest
    from pipeline.evaluation import evaluate
    from pipeline.train.distributed import setup, teardown

    model, cfg, state = load_model(path, overrides)
    split = split or cfg.data.eval_split
    env = setup(cfg.train.device)
    try:
        if not cfg.data.root:
            raise ValueError(f"{path}: the stored config has no data.root; pass --data-root")
        manifest = read_manifest(cfg.data.root)
        model.to(env.device)
        metrics = evaluate(model, cfg, manifest, split, env.device, env.rank, env.world_size, max_samples)
        return {"checkpoint": str(path), "step": state["step"], "split": split,
                "rank": env.rank, **metrics}
    finally:
        teardown(env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by pipeline.train (.pt)")
    parser.add_argument("--split", default=None, help="split of the manifest to score (default: data.eval_split)")
    parser.add_argument("--data-root", default=None, help="folder holding manifest.json (default: the checkpoint's)")
    parser.add_argument("--max-samples", type=int, default=None, help="score only the first N samples")
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
        print(json.dumps(result, indent=None, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
