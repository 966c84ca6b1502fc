"""Two CPU processes (gloo) under torchrun: ZeRO-1/2/3 train and resume, EMA under ZeRO-3, collective skip and
stop decisions, world-size change, and a stuck rank ending the job at dist.timeout_s instead of hanging."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import CheckpointError
from pipeline.train.stage import StageContext
from pipeline.train.launch_env import free_port
from pipeline.train.rng import seed_all
from train_helpers import (REPO, assert_same_weights, base_config, latest_name, losses, read_metrics,
                           start_subprocess, subprocess_env, train_inprocess, train_subprocess, wait_for, weights,
                           write_config)
from trainer_toy_stage import ToyStage

pytestmark = pytest.mark.slow


def two_rank_config(shards: Path, tmp_path: Path, name: str, zero: int, **sections) -> tuple[Path, dict]:
    """Constant LR after warmup (so a run extended from 3 to 6 steps sees the LRs of a 6-step run)."""
    defaults = {"model": {"width": 8, "two_part": zero >= 2},
                "optim": {"lr": 0.01, "warmup_steps": 2, "schedule": "constant"},
                "train": {"max_steps": 3, "ema_decay": 0.8}, "dist": {"zero_stage": zero, "timeout_s": 60},
                "ckpt": {"every_steps": 1, "keep_last": 0}, "eval": {"every_steps": 3}}
    raw = base_config(shards, **{**defaults, **sections})
    return write_config(tmp_path / f"{name}.yaml", raw), raw


def train2(config: Path, run_dir: Path, *overrides: str) -> None:
    done = train_subprocess(config, run_dir, 2, *overrides, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-12000:]}"


def test_zero1_collective_skip_resume_and_world_size_change(shards, tmp_path):
    """NaN loss on rank 1 only at step 2: both ranks skip it (weights of step 1 == step 2); resume 3 -> 6;
    then a single process refuses to resume the 2-rank checkpoint."""
    config, raw = two_rank_config(shards, tmp_path, "z1", 1, model={"width": 8, "nan_steps": [2], "nan_rank": 1})
    run = tmp_path / "run"
    train2(config, run)
    assert latest_name(run) == "step_00000003"
    train2(config, run, "train.max_steps=6", "model.nan_steps=[]")  # the hook counts steps per process
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[1]["skipped"]["nonfinite_steps"] == 1 and records[-1]["skipped"]["nonfinite_steps"] == 1
    assert_same_weights(weights(run, "step_00000001"), weights(run, "step_00000002"))
    assert {r["step"] for r in records if "eval/mse" in r} == {3, 6}
    raw["train"]["max_steps"] = 8
    with pytest.raises(CheckpointError, match="was written by 2 ranks, this run has 1"):
        train_inprocess(raw, run)


def test_zero2_two_part_train_and_resume(shards, tmp_path):
    config, _ = two_rank_config(shards, tmp_path, "z2", 2, ckpt={"every_steps": 3, "keep_last": 1})
    run = tmp_path / "run"
    train2(config, run)
    train2(config, run, "train.max_steps=6")
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000006"]
    final = weights(run, use_ema=True)
    assert set(final) == {"generator", "critic"} and all(torch.isfinite(t).all() for t in final["critic"].values())


def _initial_weights(raw: dict, config: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The weights every rank starts from: the Trainer seeds with train.seed and builds the parts."""
    cfg = load_config(config)
    seed_all(raw["train"]["seed"])
    ctx = StageContext(rank=0, world_size=1, device=torch.device("cpu"), compute_dtype=torch.float32)
    return {k: {n: t.detach().clone() for n, t in m.state_dict().items()}
            for k, m in ToyStage(cfg, ctx).build_trainable().items()}


def test_zero3_resume_is_exact_and_ema_equals_ema_of_full_weights(shards, tmp_path):
    """ZeRO-3 keeps each rank's EMA of its own partition (ds_tensor). Consolidated, it must equal the EMA computed
    from the full weights of every step of the same run, bit for bit, across a resume (3 -> 6 steps); and the
    resumed run must equal an uninterrupted 6-step ZeRO-3 run."""
    # Persistence threshold 0: even these tiny parameters are partitioned (outside forward their .data is an empty
    # placeholder), so an EMA of .data instead of the partitions would fail here. Also exercises the JSON merge.
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    config, raw = two_rank_config(shards, tmp_path, "z3", 3, dist={"zero_stage": 3, "timeout_s": 60,
                                                                    "deepspeed_config": str(ds_json)})
    run, ref = tmp_path / "run", tmp_path / "ref"
    train2(config, run)
    assert (run / "checkpoints" / "step_00000003" / "ema_generator_rank00001.safetensors").is_file()
    train2(config, run, "train.max_steps=6")
    train2(config, ref, "train.max_steps=6")
    assert losses(run) == losses(ref)
    assert_same_weights(weights(run), weights(ref))
    assert_same_weights(weights(run, use_ema=True), weights(ref, use_ema=True))

    decay = raw["train"]["ema_decay"]
    expected = _initial_weights(raw, config)
    for step in range(1, 7):
        full = weights(run, f"step_{step:08d}")
        ema = weights(run, f"step_{step:08d}", use_ema=True)
        for part, tensors in full.items():
            for name, value in tensors.items():
                if name == "scale":  # a buffer: not averaged, exported as trained
                    expected[part][name] = value
                else:
                    expected[part][name] = torch.lerp(expected[part][name], value, 1.0 - decay)
                assert torch.equal(ema[part][name], expected[part][name]), (step, part, name)
        assert not torch.equal(ema["generator"]["conv.weight"], full["generator"]["conv.weight"])


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(shards, tmp_path):
    config, _ = two_rank_config(shards, tmp_path, "term", 0, model={"width": 8, "step_sleep_s": 0.05},
                                train={"max_steps": 200}, ckpt={"every_steps": 1000})
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    proc = start_subprocess(config, run, 2)
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 240, proc, "two steps")
    rank1 = [p for p in _children(proc.pid) if _rank_of(p) == 1]
    assert rank1, "rank 1 process not found"
    os.kill(rank1[0], signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    last = read_metrics(run)[-1]["step"]
    assert latest_name(run) == f"step_{last:08d}" and last < 200
    ckpt = run / "checkpoints" / latest_name(run)
    assert (ckpt / "client_rank00000.pt").is_file() and (ckpt / "client_rank00001.pt").is_file()


def test_stuck_rank_fails_the_job_at_the_collective_timeout(shards, tmp_path):
    """Rank 1 hangs at step 2 (no launcher to clean up): rank 0 must exit with a clear error after
    dist.timeout_s instead of waiting forever."""
    config, _ = two_rank_config(shards, tmp_path, "hang", 0, model={"width": 8, "hang_at_step": 2},
                                dist={"zero_stage": 0, "timeout_s": 10})
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = subprocess_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(config), "--run-dir",
                                       str(tmp_path / "run")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    try:
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=240)
        assert procs[0].returncode == 1, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "dist.timeout_s=10" in last, err[-3000:]
        assert time.monotonic() - start < 200
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
