"""What the contract's corrupt-image check costs per image, on real CUB JPEGs.

    .venv/bin/python benchmarks/bench_image_check.py --rounds 7 --out runs/bench/image_check.json

loader: the loader's decode before (a bare `cv2.imdecode`, which hands back a JPEG scrambled in
the middle with only a libjpeg warning on stderr) against after (`data_prep.contract.decode_checked`:
the same decode with libjpeg's corrupt-data warnings caught), then the whole `decode_rgb` (colour
conversion included). prep/verify: `check_image` (a 1/8-scale decode: every coefficient read)
against the marker walk prep used by default and PIL's full decode that verify used. One thread,
rounds interleaved; the best round of each is reported (the machine is shared).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data_prep import cub  # noqa: E402
from data_prep.contract import check_image, decode_checked  # noqa: E402
from pipeline.data.decode import decode_rgb  # noqa: E402

CUB_SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "cub" / "CUB_200_2011" / "images"


def pil_full(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()


CASES = {
    "loader_before_cv2_imdecode": lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR),
    "loader_after_decode_checked": lambda d: decode_checked(d, cv2.IMREAD_COLOR),
    "loader_after_decode_rgb": lambda d: decode_rgb(d),
    "prep_before_marker_walk": lambda d: cub.inspect_jpeg(d, full=False),
    "verify_before_pil_full_decode": pil_full,
    "prep_verify_after_check_image": check_image,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jpeg-dir", default=str(CUB_SAMPLE), help="folder of JPEGs (searched recursively)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="runs/bench/image_check.json")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    images = [p.read_bytes() for p in sorted(Path(args.jpeg_dir).rglob("*.jpg"))]
    if not images:
        parser.error(f"--jpeg-dir {args.jpeg_dir}: no .jpg files")
    best = {name: float("inf") for name in CASES}
    for _ in range(args.rounds):
        for name, fn in CASES.items():
            start = time.process_time()
            for data in images:
                fn(data)
            best[name] = min(best[name], (time.process_time() - start) / len(images) * 1e3)
    result = {"images": len(images), "jpeg_dir": args.jpeg_dir, "rounds": args.rounds,
              "ms_per_image_cpu": {k: round(v, 4) for k, v in best.items()},
              "loader_ratio_after_before": round(best["loader_after_decode_checked"]
                                                 / best["loader_before_cv2_imdecode"], 3)}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
