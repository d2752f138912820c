"""Sweep files: validation before any trial starts, overrides, the search space, the trial table.

Fast: no Ray cluster starts here (the CLI's bad-file tests prove that by finishing in well under
Ray's start-up time and leaving no experiment folder behind).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, REPO, subprocess_env
from pipeline.config import load_config
from pipeline.tune import SweepError, format_override, load_sweep
from pipeline.tune.__main__ import main
from pipeline.tune.runner import _status, best_row, markdown_table
from pipeline.tune.sweep import num_grid_points, scheduler_options
from pipeline.tune.trial import _pick_resume, trial_overrides

SWEEPS = REPO / "configs" / "sweeps"


def _write(tmp_path: Path, **values) -> Path:
    sweep = {"space": {"optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-1}},
             "storage_path": str(tmp_path / "runs"), **values}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize("name", ["cub_st2_448.yaml", "svhn.yaml", "tiny_cpu.yaml"])
def test_shipped_sweeps_validate_and_start_with_their_command(name):
    path = SWEEPS / name
    assert path.read_text().startswith(f"# python -m pipeline.tune --config configs/sweeps/{name}")
    sweep = load_sweep(path, ["data.root=/data/somewhere"])
    assert sweep.space and sweep.name == path.stem


BAD_FILES = [
    ({"space": {"optim.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}}, "space key 'optim.lrr' is not a config key"),
    ({"space": {"model.nope": {"type": "choice", "values": [1, 2]}}}, "space key 'model.nope' is not a config key"),
    ({"space": {}}, "'space' is empty"),
    ({"scheduler": {"name": "hyperband"}}, "scheduler.name='hyperband' is not one of asha, median, none"),
    ({"search": {"name": "bayes"}}, "search.name='bayes' is not one of random, grid, optuna"),
    ({"scheduler": {"name": "asha", "grace": 3}}, "unknown key 'scheduler.grace'"),
    ({"num_trial": 3}, "unknown key 'num_trial'"),
    ({"resources": {"gpus": 1}}, "unknown key 'resources.gpus'"),
    ({"mode": "maximise"}, "mode='maximise' is not one of max, min"),
    ({"space": {"optim.lr": {"type": "normal", "low": 0, "high": 1}}}, "space.optim.lr.type='normal'"),
    ({"space": {"optim.lr": {"type": "loguniform", "low": 0, "high": 1}}}, "loguniform needs low > 0"),
    ({"space": {"model.dropout": {"type": "uniform", "low": 0.5, "high": 1.5}}}, "model.dropout=1.5 must be in [0, 1)"),
    ({"space": {"optim.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "search": {"name": "grid"}},
     "search.name=grid needs every space entry to be of type grid or choice"),
    ({"base": "configs/does/not/exist.yaml"}, "config file not found"),
]


@pytest.mark.parametrize("values,message", BAD_FILES, ids=[m[:40] for _, m in BAD_FILES])
def test_bad_sweep_files_fail_with_one_line_naming_the_key(tmp_path, values, message):
    path = _write(tmp_path, **values)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(path) in str(err.value) or "config file not found" in str(err.value)


def test_cli_rejects_a_bad_sweep_before_any_trial_starts(tmp_path, capsys):
    path = _write(tmp_path, space={"model.not_a_key": {"type": "choice", "values": [1]}})
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "model.not_a_key" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # no experiment folder, so no trial, was created


def test_cli_resume_with_nothing_to_resume_fails_before_ray_starts(tmp_path, capsys):
    from shard_fixtures import write_tiny_cub_shards

    path = _write(tmp_path)
    data = write_tiny_cub_shards(tmp_path / "cub")
    assert main(["--config", str(path), "--resume", f"data.root={data}"]) == 2
    assert "--resume: no sweep to resume in" in capsys.readouterr().err


def test_cli_checks_the_trials_data_before_ray_starts(tmp_path, capsys):
    from shard_fixtures import write_tiny_cub_shards

    sweep = SWEEPS / "tiny_cpu.yaml"
    assert main(["--config", str(sweep), "--check", f"data.root={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.root") and "nowhere" in err[0]
    data = write_tiny_cub_shards(tmp_path / "cub")
    (data / "train-000000.tar").unlink()  # a trial would fail on the missing shard
    assert main(["--config", str(sweep), "--check", f"data.root={data}"]) == 2
    assert "train-000000.tar" in capsys.readouterr().err
    data = write_tiny_cub_shards(tmp_path / "cub2")
    assert main(["--config", str(sweep), "--check", f"data.root={data}"]) == 0


def test_cli_subprocess_bad_scheduler_exits_2_without_ray(tmp_path):
    path = _write(tmp_path, scheduler="pbt")
    run = subprocess.run([PYTHON, "-m", "pipeline.tune", "--config", str(path)], cwd=REPO,
                         env=subprocess_env(RAY_ADDRESS=""), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "scheduler.name='pbt'" in run.stderr
    # one error line and nothing else: Ray, which logs its start to stderr, never started
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and run.stderr.startswith("error: ")
    assert run.stdout == "" and not (tmp_path / "runs").exists()


def test_cli_overrides_split_between_sweep_keys_and_trial_config(tmp_path):
    path = _write(tmp_path, overrides=["train.max_steps=40"])
    sweep = load_sweep(path, ["num_trials=3", "scheduler.grace_period=7", "optim.weight_decay=0.001",
                              "resources.workers=2"])
    assert sweep.num_trials == 3 and sweep.resources.workers == 2
    assert sweep.scheduler == {"name": "asha", "grace_period": 7}
    assert sweep.overrides == ["train.max_steps=40", "optim.weight_decay=0.001"]
    assert sweep.base_config().optim.weight_decay == 0.001
    options = scheduler_options(sweep)
    # max_t one past the last step: a trial that trains to the end finishes on its own.
    assert options["grace_period"] == 7 and options["max_t"] == 41


def test_a_space_key_fixed_in_overrides_too_is_refused(tmp_path):
    path = _write(tmp_path, overrides=["optim.lr=0.1"])
    with pytest.raises(SweepError, match="also fixed in 'overrides'"):
        load_sweep(path)


@pytest.mark.parametrize("value", [1e-07, 3.0e-3, 0.5, 4, "tps", True, None, [0.1, 0.2]])
def test_format_override_round_trips_through_the_config_parser(value):
    from pipeline.config import _parse_overrides
    assert _parse_overrides([format_override("a.b", value)]) == {"a": {"b": value}}


def test_sampled_values_become_a_validated_trial_config():
    params = {"optim.lr": 1e-07, "model.transform": "attention", "optim.lr_scale.localisation": 1e-4}
    cfg = load_config(None, trial_overrides(params))
    assert cfg.optim.lr == 1e-07 and isinstance(cfg.optim.lr, float)
    assert cfg.model.transform == "attention" and cfg.optim.lr_scale == {"localisation": 1e-4}


def test_grid_points_and_choice_as_grid(tmp_path):
    space = {"optim.lr": {"type": "grid", "values": [0.1, 0.01]},
             "model.num_streams": {"type": "choice", "values": [1, 2, 4]}}
    assert num_grid_points(load_sweep(_write(tmp_path, space=space))) == 2
    assert num_grid_points(load_sweep(_write(tmp_path, space=space, search={"name": "grid"}))) == 6


def test_param_space_uses_rays_domains(tmp_path):
    from ray import tune
    from pipeline.tune.runner import param_space
    space = {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
             "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
             "train.seed": {"type": "randint", "low": 0, "high": 10},
             "model.num_streams": {"type": "choice", "values": [1, 2]},
             "model.transform": {"type": "grid", "values": ["affine", "attention"]}}
    ps = param_space(load_sweep(_write(tmp_path, space=space)))
    assert isinstance(ps["optim.lr"], tune.search.sample.Float) and ps["optim.lr"].lower == 1e-4
    assert isinstance(ps["train.seed"], tune.search.sample.Integer) and ps["train.seed"].upper == 10
    assert ps["model.transform"] == {"grid_search": ["affine", "attention"]}
    assert isinstance(ps["model.num_streams"], tune.search.sample.Categorical)


def test_best_row_prefers_trials_that_trained_to_the_end():
    rows = [{"trial": "a", "loss": 0.1, "status": "early-stopped", "step": 2},
            {"trial": "b", "loss": 0.5, "status": "finished", "step": 8},
            {"trial": "c", "loss": 0.3, "status": "finished", "step": 8},
            {"trial": "d", "loss": None, "status": "error", "step": None}]
    assert best_row(rows, "loss", "min")["trial"] == "c"
    assert best_row(rows, "loss", "max")["trial"] == "b"
    assert best_row(rows[:1], "loss", "min")["trial"] == "a"
    table = markdown_table([{**r, "error": ""} for r in rows])
    assert table.count("\n") == 5 and "early-stopped" in table


def test_resume_takes_the_newer_of_rays_checkpoint_and_the_trainers_last(tmp_path):
    ray_dir, run_dir = tmp_path / "ray_ckpt", tmp_path / "run"
    assert _pick_resume(None, run_dir) == (None, "none")
    (run_dir / "checkpoints").mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(b"x")
    assert _pick_resume(None, run_dir) == (last, "run_dir")
    ray_dir.mkdir()
    ray_file = ray_dir / "step_0000004.pt"
    ray_file.write_bytes(b"x")
    os.utime(last, (1000, 1000))
    assert _pick_resume(str(ray_dir), run_dir) == (ray_file, "ray")
    os.utime(ray_file, (500, 500))  # the driver died before Tune recorded the trainer's newest
    assert _pick_resume(str(ray_dir), run_dir) == (last, "run_dir")
    assert _pick_resume(str(ray_dir), tmp_path / "elsewhere") == (ray_file, "ray")


@pytest.mark.parametrize("tune_status,error,step,expected", [
    ("TERMINATED", None, 8, "finished"), ("TERMINATED", None, 4, "early-stopped"),
    ("ERROR", None, 4, "error"), (None, "boom", None, "error"), ("RUNNING", None, 4, "interrupted"),
    ("PENDING", None, None, "not started"), (None, None, 8, "finished")])
def test_trial_status_tells_early_stopped_from_interrupted(tune_status, error, step, expected):
    assert _status(tune_status, error, step, max_steps=8) == expected


@pytest.mark.parametrize("scheduler, kind, grace", [
    ({"name": "asha"}, "AsyncHyperBandScheduler", None),
    ({"name": "median"}, "MedianStoppingRule", "eval_every"),
    ({"name": "median", "grace_period": 3, "min_samples_required": 2}, "MedianStoppingRule", 3),
    ({"name": "none"}, "FIFOScheduler", None),
])
def test_each_scheduler_is_built_with_the_trainer_step_as_its_clock(tmp_path, scheduler, kind, grace):
    """The sweep file's scheduler options reach Ray's scheduler under Ray's own argument names."""
    from pipeline.tune.runner import _scheduler

    sweep = load_sweep(_write(tmp_path, scheduler=scheduler, overrides=["train.eval_every=25"]))
    built = _scheduler(sweep)
    assert type(built).__name__ == kind
    if kind != "FIFOScheduler":
        assert built._time_attr == "step"  # survives resumes, unlike training_iteration
    if kind == "MedianStoppingRule":
        assert built._grace_period == (25 if grace == "eval_every" else grace)
        assert built._min_samples_required == scheduler.get("min_samples_required", 3)
