"""SVHN views (paper 4.2 / A.4): evaluation sees the whole 64 (128) px crop; the references' random
training views ([13] Goodfellow et al.: a 54 x 54 window at a random place of the 64 x 64 crop) are
options, data.augment=svhn_shift and svhn_crop."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data import eval_transform, eval_view, train_augment

from shard_fixtures import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _crop(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "svhn").glob("*.yaml")), ids=lambda p: p.name)
def test_svhn_configs_train_and_evaluate_on_the_whole_crop(path):
    cfg = load_config(path)
    size = cfg.model.input_size
    assert cfg.data.augment == "svhn" and size in (64, 128)
    crop = _crop(size)
    view, resized = eval_view(size, size, cfg)
    assert resized == (size, size) and view.as_list() == [1.0, 1.0, 0, 0, size]
    image, _ = eval_transform(crop, (size, size), cfg)
    assert np.array_equal(image, crop)                                  # every pixel of the crop, none cut off
    assert np.array_equal(train_augment(cfg)(image=crop)["image"], crop)  # and training sees the same view


@pytest.mark.parametrize("size, reach", [(64, 5), (128, 10)])
def test_svhn_shift_displaces_the_whole_crop_as_goodfellows_windows_do(size, reach):
    """[13]'s random 54-of-64 windows move the digits by up to 5 px each way; svhn_shift moves the
    whole crop by as much, at its own scale (the scale evaluation sees), edges repeated."""
    cfg = tiny_config("data.augment=svhn_shift", f"model.input_size={size}", "train.seed=3")
    crop = _crop(size)
    augment = train_augment(cfg)
    shifts = set()
    for _ in range(40):
        out = augment(image=crop)["image"]
        assert out.shape == crop.shape
        found = [(dx, dy) for dx in range(-reach, reach + 1) for dy in range(-reach, reach + 1)
                 if np.array_equal(out[max(dy, 0):size + min(dy, 0), max(dx, 0):size + min(dx, 0)],
                                   crop[max(-dy, 0):size + min(-dy, 0), max(-dx, 0):size + min(-dx, 0)])]
        assert len(found) == 1, "each view is the crop displaced by a whole number of pixels within the reach"
        shifts.add(found[0])
    assert len(shifts) > 10 and max(max(abs(dx), abs(dy)) for dx, dy in shifts) > reach // 2
    image, _ = eval_transform(crop, (size, size), cfg)
    assert np.array_equal(image, crop)                                   # evaluation: the whole crop


def test_svhn_crop_is_goodfellows_random_window_with_its_centre_window_at_evaluation():
    """svhn_crop: [13] as they describe it, scaled to the input: a random window of 54/64 of the side,
    resized to input_size (76 -> random 64); evaluation takes the centre window, at the scale trained."""
    cfg = tiny_config("data.augment=svhn_crop", "model.input_size=64")
    view, resized = eval_view(64, 64, cfg)
    assert resized == (76, 76) and view.offset_x == view.offset_y == 6 and view.scale_x == 76 / 64
    crop = _crop(64)
    augment = train_augment(cfg)
    views = [augment(image=crop)["image"] for _ in range(10)]
    assert all(v.shape == (64, 64, 3) for v in views) and len({v.tobytes() for v in views}) > 1


def test_augmented_svhn_views_cannot_be_held_in_memory():
    assert load_config(None, ["data.augment=svhn", "data.in_memory=true"]).data.in_memory
    for augment in ("svhn_shift", "svhn_crop"):
        with pytest.raises(ConfigError, match="in_memory"):
            load_config(None, [f"data.augment={augment}", "data.in_memory=true"])
