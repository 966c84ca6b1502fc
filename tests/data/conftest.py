"""Shared fixtures for the data-layer tests (helpers live in data_helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_helpers import good_sample, write_tar


@pytest.fixture(scope="session")
def rect_shards(tmp_path_factory) -> Path:
    """5 shards x 10 samples of 20x14 JPEGs (non-square, so random crops matter), keys s00000..s00049."""
    root = tmp_path_factory.mktemp("rect")
    for shard in range(5):
        write_tar(root / f"shard-{shard:06d}.tar", (good_sample(shard * 10 + i) for i in range(10)))
    return root
