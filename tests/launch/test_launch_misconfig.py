"""A misconfigured launch fails on every rank with one clear line, within dist.timeout_s plus start-up, never hangs:
too few processes for WORLD_SIZE, a master nobody listens on, a MASTER_ADDR that does not resolve or is missing,
a node missing from a torchrun rendezvous, ranks with different configs or code, and a RUN_DIR not shared."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch_helpers import LAUNCH, finish, kill, last_line, script_env, start, tail
from pipeline.errors import PipelineError
from pipeline.train.launch_env import free_port
from train_helpers import REPO, base_config, subprocess_env, write_config

TIMEOUT_S = 10  # dist.timeout_s here
MARGIN_S = 90  # interpreter + torch + DeepSpeed start-up on a busy 2-core machine


def misconfig_config(shards: Path, tmp_path: Path) -> Path:
    return write_config(tmp_path / "run.yaml", base_config(shards, dist={"zero_stage": 0, "timeout_s": TIMEOUT_S}))


def start_rank(config: Path, tmp_path: Path, name: str, rank: int, world: int, master: str | None, port: int,
               run_dir: Path, *overrides: str, cwd: Path = REPO) -> tuple[subprocess.Popen, Path]:
    """`python -m pipeline train` as rank `rank` of `world`, environment as a launcher would set it."""
    env = subprocess_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_PORT=str(port))
    if master is not None:
        env["MASTER_ADDR"] = master
    sets = [a for o in overrides for a in ("--set", o)]
    log = tmp_path / f"{name}-rank{rank}.log"
    cmd = [sys.executable, "-m", "pipeline", "train", config, "--run-dir", run_dir, *sets]
    return start(cmd, env, log, cwd=cwd), log


def ended_with(started: list[tuple[subprocess.Popen, Path]], begin: float, limit: float) -> list[str]:
    """Every process's exit: non-zero, within `limit` s of `begin`; returns their last output lines."""
    try:
        lines = []
        for proc, log in started:
            code = finish(proc, max(limit - (time.monotonic() - begin), 1))
            assert code != 0, tail(log)
            lines.append(last_line(log))
        return lines
    finally:
        kill([proc for proc, _ in started])


@pytest.mark.slow
def test_a_process_group_that_cannot_form_fails_within_the_timeout(shards, tmp_path):
    """Run side by side (each waits out its timeout): WORLD_SIZE=3 with two processes; rank 1 of 2 whose master
    never starts; one node of an NNODES=2 torchrun job (its rendezvous times out after RDZV_TIMEOUT)."""
    config = misconfig_config(shards, tmp_path)
    port, lonely = free_port(), free_port()
    begin = time.monotonic()
    short = [start_rank(config, tmp_path, "world3", rank, 3, "127.0.0.1", port, tmp_path / "a") for rank in (0, 1)]
    short.append(start_rank(config, tmp_path, "nomaster", 1, 2, "127.0.0.1", lonely, tmp_path / "b"))
    env = script_env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                     RDZV_ID="alone", RDZV_TIMEOUT=str(TIMEOUT_S))
    node_log = tmp_path / "alone.log"
    node = start([LAUNCH / "torchrun.sh", config, "--run-dir", tmp_path / "c"], env, node_log)
    lines = ended_with([*short, (node, node_log)], begin, TIMEOUT_S + MARGIN_S)
    for line in lines[:2]:
        assert line.startswith("error: rank ") and f"/3: no process group at 127.0.0.1:{port} within " \
            f"dist.timeout_s={TIMEOUT_S} s" in line and "start all 3 processes (WORLD_SIZE=3)" in line, line
    assert lines[2].startswith("error: rank 1/2: no process group at ") and "MASTER_ADDR:MASTER_PORT" in lines[2]
    assert "RendezvousTimeoutError" in node_log.read_text(), tail(node_log)


@pytest.mark.slow
def test_master_addr_missing_or_unresolvable_fails_at_once(shards, tmp_path):
    config = misconfig_config(shards, tmp_path)
    port = free_port()
    begin = time.monotonic()
    started = [start_rank(config, tmp_path, "dns", rank, 2, "no-such-host.invalid", port, tmp_path / "a")
               for rank in (0, 1)]
    started.append(start_rank(config, tmp_path, "none", 1, 2, None, port, tmp_path / "b"))
    lines = ended_with(started, begin, MARGIN_S)  # no waiting for any timeout
    for rank, line in enumerate(lines[:2]):
        assert line.startswith(f"error: rank {rank}/2: MASTER_ADDR=no-such-host.invalid (from torchrun) does not "
                               "resolve"), line
    assert lines[2].startswith("error: RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not"), lines[2]


def _copy_with_edited_source(tmp_path: Path) -> Path:
    """A second checkout of the package in which one file differs (another code version on one node)."""
    root = tmp_path / "other_checkout"
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    with (root / "pipeline" / "train" / "step.py").open("a") as handle:
        handle.write("# edited on one node\n")
    return root


DISAGREEMENTS = {
    "config": ("ranks were started with different configs: optim.lr is 0.01 on rank 0 but 0.02 on rank 1; start "
               "every node with the same CONFIG and --set overrides"),
    "code": ("ranks run different code: pipeline/train/step.py differs between rank 0 and rank 1; run the same "
             "checkout and package versions on every node"),
    "run_dir": "is not shared by all ranks: rank(s) [1] do not see a file rank 0 wrote there",
}


@pytest.mark.slow
@pytest.mark.parametrize("what", sorted(DISAGREEMENTS))
def test_ranks_that_disagree_fail_on_every_rank_naming_the_difference(what, shards, tmp_path):
    config = misconfig_config(shards, tmp_path)
    port = free_port()
    rank1_dir = tmp_path / ("other_node_run" if what == "run_dir" else "run")
    lr = "optim.lr=0.02" if what == "config" else "optim.lr=0.01"
    cwd = _copy_with_edited_source(tmp_path) if what == "code" else REPO  # `python -m pipeline` imports from cwd
    begin = time.monotonic()
    started = [start_rank(config, tmp_path, what, 0, 2, "127.0.0.1", port, tmp_path / "run", "optim.lr=0.01"),
               start_rank(config, tmp_path, what, 1, 2, "127.0.0.1", port, rank1_dir, lr, cwd=cwd)]
    for line in ended_with(started, begin, TIMEOUT_S + MARGIN_S):
        assert line.startswith("error: ") and DISAGREEMENTS[what] in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class TwoRankView:
    """What the Trainer's start-up sees on rank 0 when rank 1 resolved another checkpoint (a RUN_DIR that is a
    different folder on its node, e.g. node-local disk with an older run)."""

    rank, world_size, device = 0, 2, torch.device("cpu")

    def gather_objects(self, obj):
        return [obj, "/local/disk/of/node1/run/checkpoints/step_00000004"]


def test_trainer_refuses_ranks_that_see_different_checkpoints(shards, tmp_path):
    from pipeline.config import load_config
    from pipeline.train.setup import default_data_sources
    from pipeline.train.signals import StopRequest
    from pipeline.train.trainer import Trainer

    cfg = load_config(misconfig_config(shards, tmp_path))
    with pytest.raises(PipelineError, match="ranks see different checkpoints .*RUN_DIR must be on a filesystem shared"):
        Trainer(cfg, tmp_path / "run", TwoRankView(), StopRequest(), default_data_sources())
