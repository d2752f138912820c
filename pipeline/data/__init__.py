"""Data: manifest checks, webdataset train/eval loaders, albumentations presets, decoding.

    manifest = read_manifest(cfg.data.root)                  # checks shards exist with the listed sizes
    manifest.check_model(model.task, cfg.model.num_classes)  # labels fit the model
    train = build_train_loader(cfg, manifest, rank, world_size, micro_batch, seed)   # endless
    test = build_eval_loader(cfg, manifest, "test", rank, world_size, batch_size, num_workers)
    x = normalize(images.to(device, non_blocking=True), cfg.data.mean, cfg.data.std, channels_last)
"""
from pipeline.data.augment import View, effective_resize, eval_transform, eval_view, train_augment
from pipeline.data.decode import PAD_DIGIT, decode_rgb
from pipeline.data.loaders import EvalLoader, TrainLoader, build_eval_loader, build_train_loader, normalize
from pipeline.data.manifest import DataError, Manifest, read_manifest

__all__ = ["DataError", "EvalLoader", "Manifest", "PAD_DIGIT", "TrainLoader", "View", "build_eval_loader",
           "build_train_loader", "decode_rgb", "effective_resize", "eval_transform", "eval_view", "normalize",
           "read_manifest", "train_augment"]
