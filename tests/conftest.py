"""Test-wide setup.

TRITON_INTERPRET must be in the environment before any ``@triton.jit`` decorator runs, otherwise kernel
launches on a machine without a GPU fail with "0 active drivers". Setting it here, before pytest imports any
test module, makes the real Triton kernels run through the interpreter on CPU tensors.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test modules import open_clip/torchvision directly; the package import applies the CPU-torch compatibility
# fix (pipeline.compat) first, as every entry point of the project does.
import pipeline  # noqa: E402,F401


from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pipeline.data.synthetic import write_synthetic_shards  # noqa: E402


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Real synthetic WebDataset shards at 16 px, built once: train (8 x 24 samples) and heldout (2 x 16)."""
    root = tmp_path_factory.mktemp("train_shards")
    write_synthetic_shards(root / "train", 192, 24, 16, 0, "train", "png")
    write_synthetic_shards(root / "heldout", 32, 16, 16, 1, "heldout", "png")
    return root


@pytest.fixture(scope="session")
def precomputed(tmp_path_factory):
    """precompute_helpers.Setup: source shards with two bad samples, tiny T5 + CLIP, and their precompute."""
    from precompute_helpers import build_setup  # imports transformers/open_clip: only when a test needs it

    return build_setup(tmp_path_factory.mktemp("precomputed"))
