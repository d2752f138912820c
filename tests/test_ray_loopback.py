"""A local Ray stays on this machine: no process of it listens on anything but 127.0.0.1.

Both ways the project starts a local Ray are checked: the sweep runner's own Ray (a laptop sweep,
`connect_ray` with no address) and the tests' `ray start --head`. A driver runs an actor and a task,
so that worker processes (each with its own gRPC server) exist, then every listening TCP socket of
every process of that Ray (head, agents, workers, the driver) must be on loopback: not 0.0.0.0,
not ::, not the machine's address.
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


def _assert_loopback_only(sessions, actor_pid: int) -> None:
    found = [s for sid in sessions for s in listeners(sid)]
    exposed = [s for s in found if not is_loopback(s.ip)]
    assert not exposed, "Ray processes listening beyond loopback:\n" + "\n".join(
        f"  {s.ip}:{s.port}  pid {s.pid}  {s.process}" for s in exposed)
    # ... and the check saw the Ray processes that matter, not an empty list
    names = " ".join(s.process for s in found)
    for process in ("gcs_server", "raylet", "dashboard.py", "monitor.py", "ray::DashboardAgent",
                    "ray::RuntimeEnvAgent"):
        assert process in names, f"no listening socket of {process} among {found}"
    assert actor_pid in {s.pid for s in found}, f"the actor (pid {actor_pid}) listens nowhere: {found}"


@pytest.fixture
def env():
    need(ray_available(), "ray[tune,default] installed (the 'tune' extra)")
    return ray_test_env()


def test_sweep_runners_local_ray_listens_on_loopback_only(env):
    # a user's shell: nothing set, the runner keeps its Ray on loopback by itself
    user_env = {k: v for k, v in env.items() if k not in LOOPBACK_ENV}
    driver = _start_driver("from pipeline.tune.runner import connect_ray\n"
                           f"connect_ray(dashboard_port={free_port()}, num_cpus=1)", user_env)
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
