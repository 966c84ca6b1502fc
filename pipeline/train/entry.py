"""Entry point for ``python -m pipeline train`` (placeholder until the Trainer lands)."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError


def run_training(cfg: Config, run_dir: Path) -> int:
    """Train `cfg` in `run_dir`, resuming from its latest checkpoint; returns the process exit code."""
    raise PipelineError("training is not implemented in this version yet")
