"""The input normalisation a model expects: `data.mean` / `data.std` when the config sets them, else
the mean / std its timm backbone's pretrained weights were trained with.

    source = resolve_normalisation(cfg)   # fills cfg.data.mean / cfg.data.std in place when null
    # "timm pretrained cfg of 'inception_v3' (tv_in1k)": mean = std = (0.5, 0.5, 0.5)

Why: a pretrained backbone reads its inputs as its weights were trained on them. timm's
`inception_v3` weights (every tag) expect mean = std = 0.5, ResNets ImageNet's mean / std; the
wrong pair shifts and rescales every input channel of a network that is only fine-tuned. The
values are resolved once, when the trainer (or an evaluation) builds the model, and written into
the run's config.yaml and checkpoints, so evaluation and later tools use what training used.

Where the values come from, first match wins:
1. `data.mean` / `data.std` set in the config (the digits configs: mean 0, std 1, so that the
   sampler's zero padding is the black background);
2. for a model with a timm backbone (`nxst_cnn`, `cub_baseline`) whose `model.pretrained` is a
   weights file: the `config.json` beside it, when it is timm's hub layout for this architecture
   (`{"architecture": ..., "pretrained_cfg": {"mean": ..., "std": ...}}`);
3. timm's pretrained config of `model.backbone` (the tag it names, else timm's default tag), also
   under random init, so a run from scratch and a fine-tuned one see the same inputs;
4. otherwise (models without a timm backbone: SVHN; a timm name without a pretrained config):
   ImageNet's mean / std for 3 channels, mean 0 / std 1 (raw [0, 1] pixels) for any other count.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, List, Optional, Tuple

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

Normalisation = Tuple[List[float], List[float], str]


def input_normalisation(model_cfg: Any, channels: int = 3) -> Normalisation:
    """(mean, std, where they come from) for a `ModelConfig`, ignoring data.mean / data.std."""
    from . import _REGISTRY, _import_all

    _import_all()
    factory = _REGISTRY.get(model_cfg.name)
    if factory is not None and "backbone" in inspect.signature(factory).parameters:
        found = _from_weights_file(model_cfg.pretrained, model_cfg.backbone) or _from_timm(model_cfg.backbone)
        if found is not None:
            mean, std, source = found
            if channels == 1 and len(mean) != 1:  # one grey channel: the average of the colour channels'
                mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
            return mean, std, source
        fallback = f"ImageNet's (timm has no pretrained config for '{model_cfg.backbone}')"
    else:
        fallback = f"ImageNet's (model '{model_cfg.name}' has no timm backbone)"
    if channels != 3:  # grey digits, or a digit a channel (MNIST addition): no colour statistics apply
        return [0.0] * channels, [1.0] * channels, f"raw [0, 1] pixels (model '{model_cfg.name}', {channels} channel(s))"
    return list(IMAGENET_MEAN), list(IMAGENET_STD), fallback


EXPLICIT = "data.mean / data.std of the config"


def resolve_normalisation(cfg: Any) -> str:
    """Fill `cfg.data.mean` / `cfg.data.std` in place where they are null; return where they come from."""
    data = cfg.data
    if data.mean is not None and data.std is not None:
        return EXPLICIT
    mean, std, source = input_normalisation(cfg.model, data.channels)
    data.mean, data.std = mean, std
    return source


def follow_checkpoint(cfg: Any, saved: Any, source: str) -> Optional[str]:
    """On resume: the mean / std the checkpoint trained with, where `cfg` resolved others from a null
    config (a run started before they followed the backbone keeps ImageNet's). Values the config
    sets win. Returns the line to log when they differ, else None."""
    data = saved.get("data") if isinstance(saved, dict) else None
    mean, std = (data.get("mean"), data.get("std")) if isinstance(data, dict) else (None, None)
    if mean is None or std is None or (list(mean) == list(cfg.data.mean) and list(std) == list(cfg.data.std)):
        return None
    if source == EXPLICIT:
        return (f"data.mean={cfg.data.mean} / data.std={cfg.data.std} of the config differ from the checkpoint's "
                f"{list(mean)} / {list(std)}, which it was trained with; the config's are used")
    cfg.data.mean, cfg.data.std = list(map(float, mean)), list(map(float, std))
    return (f"resuming with the checkpoint's input normalisation, mean {cfg.data.mean}, std {cfg.data.std} (it was "
            f"trained with them), not those of {source}; set data.mean / data.std to change it")


def describe(cfg: Any, source: str) -> str:
    """One log line: the values in use and their source."""
    fmt = lambda values: "(" + ", ".join(f"{v:.4g}" for v in values) + ")"  # noqa: E731
    return f"input normalisation: mean {fmt(cfg.data.mean)}, std {fmt(cfg.data.std)} from {source}"


def _from_timm(backbone: str) -> Optional[Normalisation]:
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(backbone)
    if pretrained_cfg is None or pretrained_cfg.mean is None or pretrained_cfg.std is None:
        return None
    tag = f" ({pretrained_cfg.tag})" if pretrained_cfg.tag else ""
    return (list(map(float, pretrained_cfg.mean)), list(map(float, pretrained_cfg.std)),
            f"timm pretrained cfg of '{backbone}'{tag}")


def _from_weights_file(pretrained: Any, backbone: str) -> Optional[Normalisation]:
    """mean / std from timm's `config.json` beside a weights file, when it describes this architecture."""
    if not isinstance(pretrained, (str, Path)):
        return None
    config = Path(pretrained).expanduser().parent / "config.json"
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict) or str(values.get("architecture", "")).split(".")[0] != backbone.split(".")[0]:
        return None
    pretrained_cfg = values.get("pretrained_cfg") if isinstance(values.get("pretrained_cfg"), dict) else values
    mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) > 0):
        return None
    return list(map(float, mean)), list(map(float, std)), f"{config}"
