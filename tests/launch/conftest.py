"""The reference every launcher is compared with: `launch/torchrun.sh` on one node (torchrun --standalone), 2 ranks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from launch_helpers import LAUNCH, finish, launch_config, script_env, start, tail
from train_helpers import weights


@dataclass(frozen=True)
class Reference:
    config: Path
    run_dir: Path
    weights: dict[str, dict[str, torch.Tensor]]


@pytest.fixture(scope="session")
def reference(shards, tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("launch_reference")
    config = launch_config(shards, root / "launch.yaml")
    run, log = root / "ref", root / "ref.log"
    proc = start([LAUNCH / "torchrun.sh", config, "--run-dir", run], script_env(NPROC_PER_NODE="2"), log)
    assert finish(proc, 300) == 0, tail(log)
    return Reference(config, run, weights(run))
