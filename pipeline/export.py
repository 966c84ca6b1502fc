"""Consolidate a run's checkpoint into a weights bundle (placeholder until a stage can be trained)."""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError


def export_run(run_dir: Path, out: Path, *, checkpoint: str = "latest", use_ema: bool = True) -> None:
    """Write a bundle for the checkpoint `checkpoint` of `run_dir` into `out`."""
    raise PipelineError("export needs a trained stage; no stage can be trained in this version yet")
