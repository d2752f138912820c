"""Input normalisation follows the backbone's pretrained weights unless the config sets data.mean / data.std."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.models.normalisation import IMAGENET_MEAN, IMAGENET_STD, resolve_normalisation

REPO = Path(__file__).resolve().parents[1]
HALF = [0.5, 0.5, 0.5]


def test_data_mean_and_std_default_to_null_and_go_together():
    cfg = load_config(None)
    assert cfg.data.mean is None and cfg.data.std is None
    with pytest.raises(ConfigError, match="data.mean.*data.std.*both"):
        load_config(None, ["data.mean=[0.5, 0.5, 0.5]"])
    with pytest.raises(ConfigError, match="data.channels=1"):
        load_config(None, ["data.channels=1", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0.5, 0.5]"])


@pytest.mark.parametrize("backbone, mean, std", [
    ("test_resnet.r160_in1k", HALF, HALF),             # timm's pretrained cfg: mean = std = 0.5
    ("resnet10t", IMAGENET_MEAN, IMAGENET_STD),          # ... ImageNet's
    ("inception_v3", HALF, HALF),                        # the paper's backbone (tv_in1k weights)
])
@pytest.mark.parametrize("name", ["nxst_cnn", "cub_baseline"])
def test_null_normalisation_is_the_backbones_pretrained_one(name, backbone, mean, std):
    cfg = load_config(None, [f"model.name={name}", f"model.backbone={backbone}"])
    source = resolve_normalisation(cfg)
    assert cfg.data.mean == pytest.approx(mean) and cfg.data.std == pytest.approx(std)
    assert backbone in source


def test_the_paper_configs_resolve_inception_v3s_normalisation():
    for path in sorted((REPO / "configs" / "cub").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.data.mean is None, f"{path.name}: let the backbone's pretrained cfg decide"
        resolve_normalisation(cfg)
        assert cfg.data.mean == HALF and cfg.data.std == HALF, path.name


def test_explicit_values_win_and_models_without_a_timm_backbone_keep_theirs():
    cfg = load_config(None, ["model.backbone=test_resnet", "data.mean=[0.1, 0.2, 0.3]", "data.std=[1, 2, 3]"])
    assert resolve_normalisation(cfg) == "data.mean / data.std of the config"
    assert cfg.data.mean == [0.1, 0.2, 0.3] and cfg.data.std == [1, 2, 3]
    digits = load_config(REPO / "configs" / "digits" / "st_cnn.yaml")  # zero padding = black: mean 0, std 1
    resolve_normalisation(digits)
    assert digits.data.mean == [0.0] and digits.data.std == [1.0]
    svhn = load_config(REPO / "configs" / "svhn" / "st_single_64.yaml")
    assert "no timm backbone" in resolve_normalisation(svhn)
    assert svhn.data.mean == IMAGENET_MEAN and svhn.data.std == IMAGENET_STD
    for demo in ("demo.yaml", "demo_baseline.yaml"):  # pinned: the documented demo runs used ImageNet's
        cfg = load_config(REPO / "configs" / demo)
        resolve_normalisation(cfg)
        assert cfg.data.mean == IMAGENET_MEAN and cfg.data.std == IMAGENET_STD


def test_a_weights_files_timm_config_beside_it_wins_over_the_name(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "resnet10t", "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}))
    cfg = load_config(None, ["model.backbone=resnet10t", f"model.pretrained={weights}"])
    assert str(tmp_path / "config.json") in resolve_normalisation(cfg)
    assert cfg.data.mean == [0.1, 0.2, 0.3] and cfg.data.std == [0.4, 0.5, 0.6]
    other = load_config(None, ["model.backbone=test_resnet", f"model.pretrained={weights}"])  # another architecture
    resolve_normalisation(other)
    assert other.data.mean == HALF


def test_training_logs_the_normalisation_and_saves_it_in_the_run_config(tmp_path, caplog):
    from pipeline.train import main
    from shard_fixtures import write_tiny_cub_shards
    from test_train_helpers import tiny_run

    shards = write_tiny_cub_shards(tmp_path / "shards")
    overrides = tiny_run(shards, tmp_path / "run", "train.max_steps=1", "train.num_viz=0")
    backbone = next(o.split("=", 1)[1] for o in overrides if o.startswith("model.backbone="))
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert main(overrides) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    expected = load_config(None, [f"model.backbone={backbone}"])
    resolve_normalisation(expected)
    assert saved["mean"] == expected.data.mean and saved["std"] == expected.data.std
    assert any("input normalisation" in r.getMessage() and backbone in r.getMessage() for r in caplog.records)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["config"]["data"]["mean"] == expected.data.mean  # pipeline.evaluate reads what training used


def test_a_resumed_run_keeps_the_normalisation_its_checkpoint_trained_with(tmp_path, caplog):
    """A run started with other values (e.g. ImageNet's, before they followed the backbone) and
    resumed from a null config goes on with the checkpoint's; values the config sets win."""
    from pipeline.train import main
    from shard_fixtures import write_tiny_cub_shards
    from test_train_helpers import tiny_run

    shards = write_tiny_cub_shards(tmp_path / "shards")
    run = tmp_path / "run"
    imagenet = [f"data.mean={IMAGENET_MEAN}", f"data.std={IMAGENET_STD}"]
    assert main(tiny_run(shards, run, "train.max_steps=1", "train.num_viz=0", *imagenet)) == 0
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert main(tiny_run(shards, run, "train.max_steps=2", "train.num_viz=0", "train.resume=auto")) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["mean"] == IMAGENET_MEAN and saved["std"] == IMAGENET_STD
    assert any("checkpoint's input normalisation" in r.getMessage() for r in caplog.records)
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["config"]["data"]["mean"] == IMAGENET_MEAN


def test_values_the_config_sets_win_over_the_checkpoints():
    from pipeline.models.normalisation import follow_checkpoint

    cfg = load_config(None, ["data.mean=[0.1, 0.2, 0.3]", "data.std=[1, 1, 1]"])
    source = resolve_normalisation(cfg)
    saved = {"data": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}}
    assert "the config's are used" in follow_checkpoint(cfg, saved, source)
    assert cfg.data.mean == [0.1, 0.2, 0.3]
    assert follow_checkpoint(cfg, {"data": {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}}, source) is None
