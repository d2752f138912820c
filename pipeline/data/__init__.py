"""Data: manifest checks, webdataset train/eval loaders, albumentations presets, decoding.

    manifest = read_manifest(cfg.data.root)                  # checks shards exist with the listed sizes
    manifest.check_model(model.task, cfg.model.num_classes)  # labels fit the model
    train = build_train_loader(cfg, manifest, rank, world_size, micro_batch, seed)   # endless
    test = build_eval_loader(cfg, manifest, "test", rank, world_size, batch_size, num_workers)
    x = normalize(images.to(device, non_blocking=True), cfg.data.mean, cfg.data.std, channels_last)
"""
import importlib
from typing import Any

# name -> the submodule that defines it, imported on first use: `pipeline.data.manifest` alone (the
# job scripts' preflight on a login node) then does not pull in torch, cv2 and webdataset (~2 s)
_EXPORTS = {
    "View": "augment", "effective_resize": "augment", "eval_transform": "augment", "eval_view": "augment",
    "train_augment": "augment",
    "PAD_DIGIT": "decode", "decode_rgb": "decode",
    "EvalLoader": "loaders", "TrainLoader": "loaders", "build_eval_loader": "loaders",
    "build_train_loader": "loaders", "normalize": "loaders",
    "DataError": "manifest", "Manifest": "manifest", "read_manifest": "manifest",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # the next lookup finds it without this function
    return value
