"""The SLURM job scripts on a real one-node SLURM cluster (tests/slurm_cluster.py).

Each test submits through `jobs/submit` or `sbatch` as a user would and checks what the job left
behind: shards and manifest, run directory, job state, restart count, job log.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, need_program, subprocess_env
from slurm_cluster import SlurmCluster

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


def test_prep_array_and_finalising_job_match_single_process_run(cluster, shared_data, tmp_path):
    raw = shared_data / CUB_SAMPLE  # class 1's 60 images are all present in the sample
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
