"""The SLURM job scripts on a real one-node SLURM cluster (tests/slurm_cluster.py).

Each test submits through `jobs/submit` or `sbatch` as a user would and checks what the job left
behind: shards and manifest, run directory, job state, restart count, job log.
"""
from __future__ import annotations

import csv
import json
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, need, need_program, subprocess_env
from slurm_cluster import SlurmCluster, free_port

pytestmark = [pytest.mark.service, pytest.mark.slow]

CUB_SAMPLE = "cub/CUB_200_2011"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for program in ("slurmctld", "slurmd", "sbatch", "scontrol"):
        need_program(program)
    with SlurmCluster.start(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def job_env(cluster: SlurmCluster, **extra: str) -> dict:
    # No env file from the developer's checkout leaks into the test jobs.
    return cluster.env(subprocess_env(CLUSTER_ENV="/dev/null", **extra))


def submit(cluster: SlurmCluster, args, env: dict) -> list:
    res = subprocess.run([str(REPO / "jobs" / "submit"), *map(str, args)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_trivial_job_completes(cluster):
    job = cluster.sbatch(["--wrap", "echo alive on $(hostname)", f"--output={cluster.root}/trivial-%j.out"])
    assert cluster.wait(job, timeout=60) == "COMPLETED"
    assert "alive on" in (cluster.root / f"trivial-{job}.out").read_text()


def test_prep_array_and_finalising_job_match_single_process_run(cluster, sample_data, tmp_path):
    raw = sample_data / CUB_SAMPLE  # class 1's 60 images are all present in the sample
    options = ["--classes", "1", "--shard-size", "8"]
    reference = tmp_path / "reference"
    res = subprocess.run([PYTHON, "-m", "data_prep", "cub", "--root", str(raw), "--out", str(reference), *options],
                         env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr

    out, logs = tmp_path / "sharded", tmp_path / "logs"
    array_job, final_job = submit(cluster, ["prep", "cub", "--root", raw, "--out", out, *options,
                                            "--array", "3", "--log-dir", logs], job_env(cluster))
    assert cluster.wait(array_job, timeout=120) == "COMPLETED", _logs(logs)
    assert len(cluster.states(array_job)) == 3  # three array tasks, each its own piece
    assert cluster.wait(final_job, timeout=120) == "COMPLETED", _logs(logs)
    assert cluster.job(final_job)["Dependency"] in ("(null)", "")

    verify = subprocess.run([PYTHON, "-m", "data_prep", "verify", str(out)], env=subprocess_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == json.loads((reference / "manifest.json").read_text())
    shards = [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    assert len(shards) >= 6  # enough pieces for three tasks to share
    for name in shards:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    # each task wrote only its own piece and left the manifest to the finalising job
    task_logs = sorted(logs.glob(f"stn-prep-{array_job}_*.out"))
    assert len(task_logs) == 3 and all("piece" in p.read_text() for p in task_logs)
    assert "written and verified" in (logs / f"stn-prep-{final_job}.out").read_text()


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(Path(folder).glob("*.out")))


# A tiny real training run: timm's test_resnet streams (1M parameters) on 64 px images, a handful
# of steps on CPU.
TINY_TRAIN = {
    "model": {"name": "nxst_cnn", "backbone": "test_resnet", "num_streams": 1, "input_size": 64, "crop_size": 32,
              "num_classes": 3, "pretrained": None},
    "data": {"augment": "none", "resize": 72, "shuffle_buffer": 16},
    "optim": {"name": "adamw", "lr": 1e-3},
    "schedule": {"name": "constant"},
    "train": {"global_batch_size": 8, "max_steps": 4, "eval_every": 2, "checkpoint_every": 2, "num_workers": 0,
              "num_viz": 0, "log_every": 1, "device": "cpu", "precision": "fp32"},
}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    from shard_fixtures import write_tiny_cub_shards
    return write_tiny_cub_shards(tmp_path_factory.mktemp("tiny") / "cub", shards_per_split=4)


def tiny_config(folder: Path, shards: Path, run_dir: Path, **train) -> Path:
    values = json.loads(json.dumps(TINY_TRAIN))
    values["data"]["root"] = str(shards)
    values["run"] = {"dir": str(run_dir)}
    values["train"].update(train)
    path = folder / "tiny.yaml"
    path.write_text(json.dumps(values))
    return path


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.multiprocess
def test_train_job_runs_two_node_gloo_ddp_to_completion(cluster, tiny_shards, tmp_path):
    """2 nodes x 1 CPU rank: srun starts a torchrun per node, c10d rendezvous on the first node."""
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    config = tiny_config(tmp_path, tiny_shards, run_dir)
    (job,) = submit(cluster, ["train", config, "--nodes", "2", "--gpus-per-node", "0", "--cpu-workers", "1",
                              "--log-dir", logs], job_env(cluster))
    assert cluster.wait(job, timeout=240) == "COMPLETED", _logs(logs)
    info = cluster.job(job)
    assert info["ExitCode"] == "0:0" and info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    log = (logs / f"stn-train-{job}.out").read_text()
    assert "2 node(s) x 1 worker(s), launcher torchrun, rendezvous 127.0.0.1:" in log
    assert "finished with exit code 0" in log
    rows = metrics(run_dir)
    setup = next(r for r in rows if r["split"] == "setup")
    assert setup["world_size"] == 2 and setup["device"] == "cpu"
    assert max(r["step"] for r in rows if r["split"] == "train") == 4
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == ["step_0000002.pt", "step_0000004.pt"]


def test_train_job_reports_a_missing_data_root_before_starting_ranks(cluster, tmp_path):
    """Plain `sbatch` (no jobs/submit): the job's own pre-flight check fails in seconds, one line."""
    missing = tmp_path / "no-shards"
    config = tiny_config(tmp_path, missing, tmp_path / "run")
    job = cluster.sbatch([f"--output={tmp_path}/%x-%j.out", "--export=ALL,NPROC_PER_NODE=2",
                          "jobs/slurm/train.sbatch", str(config)], env=job_env(cluster), cwd=REPO)
    assert cluster.wait(job, timeout=60) == "FAILED"
    assert cluster.job(job)["ExitCode"] == "2:0"
    log = (tmp_path / f"stn-train-{job}.out").read_text()
    assert log.strip().splitlines() == [f"error: data.root={missing}: folder not found"]
    assert not (tmp_path / "run").exists()  # no rank ever started


def wait_for_step(run_dir: Path, step: int, job: str, cluster: SlurmCluster, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(
                r["split"] == "train" and r["step"] >= step for r in metrics(run_dir)):
            return
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), cluster.job(job)
        time.sleep(0.2)
    raise TimeoutError(f"training of job {job} did not reach step {step}")


@pytest.mark.multiprocess
def test_signalled_train_job_checkpoints_requeues_and_resumes(cluster, tiny_shards, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    max_steps = 60  # long enough that the stop lands mid-run even on a fast machine
    # No periodic checkpoint before the end: the only one to resume from is the stop checkpoint.
    config = tiny_config(tmp_path, tiny_shards, run_dir, max_steps=max_steps, checkpoint_every=1000,
                         eval_every=1000)
    (job,) = submit(cluster, ["train", config, "--gpus-per-node", "0", "--cpu-workers", "2", "--log-dir", logs],
                    job_env(cluster))
    wait_for_step(run_dir, 2, job, cluster)
    # What `#SBATCH --signal=B:USR1@120` does ahead of the time limit: USR1 to the batch shell.
    cluster.run(["scancel", "--batch", "--signal=USR1", job])
    cluster.wait_for(job, lambda i: i["JobState"] == "PENDING" and i["Restarts"] == "1", timeout=180)
    assert cluster.wait(job, timeout=240) == "COMPLETED", _logs(logs)

    log = (logs / f"stn-train-{job}.out").read_text()  # --open-mode=append keeps both runs' output
    assert "got SIGUSR1" in log and "requeueing" in log and "(restart 1)" in log, log
    assert "finished with exit code 0" in log
    rows = metrics(run_dir)
    starts = [i for i, r in enumerate(rows) if r["split"] == "setup"]
    assert len(starts) == 2, rows  # one setup row per start of the trainer
    first = [r["step"] for r in rows[starts[0]:starts[1]] if r["split"] == "train"]
    second = [r["step"] for r in rows[starts[1]:] if r["split"] == "train"]
    stopped = first[-1]
    assert 2 <= stopped < max_steps
    # the requeued run continued from the stop checkpoint (not from step 1) and reached the end
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at step {stopped}" in log
    assert second[0] == stopped + 1 and second[-1] == max_steps, (first, second)
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def test_sweep_job_runs_ray_head_and_worker_and_tiny_sweep_then_stops_ray(cluster, tiny_shards, tmp_path):
    """2 nodes: Ray head on n1, a Ray worker on n2 (both this machine), a one-trial sweep, Ray stopped."""
    need((Path(PYTHON).parent / "ray").is_file(), "the Ray CLI beside this Python (the 'tune' extra)")
    logs, storage = tmp_path / "logs", tmp_path / "sweeps"
    dashboard = free_port()

    def own_ports(*names: str) -> str:
        return " ".join(f"--{name}={free_port()}" for name in names)

    # Ray's token auth stays on with a throwaway token (not ~/.ray/auth_token). Own ports for each
    # node: here both Ray nodes and any other Ray of this machine share one network address.
    agent_ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                   "runtime-env-agent-port")
    env = job_env(cluster, RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
                  RAY_DASHBOARD_PORT=str(dashboard), RAY_PORT=str(free_port()), LOGIN_HOST="login.example.org",
                  RAY_START_ARGS="--disable-usage-stats",
                  RAY_HEAD_ARGS=own_ports(*agent_ports, "ray-client-server-port"),
                  RAY_WORKER_ARGS=own_ports(*agent_ports), RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    env.pop("RAY_ADDRESS", None)
    one_trial = 'space={"optim.lr": {"type": "grid", "values": [0.001]}}'  # no scheduler for one trial
    (job,) = submit(cluster, ["sweep", "configs/sweeps/tiny_cpu.yaml", f"data.root={tiny_shards}",
                              f"storage_path={storage}", "train.max_steps=2", one_trial, "scheduler=none",
                              "--nodes", "2", "--cpus-per-task", "2", "--log-dir", logs], env)
    assert cluster.wait(job, timeout=300) == "COMPLETED", _logs(logs)
    log = (logs / f"stn-sweep-{job}.out").read_text()
    assert "Ray nodes up: 2 of 2" in log and "/4 CPUs" in log  # the worker's 2 CPUs joined the head's
    assert f"ssh -N -L 8265:127.0.0.1:{dashboard} -J login.example.org n1" in log
    assert "sweep finished with exit code 0" in log and "stopping Ray" in log
    with open(storage / "tiny_cpu" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["finished"] and rows[0]["step"] == "2"
    # the dashboard was bound to 127.0.0.1 and is gone with the job's Ray
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", dashboard), timeout=2).close()
    assert not Path(f"/tmp/ray-{job}").exists()  # the job's own Ray session folder, removed
    assert "forcing job termination" not in log  # Ray stopped by its own SIGTERM, not by killing steps


@pytest.mark.multiprocess
def test_cancelled_train_job_is_not_requeued(cluster, tiny_shards, tmp_path):
    """The stop trap must tell a user's `scancel` from a time-limit warning: no requeue on cancel."""
    logs = tmp_path / "logs"
    config = tiny_config(tmp_path, tiny_shards, tmp_path / "run", max_steps=1000)
    (job,) = submit(cluster, ["train", config, "--gpus-per-node", "0", "--cpu-workers", "2", "--log-dir", logs],
                    job_env(cluster))
    log = logs / f"stn-train-{job}.out"
    deadline = time.monotonic() + 120
    while not (log.exists() and "launcher torchrun" in log.read_text()):  # the ranks are starting
        assert time.monotonic() < deadline, _logs(logs)
        time.sleep(0.2)
    cluster.run(["scancel", job])
    assert cluster.wait(job, timeout=120) == "CANCELLED"
    time.sleep(3)  # a wrongful requeue would show up now
    info = cluster.job(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    text = log.read_text()
    # the trap ran (the batch shell got the cancel's SIGTERM) and decided not to requeue
    assert "got SIGTERM" in text and "ended by SLURM, not requeueing" in text, text
