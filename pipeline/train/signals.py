"""Preemption: SIGTERM / SIGUSR1 -> finish the step, checkpoint, exit with REQUEUE_EXIT_CODE.

SLURM sends SIGTERM before killing a preempted job (and SIGUSR1 ahead of the time limit with
`#SBATCH --signal=USR1@120`); torchrun forwards SIGTERM to its workers. Job scripts requeue the
job when the trainer exits with REQUEUE_EXIT_CODE (3), e.g.
    python -m pipeline.train ... ; [ $? -eq 3 ] && scontrol requeue "$SLURM_JOB_ID"
and the requeued job continues with `train.resume=auto`.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Iterator, Optional

REQUEUE_EXIT_CODE = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def blocked_in_new_workers() -> Iterator[None]:
    """Block the stop signals while data-loader workers may be forked (first `next()` of a loader).

    SLURM signals every process of a job step, loader workers included, and torch's workers die on
    SIGTERM: the trainer would then crash in the middle of writing its checkpoint. A forked child
    keeps the signal mask of the thread that forked it, so workers started inside this block never
    receive the stop signals (they exit when the trainer shuts them down, or when it is gone). The
    trainer's own mask is restored on exit, and a signal that arrived meanwhile is delivered then.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; exit with REQUEUE_EXIT_CODE."""

    def __init__(self, step: int, signal_name: str, checkpoint: Optional[str]):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint: {checkpoint}")
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


class StopRequest:
    """Records a stop signal; the fit loop polls `received` once per step (a context manager)."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict = {}

    @property
    def received(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        # Handlers can only be installed from the main thread (Ray runs trainers in a thread:
        # there Ray itself handles the signals).
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
