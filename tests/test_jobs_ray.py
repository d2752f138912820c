"""Ray's job API against a running Ray head: `ray job submit ... -- python -m pipeline.tune ...`.

This is how users run a sweep on an existing Ray cluster (docs/cluster.md): the head here is a
`ray start --head --block` that listens on 127.0.0.1 only, the dashboard (the job API's address)
included, with Ray's token authentication on, with a throwaway token given through RAY_AUTH_TOKEN
rather than the user's ~/.ray/auth_token. The head and everything it started are stopped at the end.
"""
from __future__ import annotations

import csv
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, need
from ray_heads import RAY, ray_test_env, start_head, stop_session
from shard_fixtures import write_tiny_cub_shards

pytestmark = [pytest.mark.service, pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard URL, client env) of a one-node Ray head with the job API (tests/ray_heads.py)."""
    need(Path(RAY).is_file(), f"the Ray CLI at {RAY} (the 'tune' extra: ray[tune,default])")
    env = ray_test_env()
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env['PATH']}"  # the job's `python` is this venv's
    # Ray's sockets live under the temp dir: keep its path short (AF_UNIX paths are <= 107 bytes).
    temp = Path(tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp"))
    head = start_head(temp, env, num_cpus=2)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.process.poll() is None, f"ray start exited with {head.process.returncode}: {_tail(head)}"
            probe = subprocess.run([RAY, "job", "list", "--address", head.dashboard_url], env=env,
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, f"no job API at {head.dashboard_url}: {probe.stderr[-2000:]} " \
                                                f"{_tail(head)}"
            time.sleep(1)
        yield head.dashboard_url, env
    finally:
        stop_session(head.process, grace=90)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _tail(head) -> str:
    return head.log.read_text()[-3000:]


def test_ray_job_submit_runs_the_tiny_sweep_to_the_end(ray_head, tmp_path):
    url, env = ray_head
    shards = write_tiny_cub_shards(tmp_path / "cub")
    storage = tmp_path / "sweeps"
    # The command docs/cluster.md gives, from the repository root; the tiny sweep cut to one useful
    # and one hopeless learning rate, 4 steps, to keep CI short.
    two_trials = 'space={"optim.lr": {"type": "grid", "values": [3.0e-3, 1.0e-9]}}'
    cmd = [RAY, "job", "submit", "--address", url, "--working-dir", ".", "--",
           "python", "-m", "pipeline.tune", "--config", "configs/sweeps/tiny_cpu.yaml",
           f"data.root={shards}", f"storage_path={storage}", "train.max_steps=4", two_trials]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert "succeeded" in out.lower(), out[-3000:]
    with open(storage / "tiny_cpu" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["optim.lr"]) for r in rows) == [1.0e-9, 3.0e-3]  # the whole grid ran
    assert {r["status"] for r in rows} <= {"finished", "early-stopped"}, rows
    assert any(r["status"] == "finished" and int(r["step"]) == 4 for r in rows), rows
    assert (storage / "tiny_cpu" / "best_config.yaml").is_file()


def test_ray_job_api_refuses_a_client_without_the_token(ray_head):
    url, env = ray_head
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    anonymous["RAY_AUTH_TOKEN_PATH"] = "/nonexistent/token"  # not the user's ~/.ray/auth_token either
    res = subprocess.run([RAY, "job", "list", "--address", url], env=anonymous, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0
