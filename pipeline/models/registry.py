"""The model registry: name -> factory. A leaf module: the model modules register into it with
`@register_model`, and `pipeline.models` (create_model, list_models, build_model) reads it."""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in REGISTRY:
        raise ValueError(f"model '{fn.__name__}' registered twice")
    REGISTRY[fn.__name__] = fn
    return fn
