"""Exact resume with aspect-ratio buckets: 2 ranks x 2 data workers at ZeRO-2 on mixed-aspect shards, SIGKILLed
after the step-8 checkpoint (samples waiting in partly filled buckets on every rank and worker) and re-run,
ends bit-identical to an uninterrupted run."""
from __future__ import annotations

import pytest

from pipeline.data.synthetic import write_synthetic_shards
from train_helpers import assert_same_weights, base_config, kill_and_resume, losses, weights, write_config

pytestmark = pytest.mark.slow
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))


def test_bucketed_sigkill_then_rerun_is_bit_identical_two_ranks_zero2(tmp_path):
    shards = tmp_path / "shards"
    write_synthetic_shards(shards / "train", 96, 12, 16, 0, "train", "png", ASPECTS)
    write_synthetic_shards(shards / "heldout", 16, 16, 16, 1, "heldout", "png", ASPECTS)
    raw = base_config(shards, model={"width": 8, "two_part": True},
                      data={"num_workers": 2, "shuffle_buffer": 8, "crop": "random",
                            "buckets": {"enabled": True, "step": 8}},
                      train={"max_steps": 12, "micro_batch_size": 3, "grad_accum_steps": 1, "ema_decay": 0.9},
                      dist={"zero_stage": 2, "timeout_s": 60}, ckpt={"every_steps": 4, "keep_last": 0})
    config = write_config(tmp_path / "buckets.yaml", raw)
    ref, run = kill_and_resume(config, tmp_path, 12, "model.step_sleep_s=0.15", timeout=300, nproc=2)
    ref_losses, run_losses = losses(ref), losses(run)
    assert [run_losses[s] for s in range(9, 13)] == [ref_losses[s] for s in range(9, 13)]
    assert_same_weights(weights(run), weights(ref))
    assert_same_weights(weights(run, use_ema=True), weights(ref, use_ema=True))
