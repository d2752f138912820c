"""The job scripts and jobs/submit without a cluster: shellcheck, the printed sbatch commands,
the env file's precedence, and pre-flight checks that stop bad input before anything is queued.

A fake `sbatch` on PATH records what it was asked to submit, so the tests can tell "refused
before asking for resources" from "submitted".
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, need_program, subprocess_env
from pipeline.data.manifest import read_manifest
from shard_fixtures import write_tiny_cub_shards

JOB_SCRIPTS = ["jobs/slurm/train.sbatch", "jobs/slurm/prep.sbatch", "jobs/slurm/sweep.sbatch",
               "jobs/local/train.sh", "jobs/common.sh", "jobs/cluster.env.example"]
SUBMIT = str(REPO / "jobs" / "submit")
SHELL_SCRIPTS = [*JOB_SCRIPTS, "benchmarks/gpu_all.sh"]  # shellcheck covers the benchmark script too


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_cub_shards(tmp_path_factory.mktemp("shards") / "cub")


@pytest.fixture
def fake_sbatch(tmp_path) -> Path:
    """A `sbatch` that appends its arguments (one JSON list per call) to calls.jsonl and prints an id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sbatch"
    script.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                      "calls = os.path.join(os.path.dirname(__file__), 'calls.jsonl')\n"
                      "n = sum(1 for _ in open(calls)) if os.path.exists(calls) else 0\n"
                      "open(calls, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                      "print(4242 + n)\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def calls(bin_dir: Path) -> list:
    path = bin_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_submit(args, tmp_path, bin_dir=None, env_file=None, **env):
    environ = subprocess_env(**env)
    environ["CLUSTER_ENV"] = str(env_file) if env_file else os.devnull
    if bin_dir is not None:
        environ["PATH"] = f"{bin_dir}{os.pathsep}{environ['PATH']}"
    return subprocess.run([SUBMIT, *map(str, args)], env=environ, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def write_config(folder: Path, **sections) -> Path:
    path = folder / "exp.yaml"
    path.write_text(json.dumps(sections))  # JSON is YAML
    return path


def test_shellcheck_passes_on_every_job_script():
    shellcheck = need_program("shellcheck")
    res = subprocess.run([shellcheck, "-x", "--severity=style", *SHELL_SCRIPTS], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", [s for s in JOB_SCRIPTS if s != "jobs/common.sh"] + ["jobs/submit"])
def test_each_job_script_starts_with_the_command_that_runs_it(script):
    text = (REPO / script).read_text()
    head = "\n".join(text.splitlines()[:4])
    assert Path(script).name in head, f"{script} should open with a comment giving its command"
    assert "/home/" not in text and "/Users/" not in text  # no one's home directory baked in


def test_dry_run_prints_the_sbatch_command_from_options_and_env_file(tmp_path, shards, fake_sbatch):
    config = write_config(tmp_path, model={"name": "nxst_cnn"}, data={"root": str(shards)},
                          train={"global_batch_size": 64})
    env_file = tmp_path / "cluster.env"
    env_file.write_text("SBATCH_PARTITION=gpu-long\nSBATCH_ACCOUNT=proj-$PROJECT_NAME\nCPUS_PER_GPU=6\n"
                        "TIME_LIMIT=12:00:00\nLOG_DIR=/scratch/logs\n")
    res = run_submit(["train", config, "optim.lr=0.02", "--nodes", "2", "--gpus-per-node", "4", "--dry-run",
                      "--account", "override-acct"], tmp_path, fake_sbatch, env_file, PROJECT_NAME="stn")
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.strip().split()
    assert cmd[:2] == ["sbatch", "--parsable"]
    for option in ["--nodes=2", "--gpus-per-node=4", "--cpus-per-task=24", "--time=12:00:00",
                   "--partition=gpu-long", "--account=override-acct", f"--chdir={REPO}",
                   "--output=/scratch/logs/%x-%j.out", "--export=ALL,NPROC_PER_NODE=4"]:
        assert option in cmd, option
    # run from elsewhere than the repository: the printed command works from there too
    assert cmd[-3:] == [str(REPO / "jobs/slurm/train.sbatch"), str(config), "optim.lr=0.02"]
    assert calls(fake_sbatch) == []  # a dry run submits nothing

    # the environment wins over the env file; $VAR in the file expands
    res = run_submit(["train", config, "--dry-run"], tmp_path, fake_sbatch, env_file, PROJECT_NAME="stn",
                     SBATCH_PARTITION="debug", GPUS_PER_NODE="2")
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.split()
    assert "--partition=debug" in cmd and "--account=proj-stn" in cmd and "--gpus-per-node=2" in cmd


def test_submit_cpu_job_passes_worker_count_and_returns_the_job_id(tmp_path, shards, fake_sbatch):
    config = write_config(tmp_path, data={"root": str(shards)}, train={"global_batch_size": 8})
    # the config named relative to the caller's folder (tmp_path), as a user in their own folder would
    res = run_submit(["train", config.name, "train.max_steps=3", "--gpus-per-node", "0", "--cpu-workers", "2",
                      "--log-dir", tmp_path / "logs"], tmp_path, fake_sbatch)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["4242"]
    (call,) = calls(fake_sbatch)
    assert "--export=ALL,NPROC_PER_NODE=2" in call and "--cpus-per-task=2" in call
    assert not any(arg.startswith("--gpus") for arg in call)
    assert call[-2:] == [str(config), "train.max_steps=3"]
    assert (tmp_path / "logs").is_dir()  # sbatch does not create the log folder itself


@pytest.mark.parametrize("case, expected", [
    ("missing_config", "config file not found"),
    ("missing_data_root", "folder not found"),
    ("no_data_root", "data.root is not set"),
    ("no_manifest", "no manifest.json"),
    ("shard_resized", "bytes but the manifest says"),  # the trainer's own manifest check, before the queue
    ("unknown_key", "unknown key 'optim.lr_typo'"),
    ("indivisible_batch", "not divisible by the world size 12"),
])
def test_bad_input_is_refused_before_sbatch(case, expected, tmp_path, shards, fake_sbatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    resized = tmp_path / "resized"
    shutil.copytree(shards, resized)
    with open(next(resized.glob("train-*.tar")), "ab") as shard:
        shard.write(b"\0" * 512)
    root = {"missing_data_root": tmp_path / "nowhere", "no_data_root": None, "no_manifest": empty,
            "shard_resized": resized}.get(case, shards)
    config = write_config(tmp_path, data={"root": str(root) if root else None}, train={"global_batch_size": 64})
    args = {"missing_config": [tmp_path / "missing.yaml"], "unknown_key": [config, "optim.lr_typo=1"],
            "indivisible_batch": [config, "--nodes", "3", "--gpus-per-node", "4"]}.get(case, [config])
    res = run_submit(["train", *args], tmp_path, fake_sbatch)
    assert res.returncode == 2
    assert res.stderr.splitlines()[0].startswith("error: ") and expected in res.stderr.splitlines()[0], res.stderr
    assert "nothing submitted" in res.stderr
    assert calls(fake_sbatch) == []


def test_preflight_reads_the_manifest_without_importing_torch(shards):
    code = ("import sys; sys.path.insert(0, 'jobs'); import preflight; "
            f"n = preflight.check_data_root({str(shards)!r}, ['train', 'test']); "
            "print(n, 'torch' in sys.modules)")
    res = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, env=subprocess_env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(read_manifest(shards).num_samples("train")), "False"]


def test_prep_submits_array_then_dependent_finalising_job(tmp_path, fake_sbatch):
    raw = tmp_path / "CUB_200_2011"  # the pre-flight check only looks for the folder
    raw.mkdir()
    res = run_submit(["prep", "cub", "--root", raw, "--out", tmp_path / "out", "--classes", "1", "--array", "3",
                      "--log-dir", tmp_path / "logs"], tmp_path, fake_sbatch)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["4242", "4243"]
    shard_call, final_call = calls(fake_sbatch)
    assert "--array=0-2" in shard_call
    assert shard_call[-8:] == [str(REPO / "jobs/slurm/prep.sbatch"), "cub", "--root", str(raw), "--out", str(tmp_path / "out"),
                               "--classes", "1"]
    assert "--dependency=afterok:4242" in final_call
    assert final_call[final_call.index(str(REPO / "jobs/slurm/prep.sbatch")) + 1] == "--finalize"

    dry = run_submit(["prep", "cub", "--root", raw, "--out", tmp_path / "out", "--array", "3", "--dry-run"],
                     tmp_path, fake_sbatch)
    assert dry.returncode == 0 and len(calls(fake_sbatch)) == 2
    first, second = dry.stdout.strip().splitlines()
    assert first.startswith("array_job=$(sbatch --parsable --array=0-2")
    assert '--dependency=afterok:"$array_job"' in second


def test_prep_with_missing_raw_root_is_refused(tmp_path, fake_sbatch):
    res = run_submit(["prep", "cub", "--root", tmp_path / "no-such-root", "--out", tmp_path / "out"], tmp_path,
                     fake_sbatch)
    assert res.returncode == 2 and "raw dataset folder not found" in res.stderr
    assert calls(fake_sbatch) == []


def test_sweep_preflight_checks_the_sweep_file_and_its_data(tmp_path, shards, fake_sbatch):
    sweep = REPO / "configs" / "sweeps" / "tiny_cpu.yaml"
    ok = run_submit(["sweep", sweep, f"data.root={shards}", "--dry-run"], tmp_path, fake_sbatch)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[-2:] == [str(sweep), f"data.root={shards}"]
    bad = run_submit(["sweep", sweep, f"data.root={tmp_path / 'nowhere'}"], tmp_path, fake_sbatch)
    assert bad.returncode == 2 and "folder not found" in bad.stderr
    missing = run_submit(["sweep", tmp_path / "nope.yaml"], tmp_path, fake_sbatch)
    assert missing.returncode == 2 and "sweep file not found" in missing.stderr
    assert calls(fake_sbatch) == []


def test_local_launcher_preflights_before_torchrun(tmp_path, shards):
    """jobs/local/train.sh refuses a bad data root itself (no torchrun process is started)."""
    config = write_config(tmp_path, data={"root": str(tmp_path / "nowhere")})
    env = subprocess_env(CLUSTER_ENV=os.devnull, NGPU="2")
    res = subprocess.run(["bash", str(REPO / "jobs" / "local" / "train.sh"), str(config)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: data.root={tmp_path / 'nowhere'}: folder not found"]


def test_srun_launcher_asks_for_one_task_per_gpu(tmp_path, shards, fake_sbatch):
    config = write_config(tmp_path, data={"root": str(shards)}, train={"global_batch_size": 64})
    res = run_submit(["train", config, "--nodes", "2", "--gpus-per-node", "4", "--launcher", "srun", "--dry-run"],
                     tmp_path, fake_sbatch, CPUS_PER_GPU="6")
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.split()
    # each rank is a SLURM task with its own CPUs (not the whole node's share, as under torchrun)
    for option in ["--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=6",
                   "--export=ALL,NPROC_PER_NODE=4,LAUNCHER=srun"]:
        assert option in cmd, (option, cmd)
