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
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
BASELINE_CONFIG = REPO / "configs" / "demo_baseline.yaml"
# The demo's data: birds 1.45x the generator's default (patterned parts big enough to learn from
# 1,512 images) and clutter in bird colours without the birds' fine patterns (docs/experiments.md).
BIRD_SIZE = 1.45
PATTERNED_DISTRACTORS = 0.0


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


def make_dataset(out: Path, classes: int, images_per_class: int, size: int, seed: int, bird_size: float,
                 patterned_distractors: float) -> Path:
    from data_prep import cub, synthetic_cub

    raw = out / "raw"
    shards = out / "shards"
    _stage(f"generating the synthetic fine-grained dataset ({classes} classes x {images_per_class} images, {size}px)")
    # demo_out/raw is the demo's own: a root drawn with other options is replaced; the same one is kept.
    synthetic_cub.generate(raw, classes=classes, images_per_class=images_per_class, size=size, seed=seed,
                           test_fraction=0.3, bird_size=bird_size, patterned_distractors=patterned_distractors,
                           overwrite=True)
    manifest = shards / "manifest.json"
    if manifest.exists() and manifest.stat().st_mtime >= (raw / synthetic_cub.MANIFEST_NAME).stat().st_mtime:
        _stage(f"dataset already sharded at {shards}")
    else:
        _stage(f"sharding it with the real CUB data-prep path -> {shards}")
        cub.prepare(raw, shards, overwrite=True, shard_size=16)
    return shards


def train(config: Path, shards: Path, run_dir: Path, nproc: int, overrides: List[str]) -> None:
    _stage(f"training {config.name} with DDP on {nproc} processes (torchrun, gloo) -> {run_dir}")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
          "-m", "pipeline.train", "--config", str(config), f"data.root={shards}", f"run.dir={run_dir}",
          "train.resume=auto", *overrides])


def _best_checkpoint(run_dir: Path) -> Path:
    best = run_dir / "checkpoints" / "best.pt"
    return best if best.exists() else run_dir / "checkpoints" / "last.pt"


def evaluate(run_dir: Path) -> dict:
    ckpt = _best_checkpoint(run_dir)
    _stage(f"evaluating {ckpt} on the test split")
    out = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(ckpt), "--split", "test",
                          "--json"],
                         check=True, env=_child_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stream_tables(metrics: dict, initial_hits: Sequence[dict] = ()) -> List[str]:
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
        lines += [f"| {i} at initialisation | " + " | ".join(f"{h.get(p, float('nan')):.2f}" for p in parts) + " |"
                  for i, h in enumerate(initial_hits)]
    return lines


def _class_caption(name: str) -> str:
    """'007.Barred_crowned_Spotted_winged_Finch' -> 'Barred crown, Spotted wing' (other names as they are)."""
    words = name.split(".", 1)[-1].split("_")
    if len(words) == 5 and words[1] == "crowned" and words[3] == "winged":
        return f"{words[0]} crown, {words[2]} wing"
    return name.split(".", 1)[-1].replace("_", " ")


def initial_model(cfg):
    """The model of config `cfg` as training starts it: its windows are the same for every image."""
    import torch

    from pipeline.models import build_model

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model).eval()


def initial_part_hit_rate(cfg, fresh=None) -> List[dict]:
    """Part hit-rates (every part) of the windows a model of config `cfg` starts from, scored on
    the test split like the trained ones."""
    from pipeline.data import read_manifest
    from pipeline.evaluation import evaluate

    fresh = initial_model(cfg) if fresh is None else fresh
    metrics = evaluate(fresh, cfg, read_manifest(cfg.data.root), "test", "cpu", num_workers=0)
    return metrics.get("part_hit_rate") or []


def detail_part_groups(raw: Path, part_names: Sequence[str]) -> Dict[str, List[str]]:
    """The parts that decide the class of the generated birds, from the generator's own record:
    {"crown": ["crown"], "wing": ["left wing", "right wing"]} (the visible one of a pair counts)."""
    from data_prep import synthetic_cub

    detail = json.loads((raw / synthetic_cub.MANIFEST_NAME).read_text())["detail_parts"]
    groups = {name: [p for p in part_names if p == name or p.endswith(" " + name)] for name in detail.values()}
    missing = [name for name, members in groups.items() if not members]
    if missing:
        raise ValueError(f"{raw}: detail part(s) {', '.join(missing)} are not among the data set's parts")
    return groups


def detail_hit_rates(model, cfg, groups: Dict[str, List[str]]) -> List[Dict[str, float]]:
    """Per stream, over the test images: the fraction whose window holds each class-deciding part
    (a group counts when one of its visible points is inside) and all of them at once ("all").
    Boxes and parts score the windows only; the model never sees them."""
    import torch

    from pipeline.data import build_eval_loader, normalize, read_manifest
    from pipeline.evaluation import part_points
    from pipeline.metrics import contains

    manifest = read_manifest(cfg.data.root)
    index = {name: [manifest.parts.index(p) for p in members] for name, members in groups.items()}
    hits: Dict[str, List[torch.Tensor]] = {name: [] for name in [*groups, "all"]}
    loader = build_eval_loader(cfg, manifest, "test", rank=0, world_size=1, batch_size=64, num_workers=0)
    with torch.no_grad():
        for images, _, metas in loader:
            boxes = model.attend(normalize(images, cfg.data.mean, cfg.data.std))["boxes"].double()  # (B, N, 4)
            points, visible = part_points(metas, len(manifest.parts))  # (B, P, 2), (B, P)
            inside = contains(boxes, points) & visible[:, None]  # (B, N, P)
            hit = {name: inside[..., members].any(-1) for name, members in index.items()}  # (B, N) each
            seen = {name: visible[:, members].any(1) for name, members in index.items()}  # (B,) each
            for name in index:
                hits[name].append(hit[name][seen[name]].double())
            every = torch.stack(list(seen.values())).all(0)
            hits["all"].append(torch.stack(list(hit.values())).all(0)[every].double())
    rates = {name: torch.cat(h).mean(0) for name, h in hits.items()}
    return [{name: round(float(r[k]), 4) for name, r in rates.items()} for k in range(len(rates["all"]))]


def draw_attention(model, cfg, path: Path, count: int = 6) -> Path:
    """The README picture: `count` test images with each stream's learnt window, the crops, and
    the true and predicted class beside them."""
    import torch

    from pipeline.data import build_eval_loader, normalize, read_manifest
    from pipeline.train.viz import attention_picture

    manifest = read_manifest(cfg.data.root)
    loader = build_eval_loader(cfg, manifest, "test", rank=0, world_size=1, batch_size=64, num_workers=0)
    images, targets = _one_per_class(loader, count)
    with torch.no_grad():
        x = normalize(images, cfg.data.mean, cfg.data.std)
        seen = model.attend(x)
        predicted = model.classify(seen["crops"]).argmax(1)
    names = [_class_caption(c) for c in manifest.classes]
    captions = [f"true: {names[t]}\npred: {names[p]}" + ("" if t == p else "  (wrong)")
                for t, p in zip(targets.tolist(), predicted.tolist())]
    legend = [f"stream {i}" for i in range(seen["boxes"].shape[1])]
    return attention_picture(images, seen["boxes"], seen["crops"], cfg.data.mean, cfg.data.std, path,
                             captions=captions, legend=legend)


def _one_per_class(loader, count: int):
    """(images, targets): the first test image of each class in manifest order, up to `count`
    (the split is stored class by class, so the first images alone would show one class)."""
    import torch

    chosen: Dict[int, torch.Tensor] = {}
    for images, targets, *_ in loader:
        for image, target in zip(images, targets.tolist()):
            chosen.setdefault(target, image)
        if len(chosen) >= count:
            break
    picked = sorted(chosen.items())[:count]
    return torch.stack([image for _, image in picked]), torch.tensor([target for target, _ in picked])


def _per_stream(rates: List[dict]) -> Dict[str, dict]:
    return {f"stream_{i}": {part: round(v, 4) for part, v in r.items()} for i, r in enumerate(rates)}


# The attention goal per stream: the window holds all the class-deciding parts on at least this
# share of test images, and on this much more than the initial windows do.
GOAL_HIT_RATE, GOAL_GAIN = 0.8, 0.3


def attention_goal(detail: List[dict], initial_detail: List[dict]) -> Dict[str, bool]:
    return {f"stream_{i}": bool(d["all"] >= GOAL_HIT_RATE and d["all"] - d0["all"] >= GOAL_GAIN)
            for i, (d, d0) in enumerate(zip(detail, initial_detail))}


def write_report_json(out: Path, metrics: dict, initial_hits: List[dict], baseline: Optional[dict],
                      detail: Sequence[dict] = (), initial_detail: Sequence[dict] = ()) -> Path:
    """demo_out/report.json: what the demo found, for programs (fractions in [0, 1]).

    `part_hit_rate` scores the class-deciding parts (per stream: crown, wing, and "all" = both in
    the window at once); `all_parts_hit_rate` every annotated part; `initial_*` the same for the
    windows the model started from."""
    from data_prep.contract import write_json_atomic

    windows = (metrics.get("windows") or {}).get("streams") or []
    report = {"st": {"top1": metrics.get("top1"), "num_samples": metrics.get("num_samples"),
                     "part_hit_rate": _per_stream(list(detail)),
                     "initial_part_hit_rate": _per_stream(list(initial_detail)),
                     "attention_goal": {"rule": f"all >= {GOAL_HIT_RATE} and all - initial all >= {GOAL_GAIN}",
                                        "met": attention_goal(list(detail), list(initial_detail))},
                     "all_parts_hit_rate": _per_stream(metrics.get("part_hit_rate") or []),
                     "initial_all_parts_hit_rate": _per_stream(initial_hits),
                     "windows": windows},
              "baseline": None if baseline is None else {"top1": baseline.get("top1"),
                                                         "num_samples": baseline.get("num_samples")}}
    path = out / "report.json"
    write_json_atomic(path, report)
    return path


def _detail_table(detail: Sequence[dict], initial_detail: Sequence[dict]) -> List[str]:
    if not detail:
        return []
    names = list(detail[0])
    lines = ["Class-deciding parts: the fraction of test images whose window holds the part ('all': every "
             "one of them at once); in brackets, the initial windows'.", "",
             "| stream | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(f"{d[n]:.2f} ({d0[n]:.2f})" for n in names) + " |"
              for i, (d, d0) in enumerate(zip(detail, initial_detail))]
    return lines + [""]


def write_report(out: Path, run_dir: Path, metrics: dict, baseline: Optional[dict], seconds: float,
                 initial_hits: Sequence[dict] = (), picture: Optional[Path] = None,
                 detail: Sequence[dict] = (), initial_detail: Sequence[dict] = ()) -> Path:
    pictures = [picture] if picture else sorted((run_dir / "viz").glob("*.png"))[-1:]
    lines = ["# Demo report", "",
             f"- test accuracy (2xST-CNN): **{metrics.get('top1', float('nan')):.3f}** on {metrics.get('num_samples')} images"]
    if baseline is not None:
        lines.append(f"- test accuracy (bare backbone, same data and budget): **{baseline.get('top1', float('nan')):.3f}**")
    lines += [f"- wall time: {seconds / 60:.1f} min", f"- run directory: {run_dir}",
              f"- metrics: {run_dir / 'metrics.jsonl'}", f"- checkpoints: {run_dir / 'checkpoints'}",
              f"- attention picture: {', '.join(str(p) for p in pictures) or 'none'}",
              f"- for programs: {out / 'report.json'}", ""]
    table = _detail_table(detail, initial_detail) + _stream_tables(metrics, initial_hits)
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
    parser.add_argument("--images-per-class", type=int, default=240)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--bird-size", type=float, default=BIRD_SIZE,
                        help="bird scale of the generated data (1.45: bodies ~12-17%% of the image side)")
    parser.add_argument("--patterned-distractors", type=float, default=PATTERNED_DISTRACTORS,
                        help="chance that a clutter blob wears a bird's fine pattern (0: bird colours only; "
                             "look-alike texture draws windows trained from scratch off the bird)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the generated data and the training runs")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--baseline", action="store_true", help="also train configs/demo_baseline.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for the demo run, e.g. train.max_steps=50")
    args = parser.parse_args(argv)

    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    shards = make_dataset(args.out, args.classes, args.images_per_class, args.size, args.seed,
                          args.bird_size, args.patterned_distractors)
    # --seed draws the data set and the training run's initialisation and order alike: a demo seed.
    overrides = [f"model.num_classes={args.classes}", f"train.seed={args.seed}", *args.overrides]
    run_dir = args.out / "run"
    train(DEMO_CONFIG, shards, run_dir, args.nproc, overrides)
    metrics = evaluate(run_dir)
    from pipeline.data import read_manifest
    from pipeline.evaluate import load_model
    model, cfg, _ = load_model(_best_checkpoint(run_dir))
    fresh = initial_model(cfg)
    initial_hits = initial_part_hit_rate(cfg, fresh)
    groups = detail_part_groups(args.out / "raw", read_manifest(cfg.data.root).parts)
    detail, initial_detail = detail_hit_rates(model.eval(), cfg, groups), detail_hit_rates(fresh, cfg, groups)
    picture = draw_attention(model, cfg, args.out / "attention.png")
    baseline = None
    if args.baseline:
        base_dir = args.out / "run_baseline"
        train(BASELINE_CONFIG, shards, base_dir, args.nproc, overrides)
        baseline = evaluate(base_dir)
    write_report_json(args.out, metrics, initial_hits, baseline, detail, initial_detail)
    report = write_report(args.out, run_dir, metrics, baseline, time.time() - start, initial_hits, picture,
                          detail, initial_detail)
    _stage(f"done in {(time.time() - start) / 60:.1f} min")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
