"""DDP equivalence: one optimiser step on 2 gloo ranks with per-rank batch b gives the parameters of
one step in 1 process with batch 2b on the same samples (and so does gradient accumulation).

The step is the trainer's own (`Learner.step`: normalise, forward, loss, backward with DDP's
all-reduce / `no_sync`, optimiser, schedule) fed fixed uint8 tensors instead of the data loader.
Dropout is off, and the model (timm's test_convnext trunks) uses LayerNorm, whose gradients do not
depend on how a batch is split. With BatchNorm they would: batch statistics over b differ from
those over 2b (SyncBatchNorm, CUDA only, removes that difference).

Tolerance: float32 sums in another order, so parameters agree to atol 1e-6 + rtol 1e-5, while one
step moves them by orders of magnitude more (checked), and a step on rank 0's half alone (what a
missing all-reduce would give) is shown to land outside the tolerance.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import load_config
from pipeline.train.distributed import setup
from pipeline.train.trainer import Learner
from test_train_helpers import TINY_MODEL

GLOBAL_BATCH = 8
ATOL, RTOL = 1e-6, 1e-5



def fixed_batch():
    g = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (GLOBAL_BATCH, 3, 64, 64), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    return images, targets


def make_learner(micro_batch: int) -> Learner:
    cfg = load_config(None, [*TINY_MODEL, "model.dropout=0", "train.device=cpu", "optim.lr=0.5",
                             "optim.weight_decay=0.01", "optim.lr_scale.localisation=0.1",
                             f"train.global_batch_size={GLOBAL_BATCH}", f"train.micro_batch_size={micro_batch}"])
    return Learner(cfg, setup("cpu"))  # inside a spawned group, setup() joins it (as under Ray)


def params(learner: Learner) -> dict:
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


def one_step(micro_batch: int, samples) -> dict:
    """Parameters after one trainer step on `samples` (a slice or index tensor) of the fixed batch."""
    learner = make_learner(micro_batch)
    images, targets = fixed_batch()
    images, targets = images[samples], targets[samples]
    stream = iter([(images[i:i + micro_batch], targets[i:i + micro_batch])
                   for i in range(0, len(images), micro_batch)])
    learner.step(stream)
    assert next(stream, None) is None, "the step did not use exactly its share of the batch"
    return params(learner)


def _rank_main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        share = GLOBAL_BATCH // world
        mine = slice(rank * share, (rank + 1) * share)
        results = {"ddp": one_step(share, mine), "ddp_accumulate": one_step(share // 2, mine)}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _assert_close(got: dict, want: dict, what: str) -> None:
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {name}: {m}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rank_step_equals_one_process_step_on_the_whole_batch(tmp_path: Path):
    out = tmp_path / "ddp.pt"
    # fork, not spawn: the ranks start without importing torch and timm again (CPU only: no CUDA state).
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True,
                       start_method="fork")
    ranks = torch.load(out, weights_only=True)

    reference = one_step(GLOBAL_BATCH, slice(None))  # 1 process, batch 2b
    _assert_close(ranks["ddp"], reference, "2 ranks x b")
    _assert_close(ranks["ddp_accumulate"], reference, "2 ranks x b/2 x 2 accumulation steps")
    _assert_close(one_step(GLOBAL_BATCH // 2, slice(None)), reference, "1 process, b x 2 accumulation steps")

    # The check has power: the step moved the weights, and half the batch alone lands elsewhere.
    start = params(make_learner(GLOBAL_BATCH))
    moved = max((reference[k] - start[k]).abs().max().item() for k in start if start[k].is_floating_point())
    assert moved > 1e3 * ATOL
    rank0_only = one_step(GLOBAL_BATCH, torch.arange(GLOBAL_BATCH) % (GLOBAL_BATCH // 2))  # no all-reduce
    assert any(not torch.allclose(rank0_only[k], reference[k], atol=ATOL, rtol=RTOL) for k in reference)

