"""Sample decoding: image bytes -> RGB uint8 array, and the task's target.

OpenCV decodes JPEG/PNG a little faster than PIL (both use libjpeg-turbo; OpenCV skips PIL's
object overhead); it comes with albumentations (opencv-python-headless). When a JPEG is at least
twice the resize target, it is decoded at 1/2, 1/4 or 1/8 scale in the DCT (OpenCV's
IMREAD_REDUCED_*, the same libjpeg scaling as PIL's `draft`), cheaper than decoding it whole and
shrinking it afterwards (benchmarks/bench_loader.py measures both).
"""
from __future__ import annotations

import io
import json
from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from data_prep.contract import BadImage, decode_checked
from pipeline.data.manifest import DataError
from pipeline.metrics import PAD_DIGIT  # the "no digit" class that pads a sequence to max_length

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
ARRAY_KEY = "npy"  # an image of other than 1 or 3 channels (MNIST addition: a digit per channel), uint8 H x W x C
JPEG_MAGIC = b"\xff\xd8"

# EXIF orientation is ignored: CUB's boxes and parts are in the stored pixel grid, as PIL reads it.
_CV2_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
              8: cv2.IMREAD_REDUCED_COLOR_8}
_CV2_GRAY_FLAGS = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
                   8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


class CorruptSample(Exception):
    """A sample whose image or labels cannot be read (skipped or raised as configured)."""


def _reduce_factor(width: int, height: int, min_side: Optional[int]) -> int:
    """Largest of 1, 2, 4, 8 that keeps the shorter side at least `min_side` after DCT scaling."""
    if not min_side:
        return 1
    factor = 1
    while factor < 8 and min(width, height) // (2 * factor) >= min_side:
        factor *= 2
    return factor


def decode_rgb(data: bytes, min_side: Optional[int] = None, channels: int = 3) -> Tuple[np.ndarray, Tuple[int, int]]:
    """(H x W x 3 uint8 RGB array, original (width, height)) of encoded image bytes; with
    `channels=1`, H x W x 1 grayscale (data.channels, the digits models).

    Grayscale, palette, CMYK and RGBA images come back as RGB. With `min_side` a large JPEG may
    be decoded at a reduced size whose shorter side is still >= min_side; the returned size is
    always the original one (boxes and parts refer to it).
    """
    try:
        size, factor = None, 1
        if data[:2] == JPEG_MAGIC:  # only a JPEG can be decoded at reduced size: read its header for that
            size = Image.open(io.BytesIO(data)).size
            factor = _reduce_factor(*size, min_side)
        flags = (_CV2_GRAY_FLAGS if channels == 1 else _CV2_FLAGS)[factor] | cv2.IMREAD_IGNORE_ORIENTATION
        # the contract's decode: a truncated or corrupt image raises, never comes back half grey
        array = decode_checked(data, flags)
    except BadImage as err:
        raise CorruptSample(str(err)) from None
    except UnidentifiedImageError:
        raise CorruptSample("not an image in a known format") from None
    except (OSError, ValueError, SyntaxError, cv2.error) as err:
        raise CorruptSample(f"cannot decode image: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    size = size or (array.shape[1], array.shape[0])
    if channels == 1:
        return array[:, :, None], size
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB), size


def decode_image(sample: Dict[str, Any], min_side: Optional[int] = None,
                 channels: int = 3) -> Tuple[np.ndarray, Tuple[int, int]]:
    """(H x W x channels uint8 array, original (width, height)) of a sample's image: an encoded
    image (`decode_rgb`), or a uint8 H x W x C `npy` array whose C must be `channels`."""
    if ARRAY_KEY not in sample:
        return decode_rgb(image_bytes(sample), min_side, channels)
    try:
        array = np.load(io.BytesIO(sample[ARRAY_KEY]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CorruptSample(f"cannot read the npy image: {err}") from None
    if array.dtype != np.uint8 or array.ndim != 3:
        raise CorruptSample(f"npy image must be uint8 H x W x C; got {array.dtype} of shape {array.shape}")
    if array.shape[2] != channels:
        raise DataError(f"the shards' images have {array.shape[2]} channels; the config says "
                        f"data.channels={channels}")
    return array, (array.shape[1], array.shape[0])


def image_bytes(sample: Dict[str, Any]) -> bytes:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise CorruptSample(f"no image ({'/'.join(IMAGE_KEYS)}) among its files {sorted(k for k in sample if not k.startswith('__'))}")


def sample_json(sample: Dict[str, Any]) -> Dict[str, Any]:
    if "json" not in sample:
        return {}
    try:
        return json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptSample(f"bad json: {err}")


def classification_target(sample: Dict[str, Any], meta: Dict[str, Any]) -> int:
    """The 0-based class: `cls`, else json "label" (json "class_id" is CUB's 1-based id, not this)."""
    try:
        return int(sample["cls"]) if "cls" in sample else int(meta["label"])
    except (KeyError, ValueError) as err:
        raise CorruptSample(f"no class label (cls or json label): {err!r}")


def sequence_target(meta: Dict[str, Any], max_length: int) -> np.ndarray:
    """Digits 0-9 padded with PAD_DIGIT to max_length (the paper's 5 classifiers of 11 classes)."""
    digits = meta.get("digits")
    if not isinstance(digits, list) or not digits or len(digits) > max_length:
        raise CorruptSample(f"json 'digits' must be a list of 1 to {max_length} digits, got {digits!r}")
    target = np.full(max_length, PAD_DIGIT, dtype=np.int64)
    target[: len(digits)] = digits
    return target
