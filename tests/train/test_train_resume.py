"""Exact auto-resume after SIGKILL, and checkpoint-then-exit on SIGTERM (real `python -m pipeline train` runs).

The SIGKILL experiment by hand (from the repository root; CONFIG as written by resume_config below)::

    export PYTHONPATH=tests/helpers                                # the test stage trainer_toy_stage:ToyStage
    python -m pipeline train CONFIG --run-dir ref                  # uninterrupted reference
    setsid python -m pipeline train CONFIG --run-dir run --set model.step_sleep_s=0.15 & PID=$!
    until grep -qx step_00000008 run/checkpoints/latest 2>/dev/null; do sleep 0.05; done
    kill -9 -- -$PID                                               # the trainer and its data workers
    python -m pipeline train CONFIG --run-dir run                  # resumes from step 8
    python -m pipeline export ref --out ref_bundle && python -m pipeline export run --out run_bundle
    cmp ref_bundle/toy/model.safetensors run_bundle/toy/model.safetensors   # identical bytes
"""
from __future__ import annotations

import signal
from pathlib import Path

from pipeline.export import export_run
from pipeline.manifest import verify_checkpoint
from train_helpers import (assert_same_weights, base_config, kill_and_resume, latest_name, losses, read_metrics,
                           start_subprocess, wait_for, weights, write_config)


def resume_config(shards: Path, tmp_path: Path, **sections) -> Path:
    """12 steps, checkpoints every 4, 2 data workers with shuffling and random crops, EMA."""
    defaults = {"model": {"width": 8},
                "data": {"num_workers": 2, "shuffle_buffer": 16, "shuffle_shards": True, "crop": "random"},
                "train": {"max_steps": 12, "ema_decay": 0.9}, "ckpt": {"every_steps": 4, "keep_last": 0}}
    raw = base_config(shards, **{**defaults, **sections})
    return write_config(tmp_path / "resume.yaml", raw)


def test_sigkill_then_rerun_is_bit_identical(shards, tmp_path):
    config = resume_config(shards, tmp_path)
    # >= 0.3 s per step (sleeps do not change the numbers), so steps 9-12 cannot all finish before the kill
    ref, run = kill_and_resume(config, tmp_path, 12, "model.step_sleep_s=0.15", timeout=240)
    ref_losses, run_losses = losses(ref), losses(run)
    assert [run_losses[s] for s in range(9, 13)] == [ref_losses[s] for s in range(9, 13)]
    assert_same_weights(weights(run), weights(ref))
    assert_same_weights(weights(run, use_ema=True), weights(ref, use_ema=True))
    a = export_run(ref, tmp_path / "bundle_ref")
    b = export_run(run, tmp_path / "bundle_run")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_sigterm_checkpoints_at_next_step_and_exits_cleanly(shards, tmp_path):
    config = resume_config(shards, tmp_path, model={"width": 8, "step_sleep_s": 0.05},
                           train={"max_steps": 200, "ema_decay": 0.9}, ckpt={"every_steps": 1000, "keep_last": 0})
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    proc = start_subprocess(config, run)
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 180, proc, "two steps")
    proc.send_signal(signal.SIGTERM)  # the trainer only (its data workers are not signalled)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    last = read_metrics(run)[-1]["step"]
    assert 2 <= last < 200 and latest_name(run) == f"step_{last:08d}"
    verify_checkpoint(run / "checkpoints" / latest_name(run))

    # Resumes from there; with ckpt.preempt_exit_code the stop is reported to the scheduler as "requeue me".
    proc = start_subprocess(config, run, 1, "ckpt.preempt_exit_code=75")
    wait_for(lambda: len(metrics.read_text().splitlines()) >= last + 2, 180, proc, "two more steps")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > last
    assert latest_name(run) == f"step_{steps[-1]:08d}"
