"""The `prior` stage on 2 gloo ranks at ZeRO-3 (frozen clip_mean/clip_std partitioned like every parameter, read
by a gather; evaluation samples through partitioned plain modules), and SIGKILL-then-rerun resume, bit-identical
to an uninterrupted run."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.export import export_run
from prior_helpers import expected_stats, export_tiny_clip, prior_config
from train_helpers import (assert_same_weights, kill_and_resume, losses, read_metrics, train_subprocess, weights,
                           write_config)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return export_tiny_clip(tmp_path_factory.mktemp("dist_clip") / "clip", seed=5)


def test_zero3_two_ranks_trains_evaluates_and_exports(shards, clip_dir, tmp_path):
    raw = prior_config(shards, clip_dir, train={"max_steps": 4, "ema_decay": 0.5}, eval={"every_steps": 2},
                       dist={"zero_stage": 3, "timeout_s": 120})
    config = write_config(tmp_path / "z3.yaml", raw)
    run = tmp_path / "run"
    done = train_subprocess(config, run, 2, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records)
    assert all(f"eval/{k}" in records[-1] for k in ("prior_cos", "baseline_cos", "prior_retrieval@1", "loss"))
    mean, std = expected_stats(clip_dir, shards / "train", 64)
    for use_ema in (False, True):  # consolidated from the ZeRO-3 partitions (frozen fragments included)
        state = weights(run, use_ema=use_ema)["prior"]
        torch.testing.assert_close(state["clip_mean"].reshape(-1), mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(state["clip_std"].reshape(-1), std, atol=1e-6, rtol=1e-5)
    component = export_run(run, tmp_path / "bundle")
    assert (component / "diffusion_pytorch_model.safetensors").is_file()


def test_sigkill_then_rerun_is_bit_identical(shards, clip_dir, tmp_path):
    raw = prior_config(shards, clip_dir, train={"max_steps": 24, "log_every": 1, "ema_decay": 0.9},
                       data={"num_workers": 2, "shuffle_buffer": 16, "crop": "random"},
                       eval={"every_steps": 0}, ckpt={"every_steps": 8, "keep_last": 0})
    config = write_config(tmp_path / "resume.yaml", raw)
    ref, run = kill_and_resume(config, tmp_path, 24)
    assert losses(run) == losses(ref)
    assert_same_weights(weights(run), weights(ref))
    assert_same_weights(weights(run, use_ema=True), weights(ref, use_ema=True))
