"""A local Ray that stays on this machine: every Ray process listens on 127.0.0.1 only.

    context = init_local_ray(include_dashboard=True, num_cpus=2)       # the sweep runner's Ray
    subprocess.Popen(head_command("ray", "--block", ...), env=local_ray_env())  # a `ray start --head`

Ray binds its servers from the node address: with 127.0.0.1 the GCS, the raylet (node manager and
object manager), every worker's and driver's gRPC server, the dashboard agent (gRPC, HTTP, metrics),
the runtime-env agent, the dashboard's and autoscaler's metrics and the Ray client server listen
on 127.0.0.1; with any other address most of them listen on all interfaces (0.0.0.0 / ::).
But Ray on Linux replaces a node address of 127.0.0.1 (`--node-ip-address`, `_node_ip_address`)
by the machine's own (`ray._private.services.resolve_ip_for_localhost`) unless its one-machine mode,
the default on macOS and Windows, is on: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0. Ray reads it when
`ray` is imported, and the processes a Ray starts inherit it. A Ray in that mode takes no other
nodes, which is what a local Ray wants; cluster heads (jobs/) keep the node's address.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional

LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def local_ray_env(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """`env` (default: this process's environment) with the setting that keeps a local Ray on loopback."""
    return {**(os.environ if env is None else env), **LOOPBACK_ENV}


def head_command(ray: str, *options: str) -> List[str]:
    """`ray start --head` of a local Ray on 127.0.0.1, run with local_ray_env(); `ray` is the Ray CLI."""
    return [ray, "start", "--head", f"--node-ip-address={LOOPBACK}", f"--dashboard-host={LOOPBACK}", *options]


def init_local_ray(**options):
    """ray.init of a new local Ray (even if another runs on this machine) on 127.0.0.1; Ray's context."""
    os.environ.update(LOOPBACK_ENV)  # read when ray is imported; the Ray processes inherit it
    import ray

    context = ray.init(address="local", _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **options)
    node = ray.util.get_node_ip_address()
    if node != LOOPBACK:  # ray was imported before the setting: Ray took the machine's address
        ray.shutdown()
        raise RuntimeError(f"the local Ray took the node address {node}, not {LOOPBACK}: set "
                           f"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray is imported")
    return context
