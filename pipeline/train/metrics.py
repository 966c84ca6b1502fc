"""Rank-0 observability sinks: RUN_DIR/metrics.jsonl, TensorBoard, a tqdm progress bar, sample grids.

``metrics.jsonl`` holds exactly one JSON object per logged step. When a run resumes (or rolls back) to step S,
records of steps after S, written before the interruption, are dropped first, so the file never holds two
records of one step. Non-finite numbers are written as ``null`` (JSON has no NaN).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import LogConfig

METRICS = "metrics.jsonl"


def max_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated by this process on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def _clean(value: Any) -> Any:
    """JSON-safe: tensors to numbers, non-finite floats to None, recursively."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[name] = float(value)
    return out


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records with step <= last_step (atomic rewrite); a torn last line from a kill is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by SIGKILL
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def save_grid(images: torch.Tensor, path: Path) -> None:
    """(N, 3, H, W) in [0, 1] -> one PNG, images in rows of ceil(sqrt(N))."""
    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(3, rows * h, cols * w)
    for i, image in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, c = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    array = (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


class MetricsSinks:
    """The sinks of rank 0 (other ranks construct it with enabled=False: every call is then a no-op)."""

    def __init__(self, run_dir: Path, log: LogConfig, enabled: bool, start_step: int, max_steps: int) -> None:
        self.enabled, self.run_dir = enabled, run_dir
        self.path = run_dir / METRICS
        self.tb = None
        self.bar = None
        if not enabled:
            return
        truncate_metrics(self.path, start_step)
        self.file = self.path.open("a", encoding="utf-8")
        self.use_tb = log.tensorboard
        self._open_tensorboard(start_step)
        if log.progress_bar:
            from tqdm import tqdm

            # In a log file (not a terminal) every redraw is another line: redraw every 30 s there.
            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def _open_tensorboard(self, last_step: int) -> None:
        if self.use_tb:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events of steps after `last_step` written before an interruption or a rollback.
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=last_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must hold 'step'), mirror its numbers to TensorBoard, update the bar's text."""
        if not self.enabled:
            return
        record = _clean(record)
        self.file.write(json.dumps(record, sort_keys=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in _flatten(record).items():
                self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()
        if self.bar is not None:
            loss = record.get("loss")
            self.bar.set_postfix(loss="nan" if loss is None else f"{loss:.4g}", lr=f"{record.get('lr', 0):.3g}",
                                 sps=f"{record.get('samples_per_sec', 0):.1f}", refresh=False)
            evals = {k: v for k, v in record.items() if k.startswith("eval/") and isinstance(v, (int, float))}
            if evals:  # evaluations are rare and what a user watches for: one line each, above the bar
                self.bar.write(f"step {record['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in evals.items()))

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def images(self, step: int, images: torch.Tensor) -> Path | None:
        if not self.enabled:
            return None
        path = self.run_dir / "samples" / f"step_{step:08d}.png"
        save_grid(images, path)
        if self.tb is not None:
            self.tb.add_images("samples", images.detach().float().cpu().clamp(0, 1), step)
        return path

    def truncate(self, last_step: int) -> None:
        """Drop records after `last_step` (a rollback) and keep appending."""
        if not self.enabled:
            return
        self.file.close()
        truncate_metrics(self.path, last_step)
        self.file = self.path.open("a", encoding="utf-8")
        if self.tb is not None:
            self.tb.close()
            self._open_tensorboard(last_step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
