"""A real 2-process torchrun run (gloo on CPU) on tiny shards, checked for everything a run
leaves behind; `pipeline.evaluate` under torchrun on its checkpoint; bad input through the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import load_config, to_dict
from pipeline.train import main
from shard_fixtures import write_tiny_cub_shards
from test_train_helpers import explain, run_cli, tiny_run

MAX_STEPS = 6



@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_cub_shards(tmp_path_factory.mktemp("cub"))


@pytest.fixture(scope="module")
def ddp_run(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    overrides = tiny_run(shards, run_dir, f"train.max_steps={MAX_STEPS}", "train.eval_every=3",
                         "train.checkpoint_every=2", "train.keep_checkpoints=2")
    result = run_cli(overrides, nproc=2)
    assert result.returncode == 0, explain(result)
    return run_dir, overrides, result


def _lines(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rank_run_trains_evaluates_and_writes_its_run_dir(ddp_run, shards):
    run_dir, overrides, result = ddp_run
    lines = _lines(run_dir)
    setup = [l for l in lines if l["split"] == "setup"]
    assert setup and setup[0]["world_size"] == 2 and setup[0]["micro_batch_size"] == 2
    assert setup[0]["accumulation_steps"] == 1
    assert "2 ranks x micro batch 2 x 1 accumulation" in result.stderr
    train = [l for l in lines if l["split"] == "train"]
    assert [l["step"] for l in train] == list(range(1, MAX_STEPS + 1))  # rank 0 only writes
    assert all(l["loss"] > 0 and l["images_per_s"] > 0 for l in train)
    assert train[0]["lr/localisation"] == pytest.approx(train[0]["lr/streams"] * 1e-4)
    evals = [l for l in lines if l["split"] == "test"]
    assert [l["step"] for l in evals] == [3, 6]
    num_test = json.loads((shards / "manifest.json").read_text())["splits"]["test"]["num_samples"]
    assert all(l["num_samples"] == num_test for l in evals)
    assert all(l["top1"] * num_test == pytest.approx(round(l["top1"] * num_test)) for l in evals)  # correct / all

    # The resolved config reads back as the config the run was given, its null normalisation resolved.
    from pipeline.models.normalisation import resolve_normalisation
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    given = load_config(None, overrides)
    resolve_normalisation(given)
    assert saved == to_dict(given)

    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpts = run_dir / "checkpoints"
    periodic = sorted(p.name for p in ckpts.glob("step_*.pt"))
    assert periodic == ["step_0000004.pt", "step_0000006.pt"]  # keep_checkpoints=2
    last = torch.load(ckpts / "last.pt", weights_only=True)
    assert last["step"] == MAX_STEPS and last["images_seen"] == MAX_STEPS * 4
    assert len(last["rng"]) == 2 and last["config"]["run"]["dir"] == str(run_dir)
    assert last["metrics"]["num_samples"] == num_test
    best = torch.load(ckpts / "best.pt", weights_only=True)
    assert best["best_metric"] == max(l["top1"] for l in evals)
    assert best["metrics"]["top1"] == best["best_metric"]

    for step in (3, 6):  # K=2 images, each with N=2 crops beside it
        picture = Image.open(run_dir / "viz" / f"step_{step:07d}.png")
        assert picture.width > 64 + 2 * 32 and picture.height >= 2 * 64


@pytest.mark.slow
@pytest.mark.multiprocess
def test_evaluate_cli_under_torchrun_reproduces_the_checkpoint_metrics(ddp_run):
    run_dir, _, _ = ddp_run
    best = run_dir / "checkpoints" / "best.pt"
    result = run_cli(["--checkpoint", str(best), "--split", "test", "--json"], nproc=2, module="pipeline.evaluate")
    assert result.returncode == 0, explain(result)
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # rank 0 only
    stored = torch.load(best, weights_only=True)
    assert printed[0]["num_samples"] == stored["metrics"]["num_samples"]
    assert printed[0]["top1"] == pytest.approx(stored["metrics"]["top1"])
    # every rank evaluates rank 0's batch-norm statistics, the ones the checkpoint keeps
    assert printed[0]["loss"] == pytest.approx(stored["metrics"]["loss"], rel=1e-6)
    assert printed[0]["step"] == stored["step"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rank_run_resumes_from_last_and_extends_to_new_max_steps(ddp_run, tmp_path):
    run_dir, overrides, _ = ddp_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    moved = [o for o in overrides if not o.startswith(("run.dir=", "train.max_steps="))]
    result = run_cli([*moved, f"run.dir={copy}", "train.max_steps=8", "train.resume=auto"], nproc=2)
    assert result.returncode == 0, explain(result)
    assert f"resumed from {copy / 'checkpoints' / 'last.pt'} at step {MAX_STEPS}" in result.stderr
    last = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 8 and last["images_seen"] == 8 * 4 and len(last["rng"]) == 2
    steps = [l["step"] for l in _lines(copy) if l["split"] == "train"]
    assert steps == list(range(1, 9))


def test_global_batch_not_divisible_by_the_world_size_fails_before_the_rendezvous(shards, tmp_path, monkeypatch,
                                                                                   capsys):
    # What torchrun sets for rank 0 of 2; no other rank exists, so reaching the rendezvous would hang.
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "9"}.items():
        monkeypatch.setenv(key, value)
    assert main(tiny_run(shards, tmp_path / "run", "train.global_batch_size=5", "train.max_steps=1")) == 2
    assert _error_line(capsys) == "error: train.global_batch_size=5 is not divisible by the world size 2"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    return err[-1]


def test_missing_shards_are_a_one_line_error(shards, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "train-000001.tar").unlink()
    assert main(tiny_run(broken, tmp_path / "run", "train.max_steps=1")) == 2
    line = _error_line(capsys)
    assert line.startswith("error: ") and "train-000001.tar" in line and "missing" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_root_is_a_one_line_error(tmp_path, capsys):
    assert main(tiny_run(tmp_path / "nowhere", tmp_path / "run", "train.max_steps=1")) == 2
    line = _error_line(capsys)
    assert line.startswith("error: ") and str(tmp_path / "nowhere") in line


def test_manifest_not_matching_its_shards_is_a_one_line_error(shards, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    with open(broken / "test-000000.tar", "ab") as f:  # a shard that is not the one data_prep wrote
        f.write(b"\0" * 512)
    assert main(tiny_run(broken, tmp_path / "run", "train.max_steps=1")) == 2
    line = _error_line(capsys)
    assert line.startswith("error: ") and "test-000000.tar" in line and "manifest" in line


def test_micro_batch_not_dividing_the_rank_batch_is_a_one_line_error(shards, tmp_path, capsys):
    assert main(tiny_run(shards, tmp_path / "run", "train.global_batch_size=6",
                         "train.micro_batch_size=4")) == 2
    assert "train.micro_batch_size=4" in _error_line(capsys)


def test_classifier_smaller_than_the_label_set_is_a_one_line_error(shards, tmp_path, capsys):
    assert main(tiny_run(shards, tmp_path / "run", "model.num_classes=2", "train.max_steps=1")) == 2
    line = _error_line(capsys)
    assert line.startswith("error: ") and "manifest.json" in line and "model.num_classes=2" in line


def test_unknown_config_key_is_a_one_line_error(shards, tmp_path, capsys):
    assert main(tiny_run(shards, tmp_path / "run", "train.max_stepz=3")) == 2
    assert "train.max_stepz" in _error_line(capsys)


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path, capsys):
    # lr 1e30 blows the weights up in step 1, so step 2's loss is not finite.
    run_dir = tmp_path / "run"
    assert main(tiny_run(shards, run_dir, "optim.lr=1e30", "train.max_steps=5", "train.checkpoint_every=1",
                         "train.eval_every=100")) == 1
    line = _error_line(capsys)
    assert line.startswith("error: non-finite loss") and "at step 2;" in line and "last.pt is kept" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt", "step_0000001.pt"]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
    steps = [l["step"] for l in _lines(run_dir) if l["split"] == "train"]
    assert steps == [1]  # nothing was logged for the bad step either


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rank_checkpoint_resumes_on_one_rank_reproducibly(ddp_run, tmp_path):
    """A job preempted on 2 GPUs and restarted on 1: same global batch, fresh but seeded streams."""
    run_dir, overrides, _ = ddp_run
    moved = [o for o in overrides if not o.startswith(("run.dir=", "train.max_steps="))]
    weights = []
    for name in ("a", "b"):
        copy = tmp_path / name
        shutil.copytree(run_dir, copy)
        result = run_cli([*moved, f"run.dir={copy}", "train.max_steps=8", "train.resume=auto"], nproc=1)
        assert result.returncode == 0, explain(result)
        assert f"resumed from {copy / 'checkpoints' / 'last.pt'} at step {MAX_STEPS}" in result.stderr
        last = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
        assert last["step"] == 8 and last["images_seen"] == 8 * 4 and len(last["rng"]) == 1
        setup = [l for l in _lines(copy) if l["split"] == "setup"]
        assert [s["world_size"] for s in setup] == [2, 1] and setup[-1]["micro_batch_size"] == 4
        assert [l["step"] for l in _lines(copy) if l["split"] == "train"] == list(range(1, 9))
        weights.append(last["model"])
    before = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(weights[0][k], before[k]) for k in before)  # it trained on
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the same way twice


def test_finite_difference_windows_train_through_the_trainer(shards, tmp_path):
    """The trainer hands the targets to a model that estimates its window gradient from the loss,
    and holds the localisation net back until optim.lr_start: its head is still at zero init at
    step 2 and has moved by step 4."""
    common = ["model.extra.window_gradient=finite_difference", "optim.lr_start.localisation=2",
              "train.eval_every=2", "train.checkpoint_every=2", "train.num_viz=0"]
    assert main(tiny_run(shards, tmp_path / "run", "train.max_steps=4", *common)) == 0
    heads = [torch.load(tmp_path / "run" / "checkpoints" / f"step_{s:07d}.pt", map_location="cpu",
                        weights_only=True)["model"]["transformer.head.weight"] for s in (2, 4)]
    assert heads[0].abs().sum() == 0 and heads[1].abs().sum() > 0


def test_finite_difference_windows_refuse_fp16(shards, tmp_path, capsys, monkeypatch):
    # fp16 (with its loss scaler) exists on CUDA only; stand it in on CPU where the precision is resolved
    import pipeline.train.trainer as trainer
    monkeypatch.setattr(trainer, "resolve_precision", lambda *args: "fp16")
    assert main(tiny_run(shards, tmp_path / "run", "train.max_steps=1", "train.precision=fp16",
                         "model.extra.window_gradient=finite_difference")) == 2
    line = _error_line(capsys)
    assert "window_gradient=finite_difference" in line and "fp16" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_data_distortion_must_match_what_the_shards_hold(shards, tmp_path, capsys):
    from data_prep.digits import DigitsOptions, prepare, write_synthetic_idx

    # CUB-style shards hold no undistorted digits to distort
    assert main(tiny_run(shards, tmp_path / "run", "train.max_steps=1", "data.distortion=RTS")) == 2
    line = _error_line(capsys)
    assert line.startswith("error: data.distortion=RTS") and "--fresh-train" in line
    idx = write_synthetic_idx(tmp_path / "idx", num_train=16, num_test=8)
    prepare(DigitsOptions(idx_root=str(idx), out=str(tmp_path / "rts"), distortion="RTS", fresh_train=True))
    digits = ["--config", "configs/digits/st_cnn.yaml", f"data.root={tmp_path / 'rts'}", f"run.dir={tmp_path / 'd'}",
              "train.max_steps=2", "train.global_batch_size=8", "train.eval_every=2", "train.checkpoint_every=2"]
    assert main(digits + ["data.distortion=TC"]) == 2  # the shards were written for RTS
    line = _error_line(capsys)
    assert "stored undistorted" in line and "data.distortion=RTS" in line and "manifest.json" in line
    assert main(digits + ["data.distortion=null"]) == 2
    assert main(digits) == 0  # RTS: each batch distorted afresh to the 42 px the model takes
    assert (tmp_path / "d" / "checkpoints" / "last.pt").is_file()


def test_a_run_dir_holding_a_run_is_refused_unless_resumed_or_overwritten(shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(tiny_run(shards, run_dir, "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2")) == 0
    first = (run_dir / "metrics.jsonl").read_text()
    best = (run_dir / "checkpoints" / "best.pt").read_bytes()
    # the same command again: refused in one line, and nothing of the first run is touched
    assert main(tiny_run(shards, run_dir, "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2")) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: run.dir={run_dir} already holds a run") and "train.resume=auto" in line
    assert (run_dir / "metrics.jsonl").read_text() == first
    assert (run_dir / "checkpoints" / "best.pt").read_bytes() == best
    # resume continues it; run.overwrite=true replaces it
    assert main(tiny_run(shards, run_dir, "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2",
                         "train.resume=auto")) == 0
    assert main(tiny_run(shards, run_dir, "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                         "run.overwrite=true")) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "setup"] == [0]  # only the new run's lines
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == ["step_0000002.pt"]


def test_a_config_error_comes_before_torch_is_imported():
    """`python -m pipeline.train` reports a bad key without importing torch (about a second, not ten)."""
    import subprocess

    from conftest import PYTHON, REPO, subprocess_env

    probe = ("import runpy, sys\nsys.argv = ['pipeline.train', '--config', 'configs/digits/cnn.yaml', 'bad.key=1']\n"
             "try:\n    runpy.run_module('pipeline.train', run_name='__main__')\nexcept SystemExit as stop:\n"
             "    print(stop.code, 'torch' in sys.modules)")
    run = subprocess.run([PYTHON, "-c", probe], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr[-2000:]
    assert run.stderr.strip() == ("error: override: unknown key 'bad'; valid keys of 'top level': data, model, optim, "
                                  "run, schedule, train")
