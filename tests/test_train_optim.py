"""Optimiser groups, per-module learning rates and schedules of the trainer (fast, in-process)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.train.optim import build_optimizer, build_schedule, lr_multiplier, lrs_by_role, param_groups
from test_train_helpers import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
# The paper's localisation lr: x1e-4 on CUB, x0.1 on SVHN. The CUB models are shrunk (tiny
# backbone, 64 px); the SVHN models are small already (their 64 px configs are used).
PAPER_SCALE = {"cub": 1e-4, "svhn": 0.1}
CONFIGS = [p for p in sorted((REPO / "configs" / "cub").glob("*.yaml")) + sorted((REPO / "configs" / "svhn").glob("*_64.yaml"))
           if "localisation" in load_config(p).optim.lr_scale]


def tiny_cfg(*overrides: str, path=None):
    return load_config(path, [*TINY_MODEL, *overrides])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg().model)


def _config_cases():
    if CONFIGS:
        return [pytest.param(p, id=f"{p.parent.name}/{p.name}") for p in CONFIGS]
    return [pytest.param(None, id="override")]  # before the configs exist: the same by override


@pytest.mark.parametrize("path", _config_cases())
def test_localisation_lr_is_the_papers_scale_and_keeps_its_ratio_after_a_schedule_step(path):
    dataset = path.parent.name if path else "cub"
    shrink = TINY_MODEL if dataset == "cub" else ["model.pretrained=null"]
    extra = [] if path else ["optim.lr_scale.localisation=1e-4"]
    cfg = load_config(path, [*shrink, *extra, "schedule.name=step", "schedule.milestones=[1]",
                             "schedule.step_every=null"])
    scale = PAPER_SCALE[dataset]
    assert cfg.optim.lr_scale.get("localisation") == pytest.approx(scale)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    sched = build_schedule(opt, cfg.schedule, cfg.train.max_steps)
    base = cfg.optim.lr
    before = lrs_by_role(opt)
    assert before["localisation"] == pytest.approx(base * scale, rel=1e-12)
    assert all(lr == pytest.approx(base * cfg.optim.lr_scale.get(role, 1.0), rel=1e-12) for role, lr in before.items())
    opt.step()    # (no gradients: only the schedule matters here)
    sched.step()  # past the milestone at step 1: every group x gamma
    after = lrs_by_role(opt)
    assert after["localisation"] == pytest.approx(base * scale * cfg.schedule.gamma, rel=1e-12)
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


def test_lr_start_holds_a_role_at_zero_until_its_step_then_joins_the_schedule(model):
    cfg = tiny_cfg("optim.name=adamw", "optim.lr=0.01", "optim.lr_start.localisation=3", "schedule.name=constant")
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    schedule = build_schedule(optimizer, cfg.schedule, 10, cfg.optim.lr_start)
    seen = []
    for _ in range(5):
        seen.append(lrs_by_role(optimizer))
        optimizer.step()
        schedule.step()
    assert [s["localisation"] for s in seen] == [0.0, 0.0, 0.0, 0.01, 0.01]
    assert all(s["head"] == 0.01 for s in seen)


@pytest.mark.parametrize("value, message", [("optim.lr_start.localisation=-1", "lr_start.localisation=-1"),
                                            ("optim.lr_start.locallisation=5", "locallisation")])
def test_lr_start_bad_step_or_role_is_named(model, value, message):
    from pipeline.config import ConfigError, validate

    with pytest.raises((ValueError, ConfigError), match=message):
        param_groups(model, validate(tiny_cfg(value)).optim)


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
