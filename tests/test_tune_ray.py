"""Sweeps on a real Ray on localhost: ASHA + dashboard, a killed driver resumed, a 2-rank DDP trial.

Each test starts its own Ray and stops it (the ASHA test lets the sweep start a local Ray, as a
user's laptop run does; the others share one `ray start --head` owned by this module). Ray's token
authentication stays ON: the tests give Ray a throwaway token through RAY_AUTH_TOKEN instead of
the user's ~/.ray/auth_token, and the dashboard test checks that a request without it is refused.
"""
from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, REPO, free_port, need
from ray_heads import ray_available, ray_test_env, start_head, stop_session, wait_for_head
from shard_fixtures import write_tiny_cub_shards

pytestmark = [pytest.mark.slow, pytest.mark.service]

TINY_SWEEP = REPO / "configs" / "sweeps" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def ray_env():
    need(ray_available(), "ray[tune,default] installed (the 'tune' extra)")
    env = ray_test_env()  # token auth on, with a throwaway token for this module's clusters only
    return env, env["RAY_AUTH_TOKEN"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_cub_shards(tmp_path_factory.mktemp("tune_cub"))


@pytest.fixture(scope="module")
def ray_head(ray_env, tmp_path_factory):
    """One `ray start --head --block` (tests/ray_heads.py) for the tests that join a running cluster.

    3 logical CPUs on the 2-core machine: a DDP trial's 2 workers plus its driver's token share.
    The dashboard serves the state API that Ray Train's controller polls.
    """
    env, _ = ray_env
    head = start_head(tmp_path_factory.mktemp("ray"), env, num_cpus=3)
    try:
        wait_for_head(head)
        yield head.address
    finally:
        stop_session(head.process)


def _sweep_file(tmp_path: Path, shards: Path, **changes) -> Path:
    """tiny_cpu.yaml with `changes` (sweep keys) and data.root pointing at the tiny shards."""
    sweep = yaml.safe_load(TINY_SWEEP.read_text())
    overrides = [o for o in sweep["overrides"] if not any(o.startswith(k + "=") for k in changes.get("set", {}))]
    overrides += [f"{k}={v}" for k, v in changes.pop("set", {}).items()]
    sweep.update(overrides=overrides + [f"data.root={shards}"], storage_path=str(tmp_path / "sweeps"), **changes)
    path = tmp_path / f"{sweep['name']}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _read_trials(exp_dir: Path) -> list:
    with open(exp_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


def _get(url: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except (urllib.error.URLError, OSError):  # not up yet, or already shut down
        return None, ""


def test_asha_sweep_with_dashboard_then_best_config_trains(ray_env, shards, tmp_path):
    env, token = ray_env
    port = free_port()
    sweep = _sweep_file(tmp_path, shards)
    log = open(tmp_path / "sweep.log", "w+")
    driver = subprocess.Popen([PYTHON, "-m", "pipeline.tune", "--config", str(sweep), "--dashboard-port", str(port),
                               "--num-cpus", "2"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        url, trial_actors, unauthenticated = None, [], None
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None and not trial_actors:
            time.sleep(2)
            if url is None:
                found = re.search(r"Ray dashboard: (http://\S+)", Path(log.name).read_text())
                url = found.group(1) if found else None
                continue
            unauthenticated = _get(f"{url}/api/v0/actors", None)[0] or unauthenticated
            status, body = _get(f"{url}/api/v0/actors?limit=1000&detail=true", token)
            if status == 200:
                actors = json.loads(body)["data"]["result"]["result"]
                # Tune's function-trainable actors carry the trial function's name.
                trial_actors = [a for a in actors if a.get("repr_name") == "run_trial" and a["state"] == "ALIVE"]
        assert url and url.startswith(f"http://127.0.0.1:{port}"), f"no dashboard address printed:\n{Path(log.name).read_text()[-3000:]}"
        assert unauthenticated == 401, "the dashboard answered without Ray's auth token"
        assert trial_actors, "the dashboard's state API listed no live trial actor while the sweep ran"
        assert driver.wait(timeout=240) == 0, Path(log.name).read_text()[-5000:]
    finally:
        stop_session(driver)  # a no-op after a clean exit; else the driver and the Ray it started
        log.close()
    out = Path(log.name).read_text()
    exp_dir = tmp_path / "sweeps" / "tiny_cpu"
    rows = _read_trials(exp_dir)
    assert len(rows) == 4
    assert {r["status"] for r in rows} <= {"finished", "early-stopped"}, rows
    stopped = [r for r in rows if r["status"] == "early-stopped"]
    assert stopped and all(int(r["step"]) < int(r["max_steps"]) for r in stopped), rows
    assert any(r["status"] == "finished" for r in rows), rows
    assert (exp_dir / "trials.md").read_text().count("| ") >= 5 and "early-stopped" in out
    trial_pids = {json.loads(line)["pid"] for f in (exp_dir / "runs").glob("*/trial_starts.jsonl")
                  for line in f.read_text().splitlines()}
    assert {a["pid"] for a in trial_actors} <= trial_pids, "the dashboard listed actors that ran no trial"
    for row in rows:  # each trial keeps its own run folder with TensorBoard event files
        assert list((exp_dir / "runs" / row["trial"] / "tb").glob("events.out.tfevents.*")), row

    best = exp_dir / "best_config.yaml"
    best_lr = yaml.safe_load(best.read_text())["optim"]["lr"]
    finished = [r for r in rows if r["status"] == "finished"]
    assert best_lr == float(min(finished, key=lambda r: float(r["loss"]))["optim.lr"])
    from pipeline.train import main as train_main  # the CLI's main: `python -m pipeline.train --config best`
    assert train_main(["--config", str(best)]) == 0
    assert (exp_dir / "best" / "checkpoints" / "last.pt").is_file()


def _eval_steps(run_dir: Path) -> list:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if "top1" in r]


def _unfinished_with_checkpoint(exp_dir: Path, max_steps: int) -> set:
    """Trials that have written a checkpoint and evaluated fewer than max_steps steps."""
    unfinished = set()
    for last in (exp_dir / "runs").glob("*/checkpoints/last.pt"):
        try:
            steps = _eval_steps(last.parents[1])
        except (OSError, ValueError):  # metrics.jsonl being written: look again next time
            continue
        if steps and max(steps) < max_steps:
            unfinished.add(last.parents[1].name)
    return unfinished


def test_killed_driver_rerun_resumes_trials_from_checkpoints(ray_env, ray_head, shards, tmp_path):
    env, _ = ray_env
    sweep = _sweep_file(tmp_path, shards, name="resume", scheduler="none",
                        space={"optim.lr": {"type": "grid", "values": [3.0e-3, 1.0e-3]}},
                        set={"train.max_steps": 12})
    command = [PYTHON, "-m", "pipeline.tune", "--config", str(sweep), "--address", ray_head]
    exp_dir = tmp_path / "sweeps" / "resume"
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        # Kill the driver once some trial has a checkpoint but has not finished (how far the other
        # trial got by then depends on the machine's speed: it may not have started, or be done).
        deadline, interrupted = time.time() + 240, set()
        while time.time() < deadline and first.poll() is None and not interrupted:
            time.sleep(0.5)
            interrupted = _unfinished_with_checkpoint(exp_dir, 12)
        assert first.poll() is None, "the sweep ended before it could be interrupted"
        first.send_signal(signal.SIGKILL)  # no goodbye: the cluster sees the driver vanish
        first.wait()
    finally:
        stop_session(first)
    assert interrupted, "no trial had an unfinished checkpoint when the driver was killed"
    finished_before = {p.parents[1].name for p in (exp_dir / "runs").glob("*/checkpoints/last.pt")} - interrupted

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    assert "Resuming sweep" in rerun.stdout
    rows = _read_trials(exp_dir)
    assert len(rows) == 2 and all(r["status"] == "finished" and int(r["step"]) == 12 for r in rows), rows
    for trial in interrupted | finished_before:
        run_dir = exp_dir / "runs" / trial
        starts = [json.loads(line) for line in (run_dir / "trial_starts.jsonl").read_text().splitlines()]
        if trial in interrupted:
            assert len(starts) >= 2 and all(s["resume_from"] for s in starts[1:]), starts
        steps = _eval_steps(run_dir)
        # Trained from scratch again, it would evaluate step 2 a second time.
        assert steps.count(2) == 1 and steps[-1] == 12, steps


def test_two_worker_trial_is_one_ddp_job_with_reduced_metrics(ray_env, ray_head, shards, tmp_path):
    env, _ = ray_env
    sweep = _sweep_file(tmp_path, shards, name="ddp", scheduler="none", num_trials=1,
                        space={"optim.lr": {"type": "choice", "values": [3.0e-3]}},
                        resources={"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0},
                        set={"train.max_steps": 4, "data.eval_split": "test"})
    run = subprocess.run([PYTHON, "-m", "pipeline.tune", "--config", str(sweep), "--address", ray_head],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-5000:]
    assert "world size 2 on cpu" in out  # the trainer's own line
    exp_dir = tmp_path / "sweeps" / "ddp"
    (row,) = _read_trials(exp_dir)
    (start,) = [json.loads(line) for line in (exp_dir / "runs" / row["trial"] / "trial_starts.jsonl").read_text().splitlines()]
    assert start["world_size"] == 2 and start["backend"] == "gloo"  # the process group Ray Train set up
    assert row["status"] == "finished" and int(row["step"]) == 4
    (result_file,) = exp_dir.glob("*/result.json")
    reports = [json.loads(line) for line in result_file.read_text().splitlines()]
    manifest = json.loads((shards / "manifest.json").read_text())
    # One report per evaluation, from rank 0, holding the all-reduced count: each rank scored half.
    assert [r["step"] for r in reports] == [2, 4]
    assert all(r["num_samples"] == manifest["splits"]["test"]["num_samples"] for r in reports)
    # the reported metrics are the trial's own evaluations, as its run directory logged them
    logged = [json.loads(line) for line in (exp_dir / "runs" / row["trial"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["top1"] for r in reports] == [line["top1"] for line in logged if line["split"] == "test"]


def test_failed_trial_is_retried_then_reported_as_error(ray_env, ray_head, shards, tmp_path):
    env, _ = ray_env
    # lr 1e6 makes the loss non-finite within a few steps: the trainer raises, Tune retries once.
    sweep = _sweep_file(tmp_path, shards, name="fails", scheduler="none", max_failures=1,
                        space={"optim.lr": {"type": "choice", "values": [1.0e6]}}, num_trials=1,
                        set={"optim.name": "sgd"})
    run = subprocess.run([PYTHON, "-m", "pipeline.tune", "--config", str(sweep), "--address", ray_head],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    (row,) = _read_trials(tmp_path / "sweeps" / "fails")
    assert row["status"] == "error" and "non-finite loss" in row["error"], row
    starts = (tmp_path / "sweeps" / "fails" / "runs" / row["trial"] / "trial_starts.jsonl").read_text().splitlines()
    assert len(starts) == 2  # the first attempt and max_failures=1 retry ...
    assert json.loads(starts[1])["resume_from"]  # ... from the checkpoint the first attempt wrote
    assert not (tmp_path / "sweeps" / "fails" / "best_config.yaml").exists()
