"""Classify images with a trained checkpoint: the top classes by name and where each stream looked.

    python -m pipeline.predict --checkpoint runs/st2/checkpoints/best.pt photos/ bird.jpg
    python -m pipeline.predict --checkpoint best.pt photos/ --top-k 3 --draw attention/ train.device=cuda

Prints one JSON line per image: {"image", "size": [w, h], "top": [{"class", "index", "prob"}, ...]
(classification; sequence models: "digits" and "number"), "windows": per stream [x0, y0, x1, y1]
in the image's own pixels}. The image is seen as the evaluation sees it (data.augment's resize and
centre crop at model.input_size, the checkpoint's normalisation), so a prediction here is the one
`pipeline.evaluate` scored. With --draw DIR each image's attention picture (the windows, the crops,
the prediction, a legend) goes to DIR/<image name>.png. A folder means the images directly in it
(jpg, jpeg, png, webp), sorted. Class names come from the checkpoint (runs since the names were
stored there), else from the manifest at its data.root, else their indices.
Exit codes: 0 done, 2 bad input (one line `error: ...`, naming the file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def image_paths(inputs: Sequence[str]) -> List[Path]:
    """The image files named, and those directly in the folders named (sorted); ValueError names a bad one."""
    paths: List[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"{item}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in this folder")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise ValueError(f"{item}: no such file or folder")
    return paths


def class_names(checkpoint, cfg) -> Optional[List[str]]:
    if checkpoint.classes:
        return list(checkpoint.classes)
    try:
        from pipeline.data import read_manifest

        return read_manifest(cfg.data.root).classes if cfg.data.root else None
    except Exception:  # the data is on another machine: indices will do
        return None


def load_image(path: Path, cfg):
    """(uint8 C x S x S tensor as the evaluation sees it, its View, original (w, h))."""
    import torch

    from pipeline.data.augment import effective_resize, eval_transform
    from pipeline.data.decode import CorruptSample, decode_rgb

    try:
        image, size = decode_rgb(path.read_bytes(), effective_resize(cfg), cfg.data.channels)
    except (CorruptSample, OSError) as err:
        raise ValueError(f"{path}: cannot read the image ({err})") from None
    view_image, view = eval_transform(image, size, cfg)
    view_image = view_image.reshape(*view_image.shape[:2], cfg.data.channels)
    return torch.from_numpy(view_image.copy()).permute(2, 0, 1), view, size


def predict(model, cfg, checkpoint, paths: Sequence[Path], top_k: int = 5,
            draw: Optional[Path] = None, device: str = "cpu") -> Iterator[Dict[str, Any]]:
    """One record per image, as it is scored (see the module docstring); pictures into `draw` when given."""
    import torch

    from pipeline.data import normalize
    from pipeline.tasks import task_of

    names = class_names(checkpoint, cfg)
    task = task_of(getattr(model, "task", "classification"))
    streams = int(getattr(model, "num_streams", 0) or 0) if hasattr(model, "attend") else 0
    model.to(device)
    for path in paths:
        image, view, size = load_image(path, cfg)
        x = normalize(image[None].to(device), cfg.data.mean, cfg.data.std)
        with torch.no_grad():
            logits = model(x).float()
            attention = model.attend(x) if streams else None
        record: Dict[str, Any] = {"image": str(path), "size": list(size)}
        record |= task.prediction(logits[0], names or [], top_k)
        if attention is not None:
            record["windows"] = [original_box(box, view) for box in attention["boxes"][0].float().cpu().tolist()]
            if draw is not None:
                draw_one(image, attention, cfg, record, draw / f"{path.stem}.png")
        yield record


def original_box(box: Sequence[float], view) -> List[float]:
    """[x0, y0, x1, y1] in [-1, 1] input coordinates -> the original image's pixels (input = orig * scale - offset)."""
    x0, y0, x1, y1 = ((v + 1) / 2 * view.size for v in box)
    return [round((x0 + view.offset_x) / view.scale_x, 1), round((y0 + view.offset_y) / view.scale_y, 1),
            round((x1 + view.offset_x) / view.scale_x, 1), round((y1 + view.offset_y) / view.scale_y, 1)]


def draw_one(image, attention: Dict[str, Any], cfg, record: Dict[str, Any], path: Path) -> Path:
    from pipeline.train.viz import attention_picture

    said = record.get("number") if "number" in record else f"{record['top'][0]['class']} ({record['top'][0]['prob']:.2f})"
    legend = [f"stream {k}" for k in range(attention["boxes"].shape[1])]
    return attention_picture(image[None], attention["boxes"].cpu(), attention["crops"].cpu(), cfg.data.mean,
                             cfg.data.std, path, [f"{Path(record['image']).name}\npred: {said}"], legend)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by pipeline.train (.pt)")
    parser.add_argument("images", nargs="+", help="image files and folders of images (dotted config overrides, "
                                                  "e.g. train.device=cuda, may follow)")
    parser.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--draw", default=None, help="folder for each image's attention picture")
    args = parser.parse_args(argv)
    overrides = [a for a in args.images if "=" in a and not Path(a).exists()]
    inputs = [a for a in args.images if a not in overrides]
    from pipeline.evaluate import load_model
    from pipeline.train import INPUT_ERRORS
    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k {args.top_k}: must be at least 1")
        paths = image_paths(inputs)
        model, cfg, checkpoint = load_model(args.checkpoint, overrides)
        import torch

        device = "cuda" if cfg.train.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
        draw = Path(args.draw) if args.draw else None
        for record in predict(model, cfg, checkpoint, paths, args.top_k, draw, device):
            print(json.dumps(record), flush=True)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
