"""Fast unit tests of the trainer's parts: launcher environments, checkpoint files, run() callbacks."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import REPO, need_program
from pipeline.config import load_config
from pipeline.train import checkpoint as ckpt
from pipeline.train import main, run
from pipeline.train.distributed import launch_info, planned_world_size
from shard_fixtures import write_tiny_cub_shards
from test_train_helpers import tiny_run



def test_torchrun_environment_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29400",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}  # torchrun inside an sbatch allocation
    info = launch_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (3, 8, 1, "torchrun")
    assert planned_world_size(env) == 8


def test_srun_environment_gives_rank_world_and_an_agreed_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "MASTER_ADDR": "gpu07"}
    info = launch_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (5, 8, 1, "slurm")
    assert info.master_addr == "gpu07"
    # every rank of a job derives the same free-range port from the job id; other jobs get other ports
    ports = {launch_info({**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 4)}).master_port
             for rank in range(8)}
    assert ports == {info.master_port} and 1024 < int(info.master_port) < 49152  # below the ephemeral range
    assert len({launch_info({**env, "SLURM_JOB_ID": str(job)}).master_port for job in range(123456, 123466)}) == 10
    assert launch_info({**env, "MASTER_PORT": "29999"}).master_port == "29999"
    assert planned_world_size(env) == 8
    # One task (an sbatch script running python directly) is a single process.
    assert launch_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "none"


def test_srun_master_is_the_first_host_of_the_node_list(tmp_path, monkeypatch):
    need_program("scontrol")
    # Expanding a host list needs no daemon, only a slurm.conf to start from.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=p Nodes=localhost Default=YES\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[07-08],cpu1"}
    assert launch_info(env).master_addr == "gpu07"


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_checkpoint_dir_keeps_the_newest_k_and_aliases_last_and_best(tmp_path):
    d = ckpt.CheckpointDir(tmp_path, keep=2)
    for step in (1, 2, 3):
        d.save({"step": step, "model": {}, "config": {}}, step, is_best=step == 2)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_0000002.pt", "step_0000003.pt"]
    assert ckpt.load(d.last)["step"] == 3 and ckpt.load(d.best)["step"] == 2
    assert d.resume_path("auto") == d.last and d.resume_path(None) is None
    assert ckpt.CheckpointDir(tmp_path / "empty", 2).resume_path("auto") is None  # fresh start
    d.last.unlink()  # killed between writing step 3's file and aliasing last.pt: step 3 is not lost
    assert d.resume_path("auto") == d.step_path(3) and ckpt.load(d.resume_path("auto"))["step"] == 3


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random
    import numpy as np
    ckpt.atomic_save({"rng": ckpt.rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all() and expected[2] == got[2]


def test_unloadable_checkpoint_and_missing_resume_path_are_one_line_errors(tmp_path, capsys):
    import pickle
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(subprocess.Popen))  # weights_only refuses arbitrary objects
    with pytest.raises(ckpt.CheckpointError, match="evil.pt: not a loadable checkpoint"):
        ckpt.load(evil)
    assert main(tiny_run(tmp_path, tmp_path / "run", f"train.resume={tmp_path / 'gone.pt'}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "gone.pt" in err[-1]


@pytest.mark.slow
def test_run_calls_on_eval_with_reduced_metrics_and_the_checkpoint_just_written(tmp_path):
    shards = write_tiny_cub_shards(tmp_path / "cub")
    cfg = load_config(None, tiny_run(shards, tmp_path / "run", "train.max_steps=3", "train.eval_every=1",
                                     "train.checkpoint_every=3"))
    calls = []

    def on_eval(step, metrics, path):
        state = torch.load(path, weights_only=True) if path is not None else None
        calls.append((step, metrics["num_samples"], state["step"] if state else None))

    summary = run(cfg, on_eval=on_eval)
    assert [c[0] for c in calls] == [1, 2, 3] and all(c[1] == 6 for c in calls)
    assert calls[0][2] == 1  # the first evaluation is a new best: checkpointed, path passed
    assert calls[-1][2] == 3  # periodic + final
    assert all(c[2] in (None, c[0]) for c in calls)
    assert summary["step"] == 3 and summary["checkpoint"].endswith("last.pt")
    assert summary["metrics"]["num_samples"] == 6


@pytest.mark.slow
def test_sequence_models_train_and_keep_the_best_by_sequence_accuracy(tmp_path):
    from shard_fixtures import write_tiny_svhn_shards
    shards = write_tiny_svhn_shards(tmp_path / "svhn")
    cfg = load_config(REPO / "configs" / "svhn" / "st_single_64.yaml", [
        f"data.root={shards}", f"run.dir={tmp_path / 'run'}", "model.extra.width=0.125", "train.global_batch_size=4",
        "train.max_steps=2", "train.eval_every=2", "train.num_workers=0", "train.log_every=1", "train.num_viz=2",
        "data.shuffle_buffer=8"])
    summary = run(cfg)
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["metric_name"] == "sequence_accuracy" and best["best_metric"] == summary["metrics"]["sequence_accuracy"]
    assert summary["metrics"]["num_samples"] == 6 and "digit_accuracy" in summary["metrics"]
    train = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in train if l["split"] == "train"]
    # The logged lr is the base lr; the localisation role runs at 0.1 x it (paper A.4).
    assert train[0]["lr"] == pytest.approx(cfg.optim.lr) and train[0]["lr/localisation"] == pytest.approx(0.1 * cfg.optim.lr)
    assert (tmp_path / "run" / "viz" / "step_0000002.png").is_file()


def test_best_checkpoint_stays_the_earlier_one_when_a_later_evaluation_is_worse(tmp_path, monkeypatch):
    from shard_fixtures import write_tiny_svhn_shards
    from pipeline.train.trainer import Trainer

    scores = iter([0.5, 0.75, 0.25])  # steps 2, 4, 6: the best is step 4's, then a worse one
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"num_samples": 6, "loss": 1.0,
                                                           "sequence_accuracy": next(scores), "digit_accuracy": 0.5})
    shards = write_tiny_svhn_shards(tmp_path / "svhn")
    cfg = load_config(REPO / "configs" / "svhn" / "cnn_64.yaml", [
        f"data.root={shards}", f"run.dir={tmp_path / 'run'}", "model.extra.width=0.125", "train.global_batch_size=4",
        "train.max_steps=6", "train.eval_every=2", "train.checkpoint_every=100", "train.num_workers=0",
        "data.shuffle_buffer=8"])
    summary = run(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    best = torch.load(checkpoints / "best.pt", weights_only=True)
    last = torch.load(checkpoints / "last.pt", weights_only=True)
    assert (best["step"], best["best_metric"], best["metric_name"]) == (4, 0.75, "sequence_accuracy")
    assert (last["step"], last["best_metric"], last["metrics"]["sequence_accuracy"]) == (6, 0.75, 0.25)
    assert summary["best_metric"] == 0.75


def test_resumed_metrics_keep_lines_up_to_the_checkpoint_and_drop_a_torn_last_line(tmp_path):
    from pipeline.train.monitor import drop_lines_after
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "split": "setup"}\n{"step": 4, "split": "train"}\n'
                    '{"step": 4, "split": "test"}\n{"step": 5, "split": "train"}\n{"step": 6, "spl')
    drop_lines_after(path, 4)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [0, 4, 4]


@pytest.mark.slow
def test_damaged_last_checkpoint_falls_back_to_the_newest_loadable_one_under_resume_auto(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="pipeline")
    shards = write_tiny_cub_shards(tmp_path / "cub")
    args = ["train.checkpoint_every=4", "train.eval_every=4", "train.keep_checkpoints=3", "train.resume=auto"]
    assert main(tiny_run(shards, tmp_path / "run", "train.max_steps=8", *args)) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    last = checkpoints / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # damaged after the fact (also its hard link step_0000008.pt)
    assert main(tiny_run(shards, tmp_path / "run", "train.max_steps=12", *args)) == 0
    assert "last.pt: not a loadable checkpoint" in caplog.text and "goes on from the newest loadable" in caplog.text
    assert f"resumed from {checkpoints / 'step_0000004.pt'} at step 4" in caplog.text
    assert torch.load(last, weights_only=True)["step"] == 12
    # an explicit path never falls back; nothing to fall back on is one line naming the file
    last.write_bytes(b"broken")
    assert main(tiny_run(shards, tmp_path / "run", "train.max_steps=16", f"train.resume={last}")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {last}: not a loadable checkpoint")
    for path in checkpoints.glob("step_*.pt"):
        path.unlink()
    assert main(tiny_run(shards, tmp_path / "run", "train.max_steps=16", *args)) == 2
    assert "no loadable step_*.pt beside it" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_grad_clip_bounds_the_first_update(tmp_path):
    """SGD without momentum, lr 1: the first step moves the weights by exactly the clipped gradient."""
    from pipeline.train.distributed import DistEnv
    from pipeline.train.trainer import Trainer

    shards = write_tiny_cub_shards(tmp_path / "cub")
    moved = {}
    for clip in (None, 0.01):
        cfg = load_config(None, tiny_run(shards, tmp_path / "run", "optim.lr=1.0", "optim.momentum=0.0",
                                         "optim.weight_decay=0.0", "optim.lr_scale.localisation=1.0",
                                         f"optim.grad_clip={clip if clip else 'null'}", "model.dropout=0.0"))
        trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False))
        model = trainer.learner.model
        before = [p.detach().clone() for p in model.parameters()]
        trainer.train_step(trainer.train_stream())
        moved[clip] = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm()
    assert moved[None] > 0.1  # unclipped, the step is far larger than the bound ...
    assert moved[0.01] == pytest.approx(0.01, rel=1e-3)  # ... clipped, its norm is the bound


@pytest.mark.slow
def test_cpu_bf16_autocast_and_compile_train_a_tiny_model(tmp_path):
    shards = write_tiny_cub_shards(tmp_path / "cub")
    bf16 = load_config(None, tiny_run(shards, tmp_path / "bf16", "train.max_steps=2", "train.eval_every=2",
                                      "train.precision=bf16", "train.cpu_autocast=true"))
    summary = run(bf16)
    setup = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["precision"] == "bf16" and summary["step"] == 2 and summary["metrics"]["loss"] > 0
    # without cpu_autocast a bf16 config runs in fp32 on CPU
    fp32 = load_config(None, tiny_run(shards, tmp_path / "fp32", "train.max_steps=1", "train.precision=bf16"))
    run(fp32)
    assert json.loads((tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()[0])["precision"] == "fp32"
    compiled = load_config(None, tiny_run(shards, tmp_path / "compiled", "train.max_steps=2", "train.eval_every=2",
                                          "train.compile=true"))
    summary = run(compiled)
    state = torch.load(tmp_path / "compiled" / "checkpoints" / "last.pt", weights_only=True)
    assert summary["step"] == 2 and not any(k.startswith("_orig_mod") for k in state["model"])  # the bare weights


def test_sync_bn_converts_every_batchnorm_on_distributed_cuda_and_is_ignored_on_cpu(caplog):
    import timm
    from timm.layers import BatchNormAct2d
    from pipeline.train.distributed import DistEnv
    from pipeline.train.trainer import sync_batchnorm

    cfg = load_config(None, ["train.sync_bn=true"])
    model = timm.create_model("test_efficientnet", pretrained=False)  # BatchNormAct2d layers: norm + activation
    acts = [type(m.act).__name__ for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert acts
    synced = sync_batchnorm(model, cfg, DistEnv(0, 2, 0, torch.device("cuda", 0), owns_group=False))  # needs no GPU
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and not isinstance(m, torch.nn.SyncBatchNorm)
                   for m in synced.modules())
    assert [type(m.act).__name__ for m in synced.modules() if hasattr(m, "act") and
            isinstance(m, torch.nn.SyncBatchNorm)] == acts  # each activation kept
    fresh = timm.create_model("test_efficientnet", pretrained=False)
    cpu = DistEnv(0, 2, 0, torch.device("cpu"), owns_group=False)
    assert sync_batchnorm(fresh, cfg, cpu) is fresh and "train.sync_bn=true ignored" in caplog.text
    single = DistEnv(0, 1, 0, torch.device("cuda", 0), owns_group=False)
    assert sync_batchnorm(fresh, cfg, single) is fresh  # one rank: nothing to synchronise


def test_channels_last_input_gives_the_same_logits_as_contiguous():
    """The CUDA path (train.channels_last) feeds channels_last batches to a channels_last model."""
    from pipeline.data import normalize
    from pipeline.models import create_model

    torch.manual_seed(0)
    model = create_model("nxst_cnn", backbone="test_resnet", num_streams=2, input_size=64, crop_size=32,
                         num_classes=3, dropout=0.0).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    flat = normalize(images, [0.5] * 3, [0.25] * 3, channels_last=False)
    last = normalize(images, [0.5] * 3, [0.25] * 3, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(flat, last)
    with torch.no_grad():
        expected = model(flat)
        got = model.to(memory_format=torch.channels_last)(last)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_trainers_attention_picture_names_true_and_predicted_classes(tmp_path, monkeypatch):
    import pipeline.train.evaluator as evaluator

    drawn = []
    real = evaluator.attention_picture
    monkeypatch.setattr(evaluator, "attention_picture", lambda *a, **k: drawn.append(a) or real(*a, **k))
    shards = write_tiny_cub_shards(tmp_path / "cub")
    run(load_config(None, tiny_run(shards, tmp_path / "run", "train.max_steps=1", "train.num_viz=3")))
    images, boxes, crops, mean, std, path, captions, legend = drawn[0]
    classes = json.loads((shards / "manifest.json").read_text())["classes"]
    assert len(captions) == 3 and all(c.startswith("true: ") and "\npred: " in c for c in captions)
    assert all(c.split("\n")[0][6:] in classes and c.split("\n")[1][6:] in classes for c in captions)
    assert legend == ["stream 0", "stream 1"] and path.is_file()


def _buffers_after_sync(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from pipeline.train.evaluator import sync_buffers_from_rank0

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        wrapped = torch.nn.parallel.DistributedDataParallel(net)  # (its constructor syncs them once)
        net[1].running_mean.fill_(float(rank + 1))  # as after a last training step on each rank's own batch
        net[1].num_batches_tracked.fill_(10 * (rank + 1))
        sync_buffers_from_rank0(wrapped)
        torch.save({k: v for k, v in net.state_dict().items() if "running" in k or "tracked" in k},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_every_rank_evaluates_rank0s_batchnorm_statistics(tmp_path):
    """The checkpoint keeps rank 0's buffers; evaluation on every rank must use those."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_buffers_after_sync, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(ranks[1]["1.running_mean"], torch.ones(4))  # rank 1 now holds rank 0's statistics
    assert int(ranks[1]["1.num_batches_tracked"]) == 10
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
