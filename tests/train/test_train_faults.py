"""Non-finite losses/gradients: collective skip (weights and optimizer state untouched), rollback, stop."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.train.trainer import TrainingError
from train_helpers import assert_same_weights, base_config, read_metrics, train_inprocess, weights


def optimizer_tensors(run_dir: Path, step: int) -> list[torch.Tensor]:
    """Every tensor in the DeepSpeed files of a checkpoint except the module weights (Adam moments, steps,
    fp32 master partitions), in a fixed order."""
    found: list[torch.Tensor] = []

    def walk(node, key=""):
        if isinstance(node, torch.Tensor):
            found.append(node)
        elif isinstance(node, dict):
            for k in sorted(node, key=str):
                if k != "module":
                    walk(node[k], str(k))
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, key)

    ds_dir = run_dir / "checkpoints" / f"step_{step:08d}" / "model" / "ds"
    for path in sorted(ds_dir.glob("*.pt")):
        # DeepSpeed's own optimizer files, just written by this test, hold non-tensor objects (its loss scaler,
        # enums) that weights_only refuses; the pipeline itself never reads them this way (DeepSpeed does).
        walk(torch.load(path, map_location="cpu", weights_only=False))
    return found


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_nonfinite_loss_and_gradient_steps_are_skipped(shards, tmp_path, zero):
    raw = base_config(shards, model={"width": 8, "nan_steps": [2], "nan_grad_steps": [4]},
                      train={"max_steps": 5, "ema_decay": 0.9}, dist={"zero_stage": zero},
                      ckpt={"every_steps": 1, "keep_last": 0})
    run = tmp_path / "run"
    assert train_inprocess(raw, run) == 0
    records = {r["step"]: r for r in read_metrics(run)}
    assert records[2]["loss"] is None and records[4]["loss"] is not None  # NaN loss logged as null
    assert [records[s]["skipped"]["nonfinite_steps"] for s in range(1, 6)] == [0, 1, 1, 2, 2]
    for skipped in (2, 4):
        before, after = f"step_{skipped - 1:08d}", f"step_{skipped:08d}"
        assert_same_weights(weights(run, before), weights(run, after))
        assert_same_weights(weights(run, before, use_ema=True), weights(run, after, use_ema=True))
        old, new = optimizer_tensors(run, skipped - 1), optimizer_tensors(run, skipped)
        assert len(old) == len(new) > 0 and all(torch.equal(a, b) for a, b in zip(old, new))
    moved = weights(run, "step_00000003")["model"]["conv.weight"]
    assert not torch.equal(moved, weights(run, "step_00000002")["model"]["conv.weight"])
    assert all(torch.isfinite(t).all() for t in weights(run)["model"].values())


def test_nonfinite_streak_rolls_back_and_recovers_exactly(shards, tmp_path):
    """NaN at steps 5, 6, 7 with max_nonfinite_streak 3: roll back to step 4 and continue; the result equals a
    run that never saw a NaN (model, optimizer, EMA, data position and RNG were all restored)."""
    common = {"train": {"max_steps": 8, "ema_decay": 0.9, "max_nonfinite_streak": 3},
              "ckpt": {"every_steps": 4, "keep_last": 0}}
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    assert train_inprocess(base_config(shards, **common), clean) == 0
    assert train_inprocess(base_config(shards, model={"width": 8, "nan_steps": [5, 6, 7]}, **common), faulty) == 0
    records = read_metrics(faulty)
    assert [r["step"] for r in records] == list(range(1, 9))  # the rolled-back records were dropped
    assert records[-1]["rollbacks"] == 1 and records[-1]["skipped"]["nonfinite_steps"] == 3
    assert [r["loss"] for r in records] == [r["loss"] for r in read_metrics(clean)]
    assert_same_weights(weights(faulty), weights(clean))
    assert_same_weights(weights(faulty, use_ema=True), weights(clean, use_ema=True))


def test_streak_without_checkpoint_stops_with_clear_error(shards, tmp_path):
    raw = base_config(shards, model={"width": 8, "nan_steps": [1, 2]}, train={"max_nonfinite_streak": 2})
    with pytest.raises(TrainingError, match="2 consecutive non-finite steps.*no checkpoint to roll back to"):
        train_inprocess(raw, tmp_path / "run")


def test_streak_recurring_after_rollback_stops(shards, tmp_path):
    raw = base_config(shards, model={"width": 8, "nan_steps": [4, 5, 6, 7]},
                      train={"max_steps": 8, "max_nonfinite_streak": 2}, ckpt={"every_steps": 3})
    with pytest.raises(TrainingError, match="again after rolling back to .*step_00000003"):
        train_inprocess(raw, tmp_path / "run")
