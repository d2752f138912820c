"""Model zoo: every model of the paper by name.

    model = create_model("nxst_cnn", backbone="resnet10t", num_streams=2, input_size=448)
    list_models()  # all names

Each model module registers its factories with `@register_model`. Every model exposes
`parameter_groups() -> {role: [params]}` (roles such as `localisation`, `streams`, `backbone`,
`head`; each parameter in exactly one group) and a `task` attribute, a task of `pipeline.tasks`
(`classification`: logits (B, num_classes); `sequence`: logits (B, 5, 11); `colocalisation`: each
image's own loss (B,)). Attention models also expose `num_streams` and
`attend(x) -> {"theta", "boxes", "crops"}` for logging and pictures.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, List

import torch.nn as nn

from .registry import REGISTRY as _REGISTRY
from .registry import register_model

__all__ = ["create_model", "list_models", "build_model", "register_model"]


def list_models() -> List[str]:
    _import_all()
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def build_model(model_cfg: Any) -> nn.Module:
    """A model from a `ModelConfig`: the fields the factory accepts, plus `extra`.

    A field the factory does not take (e.g. `backbone` for the SVHN CNN) is passed over while it
    holds its default; set to anything else it is an error naming it (it would be ignored).
    """
    from pipeline.config import ModelConfig

    _import_all()
    if model_cfg.name not in _REGISTRY:
        raise ValueError(f"model.name='{model_cfg.name}' is unknown; known models: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[model_cfg.name]
    accepted = inspect.signature(factory).parameters
    defaults = ModelConfig()
    for field in dataclasses.fields(model_cfg):
        value = getattr(model_cfg, field.name)
        if field.name not in ("name", "extra") and field.name not in accepted and value != getattr(defaults, field.name):
            raise ValueError(f"model.{field.name}={value!r} has no effect on model '{model_cfg.name}', which takes: "
                             f"{', '.join(accepted)}; remove it")
    kwargs = {k: v for k, v in vars(model_cfg).items() if k in accepted and k not in ("name", "extra")}
    # A factory with **kwargs passes them on (nxst_cnn -> NxSTCNN): the model itself names a wrong one.
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key in model_cfg.extra:
        if key not in accepted and not open_ended:
            raise ValueError(f"model.extra.{key} is not an argument of model '{model_cfg.name}'; "
                             f"it takes: {', '.join(accepted)}")
    kwargs.update(model_cfg.extra)
    return factory(**kwargs)


def _import_all() -> None:
    # Importing the modules runs their @register_model decorators.
    from . import coloc, digits, multistream, svhn  # noqa: F401
