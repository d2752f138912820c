"""Webdataset loaders: an endless resampled training stream per rank, and an exact-once evaluation.

    train = build_train_loader(cfg, manifest, rank, world_size, micro_batch, seed)
    images, targets = next(iter(train))        # uint8 (B,3,H,W), int64 (B,) or (B,max_length)
    x = normalize(images.to(device, non_blocking=True), cfg.data.mean, cfg.data.std, channels_last=True)

Training draws shards with replacement (webdataset's ResampledShards) from a seed that differs
per rank, DataLoader worker and epoch, so every rank streams forever and takes the trainer's
number of steps: no rank runs dry and hangs DDP however few shards there are. Evaluation splits
the shard list by rank, then by worker, and reads each shard once: every sample is scored exactly
once for any number of ranks and workers. Batches leave the workers as uint8; normalisation runs
on the device (4x fewer bytes through pinned memory than float32).
"""
from __future__ import annotations

import functools
import logging
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from pipeline.config import Config
from pipeline.data.augment import effective_resize, eval_transform, train_augment
from pipeline.data.decode import CorruptSample, decode_image, sample_json
from pipeline.data.manifest import DataError, Manifest
from pipeline.tasks import task_of

log = logging.getLogger(__name__)

# Skipping stops being plausible when this many samples in a row fail to decode.
MAX_CONSECUTIVE_CORRUPT = 200


def _worker() -> Tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Seeds:
    """The stream's seeds: one per (seed, rank, DataLoader worker, epoch, stage), picklable for workers.

    The loader sets `epoch` before each iter(); workers read it when they start.
    """

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank, self.epoch = seed, rank, 0

    def __call__(self, *stage: int) -> int:
        return wds.utils.make_seed(self.seed, self.rank, _worker()[0], self.epoch, *stage)

    def rank_worker(self) -> int:
        """ResampledShards' worker_seed (it mixes in its own seed and epoch)."""
        return wds.utils.make_seed(self.rank, _worker()[0])


def _one_line(err: DataError) -> DataError:
    """A DataError raised in a DataLoader worker comes back wrapped in its traceback: keep its message."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        if "DataError: " in line:
            return DataError(line.split("DataError: ", 1)[1])
    return DataError(lines[-1] if lines else "data error in a loader worker")


class _ShardReadError:
    """tarfile_to_samples' handler: a truncated or unreadable shard is skipped (warned) or raised."""

    def __init__(self, on_corrupt: str):
        self.on_corrupt = on_corrupt

    def __call__(self, exn: Exception) -> bool:
        if self.on_corrupt == "error":
            raise DataError(f"cannot read shard: {exn}") from exn
        log.warning("skipping unreadable shard data: %s", exn)
        return True


class _Decode:
    """Stage: raw tar samples -> (uint8 HxWx3 image, target, meta); corrupt ones skipped or raised.

    Skipped samples are counted and the count rides along with the next item, because the
    stage runs in a DataLoader worker process whose counters the trainer cannot read.
    """

    def __init__(self, cfg: Config, task: str, max_length: int, seeds: Optional[_Seeds] = None):
        self.cfg, self.task, self.max_length = cfg, task_of(task), max_length
        self.seeds = seeds  # None: evaluation, the deterministic view; else training, augmented
        self.min_side = effective_resize(cfg)

    def _target(self, sample: Dict[str, Any], meta: Dict[str, Any]):
        return self.task.target(sample, meta, self.max_length)

    def _load(self, sample: Dict[str, Any], augment) -> Tuple[np.ndarray, Any, Dict[str, Any]]:
        meta = sample_json(sample)
        target = self._target(sample, meta)
        channels = self.cfg.data.channels
        if self.seeds is not None and self.cfg.data.distortion is not None:
            # undistorted source digits (grayscale 28x28), which the trainer distorts (and pairs) afresh
            image, _ = decode_image(sample, None, 1)
            return image, target, {}
        image, size = decode_image(sample, self.min_side, channels)
        if self.seeds is not None:  # training: augmented
            image = augment(image=image)["image"]
            return image.reshape(*image.shape[:2], channels), target, {}
        image, view = eval_transform(image, size, self.cfg)
        image = image.reshape(*image.shape[:2], channels)  # cv2 drops a single channel's axis
        return image, target, {"key": sample["__key__"], "shard": sample.get("__url__"), "size": list(size),
                               "bbox": meta.get("bbox"), "parts": meta.get("parts", []), "view": view.as_list()}

    def __call__(self, samples: Iterator[Dict[str, Any]]):
        if get_worker_info() is not None:  # one thread per worker: W workers x OpenCV's core-count pool oversubscribes
            cv2.setNumThreads(1)
        augment = None
        # albumentations' own RNG, seeded per rank, worker and epoch like the shards; with
        # data.distortion the trainer distorts the stored digits afresh on the device instead
        if self.seeds is not None and self.cfg.data.distortion is None:
            augment = train_augment(self.cfg)
            augment.set_random_seed(self.seeds(2))
        skipped = in_a_row = 0
        for sample in samples:
            try:
                image, target, meta = self._load(sample, augment)
            except CorruptSample as err:
                where = f"shard {sample.get('__url__')} key {sample.get('__key__')}"
                if self.cfg.data.on_corrupt == "error":
                    raise DataError(f"{where}: {err} (data.on_corrupt=error; set it to skip to count and go on)")
                log.warning("skipping %s: %s", where, err)
                skipped, in_a_row = skipped + 1, in_a_row + 1
                if in_a_row >= MAX_CONSECUTIVE_CORRUPT:
                    raise DataError(f"{where}: {in_a_row} samples in a row could not be decoded; "
                                    "the shards look broken, not a few bad samples")
                continue
            in_a_row = 0
            yield image, target, meta, skipped
            skipped = 0
        if skipped:  # corrupt samples at the end of the stream: report them with an empty item
            yield None, None, None, skipped


class _Batch:
    """Stage: items -> (images uint8 (B,3,H,W), targets int64, metas, skipped since the last batch)."""

    def __init__(self, batch_size: int, partial: bool):
        self.batch_size, self.partial = batch_size, partial

    def _collate(self, items: List[tuple], skipped: int):
        # One copy into (B,H,W,3), seen as (B,3,H,W) in channels_last strides: no per-image transpose copy
        images = torch.from_numpy(np.stack([item[0] for item in items])).permute(0, 3, 1, 2)
        targets = torch.as_tensor(np.stack([np.asarray(item[1]) for item in items]), dtype=torch.int64)
        return images, targets, [item[2] for item in items], skipped

    def __call__(self, items):
        batch: List[tuple] = []
        skipped = 0
        for item in items:
            skipped += item[3]
            if item[0] is None:
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._collate(batch, skipped)
                batch, skipped = [], 0
        if batch and self.partial:
            yield self._collate(batch, skipped)
        elif skipped:
            yield None, None, [], skipped


def _data_loader(dataset, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers else None)


def _stop_workers(batches) -> None:
    """Shut a DataLoader iterator's workers down now. Left to the garbage collector, an abandoned
    stream's workers (e.g. after an error, or a stream replaced by a new one) can block the
    collecting thread for 5 s per worker on join timeouts."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # absent with num_workers=0
    if shutdown is not None:
        shutdown()


class _Loader:
    """What both loaders share: a DataLoader over a webdataset pipeline of (images, targets, metas,
    skipped) items, and the count of corrupt samples skipped."""

    def __init__(self, pipeline: Optional[wds.DataPipeline], num_workers: int, pin_memory: bool):
        self.pipeline, self.num_workers, self.pin_memory = pipeline, num_workers, pin_memory
        self.num_skipped = 0

    def _batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, List[Dict[str, Any]]]]:
        """(images, targets, metas) batches; items that only report skipped samples are counted
        and dropped. A DataError comes out as one line; the workers stop when this generator ends
        or is closed."""
        batches = iter(_data_loader(self.pipeline, self.num_workers, self.pin_memory))
        try:
            for images, targets, metas, skipped in batches:
                self.num_skipped += skipped
                if images is not None:
                    yield images, targets, metas
        except DataError as err:
            raise _one_line(err) from None
        finally:
            _stop_workers(batches)


class TrainLoader(_Loader):
    """Endless (images uint8 (B,3,H,W), targets int64) batches of one rank.

    `num_skipped` counts the corrupt samples skipped so far (data.on_corrupt=skip). Each
    `iter()` starts a new epoch: new shard draws, shuffle and augmentation seeds. A resumed run
    should pass a seed derived from its step (or call `set_epoch`) so it does not replay the
    first run's samples.
    """

    def __init__(self, pipeline: wds.DataPipeline, seeds: _Seeds, shards: wds.ResampledShards,
                 num_workers: int, pin_memory: bool):
        super().__init__(pipeline, num_workers, pin_memory)
        self._seeds, self._shards = seeds, shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> "TrainStream":
        self._seeds.epoch = self.epoch
        self._shards.seed = self._seeds(1)
        self.epoch += 1
        return TrainStream(self, self._batches())


class _Stream:
    """An endless training iterator; `num_skipped` reads its loader's count (for `stream = iter(loader)`)."""

    loader: Any

    @property
    def num_skipped(self) -> int:
        return self.loader.num_skipped

    def __iter__(self) -> "_Stream":
        return self


class TrainStream(_Stream):
    """The iterator of a TrainLoader."""

    def __init__(self, loader: TrainLoader, batches: Iterator[Tuple[torch.Tensor, torch.Tensor, List]]):
        self.loader, self._batches = loader, batches

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        images, targets, _ = next(self._batches)  # training batches' metas are empty
        return images, targets

    def close(self) -> None:
        """Stop the worker processes now (call it when replacing a stream by a new one)."""
        self._batches.close()


class _SeededShuffle:
    """Stage: webdataset's buffer shuffle with a seed per rank, worker and epoch."""

    def __init__(self, bufsize: int, seeds: _Seeds):
        self.bufsize, self.seeds = bufsize, seeds

    def __call__(self, samples):
        if self.bufsize <= 1:
            return samples
        rng = random.Random(self.seeds(3))
        return wds.filters._shuffle(samples, self.bufsize, min(self.bufsize, 100), rng=rng)


class MemoryTrainLoader:
    """data.in_memory: the training split decoded once and held as uint8 tensors; each `iter()` is an
    endless stream of batches, a fresh seeded permutation of the split per pass (each sample once
    per epoch). For small data sets (MNIST-size: 8,000 digits are 6 MB) whose per-sample work is
    deterministic, re-reading and re-decoding tar files every epoch is most of the step's CPU time."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, num_skipped: int, micro_batch: int, seed: int):
        self.images, self.targets, self.num_skipped = images, targets, num_skipped
        self.micro_batch, self.seed = micro_batch, seed

    def __iter__(self) -> "MemoryTrainStream":
        return MemoryTrainStream(self)


class MemoryTrainStream(_Stream):
    """The iterator of a MemoryTrainLoader."""

    def __init__(self, loader: MemoryTrainLoader):
        self.loader = loader
        self.generator = torch.Generator().manual_seed(loader.seed)
        self.order, self.position = torch.empty(0, dtype=torch.int64), 0

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        batch = self.loader.micro_batch
        if self.position + batch > len(self.order):  # a new epoch; a batch never straddles two
            self.order, self.position = torch.randperm(len(self.loader.images), generator=self.generator), 0
        index = self.order[self.position:self.position + batch]
        self.position += batch
        return self.loader.images[index], self.loader.targets[index]

    def close(self) -> None:
        pass


_DECODED: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor, int]] = {}


def _decoded_split(cfg: Config, manifest: Manifest, split: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(uint8 images (N,C,H,W), targets, corrupt samples skipped) of a whole split through the training
    decode, once per process and (data, decode settings): a run's later segments reuse it."""
    key = (str(manifest.root), split, cfg.data.channels, cfg.model.input_size, cfg.data.augment, cfg.data.distortion,
           cfg.data.on_corrupt)
    if key not in _DECODED:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(manifest.shard_paths(split)),  # {"url"} of every shard, in manifest order
            wds.tarfile_to_samples(handler=_ShardReadError(cfg.data.on_corrupt)),  # raw samples
            _Decode(cfg, manifest.task, manifest.max_length, _Seeds(cfg.train.seed, 0)),  # (image, target, {}, skipped)
            _Batch(1024, partial=True))                  # (images, targets, metas, skipped)
        loader = _Loader(pipeline, num_workers=0, pin_memory=False)
        batches = list(loader._batches())
        if not batches:
            raise DataError(f"{manifest.root / 'manifest.json'}: split '{split}' holds no readable samples")
        images = torch.cat([b[0] for b in batches]).contiguous()
        _DECODED[key] = (images, torch.cat([b[1] for b in batches]), loader.num_skipped)
    return _DECODED[key]


def build_train_loader(cfg: Config, manifest: Manifest, rank: int, world_size: int, micro_batch: int,
                       seed: int, num_workers: Optional[int] = None) -> TrainLoader:
    """Endless uint8 batches of `micro_batch` samples from the training split for `rank`."""
    del world_size  # resampling needs no split: ranks differ by seed, not by shard subset
    if cfg.data.in_memory:
        images, targets, skipped = _decoded_split(cfg, manifest, cfg.data.train_split)
        return MemoryTrainLoader(images, targets, skipped, micro_batch, wds.utils.make_seed(seed, rank))
    shard_paths = manifest.shard_paths(cfg.data.train_split)
    if not shard_paths:
        raise DataError(f"{manifest.root / 'manifest.json'}: split '{cfg.data.train_split}' lists no shards")
    train_augment(cfg)  # checks the preset now, and imports albumentations once here, not in every worker
    seeds = _Seeds(seed, rank)
    shards = wds.ResampledShards(shard_paths, seed=seed, worker_seed=seeds.rank_worker, deterministic=True)
    pipeline = wds.DataPipeline(
        shards,                                    # {"url"}: a shard drawn at random, forever
        wds.tarfile_to_samples(handler=_ShardReadError(cfg.data.on_corrupt)),  # raw samples of that shard
        _SeededShuffle(cfg.data.shuffle_buffer, seeds),  # the same samples, shuffled in a buffer
        _Decode(cfg, manifest.task, manifest.max_length, seeds),  # (uint8 HxWx3 augmented image, target, {}, skipped)
        _Batch(micro_batch, partial=False),        # (images, targets, metas, skipped)
    )
    workers = cfg.train.num_workers if num_workers is None else num_workers
    return TrainLoader(pipeline, seeds, shards, workers, pin_memory=torch.cuda.is_available())


class EvalLoader(_Loader):
    """Batches (images uint8 (B,3,H,W), targets, metas) covering this rank's part of a split once.

    A meta holds key, shard, size (original [w, h]), bbox, parts and view ([scale_x, scale_y,
    offset_x, offset_y, input_size]: input_px = original_px * scale - offset, see augment.View).
    `num_skipped` counts corrupt samples skipped by the last pass.
    """

    def __init__(self, pipeline: Optional[wds.DataPipeline], shard_paths: Sequence[str], num_workers: int,
                 pin_memory: bool):
        super().__init__(pipeline, num_workers, pin_memory)
        self.shard_paths = list(shard_paths)

    def __iter__(self):
        self.num_skipped = 0
        if self.pipeline is not None:
            yield from self._batches()


def build_eval_loader(cfg: Config, manifest: Manifest, split: str, rank: int, world_size: int,
                      batch_size: int, num_workers: int) -> EvalLoader:
    """Every sample of `split` exactly once over all ranks and workers; deterministic centre view."""
    shard_paths = manifest.shard_paths(split)[rank::world_size]  # node split before worker split
    decode = _Decode(cfg, manifest.task, manifest.max_length)
    if not shard_paths:  # more ranks than shards: this rank scores nothing (and still joins the all-reduce)
        return EvalLoader(None, [], 0, pin_memory=False)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shard_paths),          # {"url"} of this rank's shards, in manifest order
        wds.split_by_worker,                       # ... of this DataLoader worker
        wds.tarfile_to_samples(handler=_ShardReadError(cfg.data.on_corrupt)),  # raw samples
        decode,                                    # (uint8 SxSx3 centre view, target, meta, skipped)
        _Batch(batch_size, partial=True),          # (images, targets, metas, skipped); last batch partial
    )
    # A worker without a shard would only idle: never start more workers than the rank has shards.
    workers = min(num_workers, len(shard_paths))
    return EvalLoader(pipeline, shard_paths, workers, pin_memory=torch.cuda.is_available())


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              channels_last: bool = False) -> torch.Tensor:
    """uint8 (B,3,H,W) on any device -> float32 (x / 255 - mean) / std, channels_last or contiguous.

    The loaders' batches are already channels_last in memory; any reordering happens here on the
    1-byte values, before the float tensor exists.
    """
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects the loaders' uint8 images, got {images.dtype}")
    mean_t, inv_std = _normalize_constants(tuple(map(float, mean)), tuple(map(float, std)), images.device)
    return images.float().sub_(mean_t).mul_(inv_std)  # in place: one float tensor, not three (2x faster on CPU)


@functools.lru_cache(maxsize=16)
def _normalize_constants(mean: Tuple[float, ...], std: Tuple[float, ...],
                         device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) float32 255 * mean and 1 / (255 * std) on `device`, made once per device: made
    from Python lists every batch they were two blocking host-to-device copies, each of which waits
    for the GPU's queue to drain."""
    with torch.inference_mode(False):  # usable by any later step, whichever mode made them
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        return mean_t.to(device), inv_std.to(device)
