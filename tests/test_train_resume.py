"""Preemption and resume with real processes: SIGKILL after a checkpoint then `train.resume=auto`
ends with exactly the weights of an uninterrupted run (CPU, fixed seeds); SIGTERM checkpoints and
exits with the requeue code."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, subprocess_env
from pipeline.train import REQUEUE_EXIT_CODE
from pipeline.train import checkpoint as ckpt
from shard_fixtures import write_tiny_cub_shards
from test_train_helpers import train_cmd, tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_cub_shards(tmp_path_factory.mktemp("cub"))


def _start(overrides) -> subprocess.Popen:
    # Its own process group, so a signal can reach the run and its loader workers alike.
    return subprocess.Popen(train_cmd(overrides), cwd=REPO, env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _signal_after(proc: subprocess.Popen, marker: str, sig: int, group: bool = False) -> str:
    """Send `sig` (to the whole process group if `group`) as soon as `marker` shows up in the
    run's log (stderr); returns the log."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            break
    seen.append(proc.communicate(timeout=240)[1])
    return "".join(seen)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure or SLURM's cgroup kill does."""
    children: dict = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _state(run_dir: Path) -> dict:
    """The checkpoint train.resume=auto continues from (last.pt, or the step file a kill left without it)."""
    return torch.load(ckpt.CheckpointDir(run_dir / "checkpoints", 0).resume_path("auto"), weights_only=True)


def test_sigkill_after_a_checkpoint_then_resume_auto_matches_an_uninterrupted_run(shards, tmp_path):
    # Dropout on (0.5) and two accumulation steps, so RNG and loader state both matter.
    common = ["train.max_steps=12", "train.checkpoint_every=4", "train.eval_every=4", "model.dropout=0.5",
              "train.micro_batch_size=2", "train.resume=auto"]
    straight = _start(tiny_run(shards, tmp_path / "straight", *common))
    killed = _start(tiny_run(shards, tmp_path / "killed", *common))
    log = _signal_after(killed, "checkpoint step 4:", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, log[-2000:]
    interrupted_at = _state(tmp_path / "killed")["step"]
    assert interrupted_at in (4, 8), f"the run finished before SIGKILL arrived:\n{log[-2000:]}"

    resumed = _start(tiny_run(shards, tmp_path / "killed", *common))
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {tmp_path / 'killed' / 'checkpoints' / 'last.pt'} at step {interrupted_at}" in err
    assert straight.wait(timeout=240) == 0, straight.stderr.read()[-3000:]

    a, b = _state(tmp_path / "straight"), _state(tmp_path / "killed")
    assert a["step"] == b["step"] == 12
    for name, tensor in a["model"].items():  # bit for bit: same batches, masks and update order
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after resume"
    assert a["metrics"]["top1"] == b["metrics"]["top1"] and a["metrics"]["loss"] == b["metrics"]["loss"]
    # metrics.jsonl holds each step once: what the killed attempt logged after its checkpoint is dropped.
    lines = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["split"] == "train"] == list(range(1, 13))


def test_sigterm_finishes_the_step_checkpoints_and_exits_with_the_requeue_code(shards, tmp_path):
    # As SLURM does on preemption, the signal goes to every process of the job, loader workers
    # included: they must outlive it until the trainer has written its checkpoint.
    run_dir = tmp_path / "run"
    proc = _start(tiny_run(shards, run_dir, "train.max_steps=100000", "train.checkpoint_every=1000",
                           "train.eval_every=1000", "train.num_workers=2"))
    log = _signal_after(proc, "step 2/100000", signal.SIGTERM, group=True)
    assert proc.returncode == REQUEUE_EXIT_CODE == 3, log[-2000:]
    state = _state(run_dir)
    assert 2 <= state["step"] < 100000
    assert f"stopped by SIGTERM after step {state['step']}" in log
    assert (run_dir / "checkpoints" / f"step_{state['step']:07d}.pt").is_file()


def test_two_ranks_with_loader_workers_killed_and_resumed_match_an_uninterrupted_run(shards, tmp_path):
    """The multi-rank form of the test above: 2 gloo ranks, one loader worker each, dropout on; every
    rank's own RNG states must come back (rank 0's on both ranks gives other dropout masks on rank 1)."""
    common = ["train.max_steps=60", "train.checkpoint_every=20", "train.eval_every=20", "model.dropout=0.5",
              "train.resume=auto", "train.num_workers=1", "train.global_batch_size=8", "train.log_every=20"]

    def start(run_dir):
        return subprocess.Popen(train_cmd(tiny_run(shards, run_dir, *common), nproc=2), cwd=REPO, env=subprocess_env(),
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    straight, killed = start(tmp_path / "straight"), start(tmp_path / "killed")
    # torchrun passes the ranks' log on in bursts: watch for the checkpoint file itself
    first = tmp_path / "killed" / "checkpoints" / "step_0000020.pt"
    while not first.exists() and killed.poll() is None:
        time.sleep(0.01)
    _kill_tree(killed.pid)  # torchrun, its ranks (in sessions of their own) and their loader workers
    log = killed.communicate(timeout=60)[1]
    interrupted_at = _state(tmp_path / "killed")["step"]
    assert interrupted_at in (20, 40), f"the run finished before SIGKILL arrived:\n{log[-2000:]}"
    assert len(_state(tmp_path / "killed")["rng"]) == 2  # one RNG state per rank

    resumed = start(tmp_path / "killed")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"at step {interrupted_at}" in err
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-3000:]
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "killed")
    assert a["step"] == b["step"] == 60
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after a 2-rank resume"
