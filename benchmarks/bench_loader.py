"""Loader benchmark: the CUB training pipeline against a naive PIL + torchvision baseline.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/bench_loader.py --out runs/bench/loader.json

Both sides get the same JPEGs (generated CUB-like ones, about 500 x 375, quality 90; or real ones
with --jpeg-dir) and make batches of random 448 crops of the image resized to 512 on its shorter
side, flipped at random:
  baseline  a folder of JPEGs; PIL open + torchvision Resize(512), RandomCrop(448),
            RandomHorizontalFlip, ToTensor, Normalize; batches stacked as default_collate does.
  pipeline  pipeline.data.build_train_loader on webdataset shards of the same images (tar
            reading, shuffle buffer, OpenCV decode, albumentations resize/crop/flip, uint8 batches),
            then pipeline.data.normalize (which runs on the GPU in training; timed apart here).
Each runs in this process on one thread (torch, OpenCV, OMP), alternating rounds, so the figure is
images per second per CPU core. Throughput is counted in process CPU time as well as wall time:
on a shared machine CPU time is the fair per-core measure. A stage breakdown says where the
difference comes from. Prints the ratios and writes everything as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data_prep.shards import shard_name, write_json_atomic, write_shard  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import build_train_loader, decode_rgb, normalize, read_manifest  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
GPU_RATE = 1300  # images/s of the plain 2 x ST-CNN reference step on one H200 (docs/benchmarks/gpu.md)


def cub_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: a smooth colour field, a few blobs and fine texture (so it compresses like a photo)."""
    field = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(field).resize((width, height), Image.BICUBIC), dtype=np.int16)
    for _ in range(4):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(20, 90)
        yy, xx = np.ogrid[:height, :width]
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_dataset(work: Path, num_images: int, seed: int, large: bool = False,
                 jpeg_dir: Optional[Path] = None) -> Dict[str, Path]:
    """The same JPEGs twice: a folder (baseline) and webdataset shards + manifest (pipeline).

    With jpeg_dir, its JPEGs (e.g. real CUB images) are used, repeated to num_images.
    """
    rng = np.random.default_rng(seed)
    folder, shards = work / "jpegs", work / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    shards.mkdir(parents=True, exist_ok=True)
    real = sorted(Path(jpeg_dir).glob("*.jpg")) if jpeg_dir else []
    if jpeg_dir and not real:
        raise SystemExit(f"error: --jpeg-dir {jpeg_dir} holds no *.jpg files")
    samples = []
    for i in range(num_images):
        w, h = (500, int(rng.integers(333, 376))) if rng.random() < 0.8 else (int(rng.integers(333, 376)), 500)
        if large:
            w, h = 2 * w, 2 * h
        data = real[i % len(real)].read_bytes() if real else cub_like_jpeg(rng, w, h)
        (folder / f"{i:06d}.jpg").write_bytes(data)
        samples.append({"__key__": f"{i:06d}", "jpg": data, "cls": i % 200, "json": {"id": i, "size": [w, h]}})
    per_shard = 64
    entries = [write_shard(shards / shard_name("train", k), samples[s:s + per_shard])
               for k, s in enumerate(range(0, num_images, per_shard))]
    write_json_atomic(shards / "manifest.json", {"dataset": "cub", "task": "classification",
                                                 "classes": [str(c) for c in range(200)],
                                                 "splits": {"train": {"num_samples": num_images, "shards": entries}}})
    return {"folder": folder, "shards": shards}


def baseline_batches(folder: Path, batch: int, input_size: int, resize: int):
    """The naive loader: PIL + torchvision transforms per file, float32 normalised on the CPU."""
    import torchvision.transforms as T

    transform = T.Compose([T.Resize(resize), T.RandomCrop(input_size), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize(MEAN, STD)])
    files = sorted(folder.glob("*.jpg"))
    rng = np.random.default_rng(0)
    while True:
        images = [transform(Image.open(files[i]).convert("RGB")) for i in rng.integers(0, len(files), batch)]
        yield torch.stack(images), torch.zeros(batch, dtype=torch.int64)


def pipeline_batches(shards: Path, batch: int, input_size: int, resize: int):
    cfg = load_config(None, [f"model.input_size={input_size}", f"data.resize={resize}", "data.augment=cub",
                             "data.shuffle_buffer=64", "train.num_workers=0"])
    return iter(build_train_loader(cfg, read_manifest(shards), rank=0, world_size=1, micro_batch=batch, seed=0))


def timed(batches, num_images: int, batch: int, after: Callable = lambda images: images) -> Dict[str, float]:
    """Wall and CPU seconds to draw num_images through `batches` (and `after`, per batch)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_images // batch):
        images, _ = next(batches)
        after(images)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def per_image_ms(fn: Callable, items: List, repeat: int = 3) -> float:
    """CPU milliseconds per item of fn over items."""
    start = time.process_time()
    for _ in range(repeat):
        for item in items:
            fn(item)
    return (time.process_time() - start) / (repeat * len(items)) * 1e3


def _pil_draft(data: bytes, factor: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (img.width // factor, img.height // factor))
    return np.asarray(img.convert("RGB"))


def stage_breakdown(folder: Path, large_folder: Path, input_size: int, resize: int) -> Dict[str, float]:
    """CPU ms per image of each step, each way (on the first 64 images)."""
    import albumentations as A
    import torchvision.transforms as T

    datas = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))[:64]]
    large = [p.read_bytes() for p in sorted(large_folder.glob("*.jpg"))[:32]]
    pil = [Image.open(io.BytesIO(d)).convert("RGB") for d in datas]
    arrays = [np.asarray(p) for p in pil]
    resize_pil = T.Resize(resize)
    resized = [resize_pil(p) for p in pil]
    crops = [np.ascontiguousarray(np.asarray(p)[:input_size, :input_size]) for p in resized]
    album = A.Compose([A.SmallestMaxSize(max_size=resize), A.RandomCrop(input_size, input_size), A.HorizontalFlip()])
    to_float = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    return {
        "decode_pil_ms": per_image_ms(lambda d: Image.open(io.BytesIO(d)).convert("RGB").load(), datas),
        "decode_opencv_ms": per_image_ms(lambda d: decode_rgb(d), datas),
        "resize_crop_flip_pil_torchvision_ms": per_image_ms(
            lambda p: T.RandomHorizontalFlip()(T.RandomCrop(input_size)(resize_pil(p))), pil),
        "resize_crop_flip_albumentations_ms": per_image_ms(lambda a: album(image=a)["image"], arrays),
        "to_float_tensor_normalize_cpu_ms": per_image_ms(lambda c: to_float(Image.fromarray(c)), crops),
        "to_uint8_batch_channels_last_ms": per_image_ms(
            lambda group: torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2), [crops[:32], crops[32:]]) / 32,
        "decode_2x_image_full_ms": per_image_ms(lambda d: decode_rgb(d), large),
        "decode_2x_image_pil_draft_ms": per_image_ms(lambda d: _pil_draft(d, 2), large),
        "decode_2x_image_reduced_dct_ms": per_image_ms(lambda d: decode_rgb(d, min_side=256), large),
    }


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="generated JPEGs")
    parser.add_argument("--per-round", type=int, default=256, help="images drawn per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=448)
    parser.add_argument("--resize", type=int, default=512)
    parser.add_argument("--jpeg-dir", default=None,
                        help="use these JPEGs (e.g. a CUB class folder), repeated, instead of generated ones")
    parser.add_argument("--work-dir", default=None, help="where to write the generated data (default: a temp dir)")
    parser.add_argument("--out", default="runs/bench/loader.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        data = make_dataset(Path(tmp) / "cub", args.images, seed=0, jpeg_dir=args.jpeg_dir)
        large = make_dataset(Path(tmp) / "large", 32, seed=1, large=True)
        base = baseline_batches(data["folder"], args.batch, args.input_size, args.resize)
        ours = pipeline_batches(data["shards"], args.batch, args.input_size, args.resize)
        next(base), next(ours)  # warm up: imports, first shard, buffers
        rounds: Dict[str, List[Dict[str, float]]] = {"baseline": [], "pipeline": [], "normalize_on_device": []}
        for _ in range(args.rounds):  # alternate, so load changes on a shared machine hit both sides alike
            rounds["baseline"].append(timed(base, args.per_round, args.batch))
            rounds["pipeline"].append(timed(ours, args.per_round, args.batch))
            rounds["normalize_on_device"].append(
                timed(ours, args.per_round, args.batch, after=lambda x: normalize(x, MEAN, STD)))
        stages = stage_breakdown(data["folder"], large["folder"], args.input_size, args.resize)

    def rate(name: str, key: str) -> float:
        return statistics.median(args.per_round / r[key] for r in rounds[name])

    result = {
        "command": "python benchmarks/bench_loader.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_name(), "cores_visible": os.cpu_count(),
                    "load_avg": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
                    "opencv": cv2.__version__, "pillow": Image.__version__},
        "settings": vars(args),
        "images_per_cpu_s": {name: rate(name, "cpu_s") for name in rounds},
        "images_per_wall_s": {name: rate(name, "wall_s") for name in rounds},
        "rounds": rounds,
        "stage_cpu_ms_per_image": stages,
    }
    ours_rate, base_rate = result["images_per_cpu_s"]["pipeline"], result["images_per_cpu_s"]["baseline"]
    # uint8 batches + normalisation on the GPU: the pipeline's own cost per image (without normalize)
    result["speedup_per_core"] = ours_rate / base_rate
    result["speedup_per_core_wall"] = result["images_per_wall_s"]["pipeline"] / result["images_per_wall_s"]["baseline"]
    result["cores_per_gpu_at_1300_img_s"] = {"pipeline": GPU_RATE / ours_rate, "baseline": GPU_RATE / base_rate}
    result["host_to_device_bytes_per_s_at_1300"] = {
        "uint8": GPU_RATE * 3 * args.input_size ** 2, "float32": GPU_RATE * 12 * args.input_size ** 2}

    print(f"{'images/s per core (CPU time)':34s} {'baseline':>10s} {'pipeline':>10s} {'ratio':>7s}")
    print(f"{'':34s} {base_rate:10.1f} {ours_rate:10.1f} {ours_rate / base_rate:6.2f}x")
    wall = result["images_per_wall_s"]
    print(f"{'images/s (wall, shared machine)':34s} {wall['baseline']:10.1f} {wall['pipeline']:10.1f} "
          f"{result['speedup_per_core_wall']:6.2f}x")
    print(f"pipeline + normalize on this CPU: {result['images_per_cpu_s']['normalize_on_device']:.1f} images/s per core")
    cores = result["cores_per_gpu_at_1300_img_s"]
    print(f"cores to feed {GPU_RATE} images/s: pipeline {cores['pipeline']:.1f}, baseline {cores['baseline']:.1f}")
    for name, ms in stages.items():
        print(f"  {name:40s} {ms:7.2f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
