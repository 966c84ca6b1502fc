"""Prompt -> images through the exported cascade.

The generative stages (U-Net cascade with T5, prior, autoencoder) are not built yet; until they are, sampling
says so plainly instead of producing something that looks like a result.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError


def sample_to_file(bundle: Path, prompt: str, out: Path, *, num_images: int, guidance: float, steps: int,
                   seed: int) -> None:
    """Generate images for `prompt` from `bundle` into the PNG file `out`."""
    raise PipelineError("sampling needs the U-Net cascade, which this version does not include yet; "
                        f"{bundle} can be inspected but not sampled from")
