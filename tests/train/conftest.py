"""Fixtures of the Trainer tests (helpers live in train_helpers.py, the test stage in trainer_toy_stage.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.synthetic import write_synthetic_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Real synthetic WebDataset shards at 16 px, built once: train (8 x 24 samples) and heldout (2 x 16)."""
    root = tmp_path_factory.mktemp("train_shards")
    write_synthetic_shards(root / "train", 192, 24, 16, 0, "train", "png")
    write_synthetic_shards(root / "heldout", 32, 16, 16, 1, "heldout", "png")
    return root
