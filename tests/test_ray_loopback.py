"""A local Ray stays on this machine: no process of it listens on anything but 127.0.0.1.

Both ways the project starts a local Ray are checked: the sweep runner's own Ray (a laptop sweep,
`connect_ray` with no address) and the tests' `ray start --head`. A driver runs an actor and a task,
so that worker processes (each with its own gRPC server) exist, then every listening TCP socket of
every process of that Ray (head, agents, workers, the driver) must be on loopback: not 0.0.0.0,
not ::, not the machine's address. A DDP trial adds one port that torch, not Ray, binds to all
interfaces (the last test pins it down to that one port).
"""
from __future__ import annotations

import select
import subprocess
import time

import pytest

from conftest import PYTHON, REPO, free_port, need
from pipeline.tune.local_ray import LOOPBACK_ENV
from ray_heads import (is_loopback, listeners, ray_available, ray_test_env, start_head, stop_session,
                       wait_for_head)

pytestmark = [pytest.mark.slow, pytest.mark.service]

DRIVER = """
import os, sys
{connect}
import ray

@ray.remote
class Probe:
    def pid(self):
        return os.getpid()

probe = Probe.remote()  # kept: an actor without a handle is gone
actor_pid = ray.get(probe.pid.remote())
ray.get(ray.remote(lambda: os.getpid()).remote())
print("ready", actor_pid, flush=True)
sys.stdin.read()  # until the test closes stdin
"""


# A 2-rank DDP job as a sweep's DDP trial runs it (Ray Train in the sweep's local Ray); rank 0 says
# where torch's c10d store listens, then every rank waits for the test's `stop` file.
DDP_DRIVER = """
from pipeline.tune.runner import connect_ray
connect_ray(dashboard_port={dashboard_port}, num_cpus=3)
import ray.train
from ray.train.torch import TorchTrainer

def loop(config):
    import os, pathlib, time
    import ray.train
    import torch.distributed as dist
    dist.barrier()  # the process group is up on both ranks
    if ray.train.get_context().get_world_rank() == 0:
        pathlib.Path(config["ready"] + ".tmp").write_text(f"{{os.getpid()}} {{os.environ['MASTER_PORT']}}")
        os.replace(config["ready"] + ".tmp", config["ready"])  # the test reads it whole
    deadline = time.time() + 180
    while not pathlib.Path(config["stop"]).exists() and time.time() < deadline:
        time.sleep(0.5)
    dist.barrier()

TorchTrainer(loop, train_loop_config={{"ready": {ready!r}, "stop": {stop!r}}},
             scaling_config=ray.train.ScalingConfig(num_workers=2),
             run_config=ray.train.RunConfig(storage_path={storage!r})).fit()
"""


def _start_driver(connect: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-c", DRIVER.format(connect=connect)], cwd=REPO, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_ready(driver: subprocess.Popen, timeout: float = 180) -> int:
    """The actor's pid, once the driver's actor and task have run."""
    deadline, output = time.time() + timeout, []
    while time.time() < deadline and driver.poll() is None:
        if select.select([driver.stdout], [], [], 1)[0]:
            line = driver.stdout.readline()
            output.append(line)
            if line.startswith("ready "):
                return int(line.split()[1])
    raise AssertionError(f"the driver did not run its actor and task:\n{''.join(output)[-3000:]}")


def _listing(found) -> str:
    return "\n".join(f"  {s.ip}:{s.port}  pid {s.pid}  {s.process}" for s in found)


def _assert_loopback_only(sessions, actor_pid: int) -> None:
    found = [s for sid in sessions for s in listeners(sid)]
    exposed = [s for s in found if not is_loopback(s.ip)]
    assert not exposed, f"Ray processes listening beyond loopback:\n{_listing(exposed)}"
    # ... and the check saw the Ray processes that matter, not an empty list
    names = " ".join(s.process for s in found)
    for process in ("gcs_server", "raylet", "dashboard.py", "monitor.py", "ray::DashboardAgent",
                    "ray::RuntimeEnvAgent"):
        assert process in names, f"no listening socket of {process} among {found}"
    assert actor_pid in {s.pid for s in found}, f"the actor (pid {actor_pid}) listens nowhere: {found}"


def _user_env(env: dict) -> dict:
    """A user's shell: nothing set; the sweep runner keeps its Ray on loopback by itself."""
    return {k: v for k, v in env.items() if k not in LOOPBACK_ENV}


@pytest.fixture
def env():
    need(ray_available(), "ray[tune,default] installed (the 'tune' extra)")
    return ray_test_env()


def test_sweep_runners_local_ray_listens_on_loopback_only(env):
    driver = _start_driver("from pipeline.tune.runner import connect_ray\n"
                           f"connect_ray(dashboard_port={free_port()}, num_cpus=1)", _user_env(env))
    try:
        actor_pid = _wait_ready(driver)
        _assert_loopback_only([driver.pid], actor_pid)
    finally:
        driver.stdin.close()  # the driver ends, and with it the Ray it started
        stop_session(driver)


def test_tests_ray_head_listens_on_loopback_only(env, tmp_path_factory):
    head = start_head(tmp_path_factory.mktemp("ray"), env, num_cpus=1)
    driver = None
    try:
        wait_for_head(head)
        driver = _start_driver(f"import ray\nray.init(address={head.address!r})", env)
        actor_pid = _wait_ready(driver)
        _assert_loopback_only([head.process.pid, driver.pid], actor_pid)
    finally:
        if driver is not None:
            driver.stdin.close()
            stop_session(driver)
        stop_session(head.process)


def test_ddp_trial_in_a_local_ray_exposes_only_torchs_store(env, tmp_path):
    """The one port a local sweep cannot keep on loopback: torch's c10d store of a DDP trial.

    Ray Train starts the process group (init_method env://, MASTER_ADDR 127.0.0.1 here), and rank 0
    hosts torch's TCPStore on MASTER_PORT, which torch binds to all interfaces whatever the address
    (TCPStoreLibUvBackend.cpp: "::" or "0.0.0.0" and the port), for as long as the trial runs.
    Everything else of the trial (its controller, the workers' gRPC servers, gloo) stays on loopback.
    """
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    code = DDP_DRIVER.format(dashboard_port=free_port(), ready=str(ready), stop=str(stop),
                             storage=str(tmp_path / "train"))
    log = open(tmp_path / "driver.log", "w+")
    driver = subprocess.Popen([PYTHON, "-c", code], cwd=REPO, env=_user_env(env), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not ready.exists() and driver.poll() is None and time.time() < deadline:
            time.sleep(1)
        assert ready.exists(), f"the DDP job did not start:\n{(tmp_path / 'driver.log').read_text()[-3000:]}"
        rank0, store_port = map(int, ready.read_text().split())
        found = listeners(driver.pid)
        exposed = [s for s in found if not is_loopback(s.ip)]
        assert [(s.pid, s.port) for s in exposed] == [(rank0, store_port)], (
            f"beyond loopback (rank 0 is pid {rank0}, torch's store port {store_port}):\n{_listing(exposed)}")
        assert len({s.pid for s in found if "RayTrainWorker" in s.process}) == 2, _listing(found)
    finally:
        stop.touch()
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        stop_session(driver)
        log.close()
