"""A flow-matching DiT `unet` stage (configs/demo/dit_flow.yaml) on 2 gloo ranks at ZeRO-3 with per-block
activation checkpointing, and its SIGKILL-then-rerun resume, bit-identical to an uninterrupted run (the flow
timestep draws come from the checkpointed global RNG like the VP ones)."""
from __future__ import annotations

import numpy as np
import pytest

from train_helpers import (assert_same_weights, kill_and_resume, losses, read_metrics, train_subprocess, weights,
                           write_config)
from unet_helpers import dit_demo_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


def test_zero3_two_ranks_trains_a_super_resolution_dit(shards, tmp_path):
    raw = dit_demo_config(shards, super_res=True, train={"max_steps": 4, "activation_checkpointing": True,
                                                         "sample_every": 0},
                          eval={"every_steps": 4}, dist={"zero_stage": 3, "timeout_s": 120},
                          ckpt={"every_steps": 4})
    run = tmp_path / "run"
    done = train_subprocess(write_config(tmp_path / "z3.yaml", raw), run, 2, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    assert "eval/fidelity_colour" in records[-1] and "eval/loss_t0750-0999" in records[-1]
    dit = weights(run)["unet"]  # consolidated from the two ranks' ZeRO-3 partitions
    assert any(key.startswith("transformer_blocks.3.attn2.") for key in dit)  # the DiT's last cross-attention
    assert all(bool(value.isfinite().all()) for value in dit.values())


def test_sigkill_then_rerun_is_bit_identical(shards, tmp_path):
    raw = dit_demo_config(shards, train={"max_steps": 40, "sample_every": 0, "log_every": 1},
                          data={"num_workers": 2, "shuffle_buffer": 16, "crop": "random"},
                          eval={"every_steps": 0}, ckpt={"every_steps": 8, "keep_last": 0},
                          dist={"zero_stage": 0, "timeout_s": 60})
    config = write_config(tmp_path / "resume.yaml", raw)
    ref, run = kill_and_resume(config, tmp_path, 40)
    assert losses(run) == losses(ref)
    assert_same_weights(weights(run), weights(ref))
    assert_same_weights(weights(run, use_ema=True), weights(ref, use_ema=True))
