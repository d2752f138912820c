"""Local Ray heads for the tests, started as the project starts a local Ray: on 127.0.0.1 only.

    env = ray_test_env()                       # token auth on, with a throwaway token
    head = start_head(tmp_path, env, num_cpus=2)
    wait_for_head(head)                        # "Ray runtime started" in its log
    ... --address head.address / head.dashboard_url ...
    stop_session(head.process)                 # the head and everything it started

A head is `ray start --head --block` built by pipeline.tune.local_ray.head_command, with ports of
its own for everything Ray would otherwise take by default, so that a second Ray on the machine
(another test's, a user's) does not collide with it.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, NamedTuple

from conftest import PYTHON, free_port, subprocess_env
from pipeline.tune.local_ray import head_command, local_ray_env

RAY = str(Path(PYTHON).parent / "ray")


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        import ray.tune  # noqa: F401
        return True
    except ImportError:
        return False


def ray_test_env() -> dict:
    """Environment for the tests' Ray processes and drivers: a local Ray, token auth ON with a
    throwaway token (RAY_AUTH_TOKEN, not the user's ~/.ray/auth_token), no RAY_ADDRESS."""
    env = local_ray_env(subprocess_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                                       RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0"))
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class RayHead:
    process: subprocess.Popen
    address: str          # the GCS address, for --address / ray.init
    dashboard_url: str    # the dashboard and job API
    log: Path


def start_head(temp: Path, env: dict, num_cpus: int) -> RayHead:
    """`ray start --head --block` with its session folder under `temp` (keep it short: Ray's socket
    paths under it must stay under 108 bytes) and its own process session (stop_session)."""
    port, dashboard = free_port(), free_port()
    command = head_command(
        RAY, "--block", f"--port={port}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
        "--include-dashboard=true", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--temp-dir={temp}")
    log = temp / "head.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return RayHead(process, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", log)


def wait_for_head(head: RayHead, timeout: float = 120) -> None:
    """`ray start --block` prints "Ray runtime started." once the head takes connections."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "Ray runtime started" in head.log.read_text():
            return
        if head.process.poll() is not None:
            raise AssertionError(f"ray start exited with {head.process.returncode}: {head.log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"the Ray head did not come up in {timeout}s: {head.log.read_text()[-3000:]}")


def session_pids(sid: int) -> List[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
            pids.append(int(stat.parent.name))
    return pids


def stop_session(leader: subprocess.Popen, grace: float = 30) -> None:
    """Stop a process started with start_new_session=True and everything it started (its session)."""
    if leader.poll() is None:
        leader.send_signal(signal.SIGINT)  # `ray start --block` and drivers shut Ray down on SIGINT
        try:
            leader.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for pid in session_pids(leader.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leader.poll() is None:
        leader.wait()


class Listener(NamedTuple):
    ip: str
    port: int
    pid: int
    process: str


def listeners(sid: int) -> List[Listener]:
    """Every listening TCP socket (IPv4 and IPv6) of the processes of session `sid`."""
    import ray  # noqa: F401  (Ray ships psutil in ray/thirdparty_files and puts it on sys.path)
    import psutil

    found = []
    for pid in session_pids(sid):
        try:
            process = psutil.Process(pid)
            # "gcs_server --log_dir=...", "python dashboard.py --host=...", "ray::DashboardAgent"
            label = " ".join(os.path.basename(_first_line(arg)) for arg in process.cmdline()[:3])[:80]
            found += [Listener(c.laddr.ip, c.laddr.port, pid, label or process.name())
                      for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return found


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), text)


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and 127.x seen through an IPv6 socket (::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback
