"""Shared test helpers.

Tests that need a service (SLURM daemons, a Ray head, shellcheck) start it themselves. Where the
machine lacks it they skip on a laptop but FAIL under CI (CI=true): a skipped test is not a pass.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "tests" / "data"  # real CUB and SVHN samples in their original layouts (README there)
PYTHON = sys.executable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for Ray and SLURM daemons)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, what: str) -> None:
    """Skip (laptop) or fail (CI) when a test's prerequisite is missing."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI must provide {what}")
    pytest.skip(f"needs {what}")


def need_program(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"the program '{name}' on PATH")
    return path


@pytest.fixture
def sample_data() -> Path:
    return SAMPLE_DATA


def stop_process(proc, timeout: float) -> None:
    """SIGTERM, wait up to `timeout` seconds for a clean shutdown, then SIGKILL."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def subprocess_env(**extra: str) -> dict:
    """Environment for child processes (torchrun, python -m ...) that import this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env.update(extra)
    return env


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    # Tiny tensors on a 2-core machine: extra intra-op threads only fight the test's own child
    # processes (torchrun ranks, loader workers, Ray) for the cores.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the multiprocess marker is checked, not trusted ---------------------------------------------
# `make test-fast` deselects `multiprocess` tests to stay a quick in-process run; a test that starts
# a multiprocessing worker (DataLoader workers, a process pool) without the marker fails, naming it.
_UNMARKED_STARTS: list = []
_MARKED = {"now": True}


def _checked_start(start):
    def wrapper(self, *args, **kwargs):
        if not _MARKED["now"]:
            _UNMARKED_STARTS.append(type(self).__name__)
        return start(self, *args, **kwargs)
    return wrapper


def pytest_configure(config):
    import multiprocessing.process

    base = multiprocessing.process.BaseProcess
    if not getattr(base.start, "_marker_checked", False):
        base.start = _checked_start(base.start)
        base.start._marker_checked = True


@pytest.fixture(autouse=True)
def multiprocess_marker_is_honest(request):
    _MARKED["now"] = request.node.get_closest_marker("multiprocess") is not None
    _UNMARKED_STARTS.clear()
    yield
    started = list(_UNMARKED_STARTS)
    _MARKED["now"], _UNMARKED_STARTS[:] = True, []
    if started:
        pytest.fail(f"{request.node.nodeid} started {len(started)} worker process(es) ({started[0]}) without "
                    "@pytest.mark.multiprocess")
