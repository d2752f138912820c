"""Watching a run: metrics.jsonl, the trackers of train.report_to (TensorBoard by default; MLflow,
W&B: pipeline/train/tracking.py) and the rank-0 progress bar / log lines.

Only rank 0 writes; other ranks get a `Monitor` that does nothing, so callers never branch.
`metrics.jsonl` holds one JSON object per line: {"step", "split", "time", <values>...}; split
is `train` for training log lines, the evaluated split (e.g. `test`) for evaluations.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Dict, Optional

from tqdm import tqdm

from data_prep.contract import write_text_atomic
from pipeline.config import Config
from pipeline.metrics import flatten
from pipeline.train.tracking import run_status, start_trackers

log = logging.getLogger("pipeline.train")


def drop_lines_after(path: Path, step: int) -> None:
    """Forget what a killed attempt logged after the checkpoint a resumed run restarts from."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except ValueError:  # the line a SIGKILL cut short
            continue
    write_text_atomic(path, "".join(kept), durable=False)


class Window:
    """Mean loss (this rank's), images/s (all ranks), data-wait share and ETA over the steps since
    the last `reset`: the trainer resets it at every log line and after evaluations and
    checkpoints. The loss stays on the device until a log line reads it."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.wait, self.loss_sum = time.perf_counter(), 0, 0.0, 0.0

    def add(self, loss, data_wait: float) -> None:
        self.steps += 1
        self.wait += data_wait
        self.loss_sum = self.loss_sum + loss

    def values(self, steps_left: int) -> Dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        per_step = elapsed / max(self.steps, 1)
        return {"loss": float(self.loss_sum) / max(self.steps, 1),
                "images_per_s": self.images_per_step * self.steps / elapsed,
                "data_wait_pct": 100.0 * self.wait / elapsed, "eta_s": per_step * steps_left}


class Monitor:
    """metrics.jsonl + the trackers of `cfg.train.report_to` + tqdm on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, max_steps: int, start_step: int, cfg: Optional[Config] = None):
        self.enabled = enabled
        self.bar = None
        self.trackers = []
        self.jsonl = None
        self.last_step = start_step
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if start_step:
            drop_lines_after(run_dir / "metrics.jsonl", start_step)
        self.trackers = start_trackers(cfg or Config(), run_dir, start_step)  # first: they may refuse to start
        # A fresh start begins a new file; a resumed run continues the old one.
        self.jsonl = open(run_dir / "metrics.jsonl", "a" if start_step else "w", buffering=1)
        # A bar only on a terminal; batch jobs get plain log lines every train.log_every steps.
        self.interactive = sys.stderr.isatty()
        if self.interactive:
            self.bar = tqdm(total=max_steps, initial=start_step, dynamic_ncols=True, unit="step")

    def record(self, step: int, split: str, values: Dict[str, object]) -> None:
        if not self.enabled:
            return
        line = {"step": step, "split": split, "time": round(time.time(), 3), **values}
        self.jsonl.write(json.dumps(line, default=str) + "\n")
        self.last_step = step
        # nested metrics (windows/...) as scalars
        scalars = {f"{split}/{key}": value for key, value in flatten(values).items() if math.isfinite(value)}
        for tracker in self.trackers:
            tracker.log_metrics(scalars, step)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def show(self, step: int, max_steps: int, values: Dict[str, float]) -> None:
        """The bar's postfix on a terminal, else one log line."""
        if not self.enabled:
            return
        text = {"loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.3g}",
                "img/s": f"{values['images_per_s']:.1f}", "wait": f"{values['data_wait_pct']:.0f}%"}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
        else:
            eta = time.strftime("%H:%M:%S", time.gmtime(values["eta_s"]))
            log.info("step %d/%d  %s  eta %s", step, max_steps,
                     "  ".join(f"{k} {v}" for k, v in text.items()), eta)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    def add_image(self, tag: str, path: Path, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_image(tag, path, step)

    def close(self, best: Optional[Dict[str, Optional[float]]] = None) -> None:
        """Called from fit()'s `finally`: an exception on its way out marks the trackers' run as
        failed (killed, for a stop signal). `best`: {metric name: best value}, reported as best/<name>."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        status = run_status(sys.exc_info()[1])
        best = {f"best/{name}": value for name, value in (best or {}).items() if value is not None}
        for tracker in self.trackers:
            tracker.close(status, best, self.last_step)
        self.jsonl.close()
