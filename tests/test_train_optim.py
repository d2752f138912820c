"""Optimiser groups, per-module learning rates and schedules of the trainer (fast, in-process)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.train.optim import build_optimizer, build_schedule, lr_multiplier, lrs_by_role, param_groups

REPO = Path(__file__).resolve().parents[1]
# Small stand-ins for the paper's inception_v3 at 448, so CPU tests build the model in a second.
TINY = ["model.backbone=resnet10t", "model.input_size=64", "model.crop_size=32", "model.pretrained=null",
        "model.num_classes=3"]
CUB_CONFIGS = sorted((REPO / "configs" / "cub").glob("*.yaml"))


def tiny_cfg(*overrides: str, path=None):
    return load_config(path, [*TINY, *overrides])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg("model.num_streams=2").model)


def _cub_cases():
    # The CUB configs carry the paper's x1e-4 localisation lr; without them, the same by override.
    if CUB_CONFIGS:
        return [pytest.param(p, [], id=p.name) for p in CUB_CONFIGS if "nxst" in p.read_text() or "num_streams" in p.read_text()]
    return [pytest.param(None, ["optim.lr_scale.localisation=1e-4"], id="override")]


@pytest.mark.parametrize("path,extra", _cub_cases())
def test_localisation_lr_is_base_times_1e4_and_keeps_ratio_after_a_schedule_step(path, extra):
    cfg = tiny_cfg(*extra, "schedule.name=step", "schedule.milestones=[1]", "schedule.step_every=null",
                   path=path)
    assert cfg.optim.lr_scale.get("localisation") == pytest.approx(1e-4)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    sched = build_schedule(opt, cfg.schedule, cfg.train.max_steps)
    base = cfg.optim.lr
    before = lrs_by_role(opt)
    assert before["localisation"] == pytest.approx(base * 1e-4, rel=1e-12)
    assert before["head"] == pytest.approx(base * cfg.optim.lr_scale.get("head", 1.0), rel=1e-12)
    # One real optimiser step, then one schedule step past the milestone at 1: lr x gamma for all.
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    sched.step()
    after = lrs_by_role(opt)
    assert after["localisation"] == pytest.approx(base * 1e-4 * cfg.schedule.gamma, rel=1e-12)
    for role in before:
        assert after[role] / after["localisation"] == pytest.approx(before[role] / before["localisation"], rel=1e-12)


def test_groups_cover_every_parameter_once_and_skip_decay_on_norms_and_biases(model):
    cfg = tiny_cfg("optim.weight_decay=0.01").optim
    groups = param_groups(model, cfg)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    for g in groups:
        assert g["weight_decay"] == (0.01 if all(p.ndim > 1 for p in g["params"]) else 0.0)
        assert len({p.ndim > 1 for p in g["params"]}) == 1
    assert {g["role"] for g in groups} == set(model.parameter_groups())
    decay_all = param_groups(model, tiny_cfg("optim.weight_decay=0.01", "optim.decay_norm_and_bias=true").optim)
    assert all(g["weight_decay"] == 0.01 for g in decay_all)


def test_lr_scale_naming_a_missing_role_is_an_error(model):
    cfg = tiny_cfg("optim.lr_scale.locallisation=0.1").optim
    with pytest.raises(ValueError, match="locallisation.*roles: .*localisation"):
        param_groups(model, cfg)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimiser_kinds_take_the_groups(model, name):
    cfg = tiny_cfg(f"optim.name={name}", "optim.lr_scale.localisation=0.1").optim
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert type(opt).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[name]
    assert lrs_by_role(opt)["localisation"] == pytest.approx(cfg.lr * 0.1)


def test_schedules():
    cfg = tiny_cfg("schedule.name=step", "schedule.milestones=[10,20,25]").schedule
    f = lr_multiplier(cfg, 30)  # the paper's CUB steps, scaled down
    assert [f(s) for s in (0, 9, 10, 19, 20, 25, 29)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001, 0.001])
    f = lr_multiplier(tiny_cfg("schedule.name=step", "schedule.step_every=8").schedule, 30)
    assert [f(s) for s in (0, 7, 8, 16)] == pytest.approx([1, 1, 0.1, 0.01])
    f = lr_multiplier(tiny_cfg("schedule.name=cosine", "schedule.warmup_steps=4",
                               "schedule.min_lr_ratio=0.1").schedule, 104)
    assert [f(s) for s in (0, 3)] == pytest.approx([0.25, 1.0])
    assert f(54) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(104) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 104))
    f = lr_multiplier(tiny_cfg("schedule.name=constant", "schedule.warmup_steps=2").schedule, 10)
    assert [f(s) for s in (0, 1, 2, 9)] == pytest.approx([0.5, 1, 1, 1])
