"""The `unet` stage on 2 gloo ranks at ZeRO-3 with activation checkpointing (EMA-applied grids and evaluation
are collective there), and the SIGKILL-then-rerun resume of a unet run, bit-identical to an uninterrupted one."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data.loader import build_eval_loader
from pipeline.data.spec import normalize_batch
from pipeline.train.stage import StageContext
from pipeline.stages.unet import UNetStage
from pipeline.models.loading import load_strict
from pipeline.train.weights import consolidated_weights, resolve_checkpoint
from train_helpers import (assert_same_weights, kill_and_resume, losses, read_metrics, train_subprocess, weights,
                           write_config)
from unet_helpers import unet_config

pytestmark = pytest.mark.slow


def test_zero3_two_ranks_with_activation_checkpointing_trains_and_grids_use_the_ema(shards, tmp_path):
    raw = unet_config(shards, super_res=True, train={"max_steps": 4, "activation_checkpointing": True,
                                                     "sample_every": 2, "ema_decay": 0.5},
                      eval={"every_steps": 2}, dist={"zero_stage": 3, "timeout_s": 120}, ckpt={"every_steps": 4})
    config = write_config(tmp_path / "z3.yaml", raw)
    run, plain = tmp_path / "run", tmp_path / "plain"
    done = train_subprocess(config, run, 2, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    assert "eval/fidelity_colour" in records[-1] and "eval/loss_t0750-0999" in records[-1]
    # Applying the EMA for evaluation and grids at step 2 and restoring the weights changes no training number.
    done = train_subprocess(config, plain, 2, "eval.every_steps=0", "train.sample_every=0", timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    assert losses(run) == losses(plain)
    assert_same_weights(weights(run), weights(plain))
    assert_same_weights(weights(run, use_ema=True), weights(plain, use_ema=True))

    # The grid rank 0 saved at step 4 must be what the consolidated EMA weights draw for rank 0's first held-out
    # batch: the EMA was applied to every ZeRO-3 partition (and re-gathered persistent parameter) while sampling.
    cfg = load_config(config)
    stage = UNetStage(cfg, StageContext(rank=0, world_size=2, device=torch.device("cpu"),
                                        compute_dtype=torch.float32))
    unet = stage.build_trainable()["unet"]
    load_strict(unet, consolidated_weights(resolve_checkpoint(run), "unet", use_ema=True), "ema")
    frozen = {name: module.eval() for name, module in stage.build_frozen().items()}
    spec = stage.sample_spec()
    loader = build_eval_loader(cfg.data, spec, batch_size=cfg.eval.batch_size, max_samples=cfg.eval.max_samples,
                               rank=0, world_size=2)
    batch = normalize_batch(next(iter(loader)), spec, "cpu", torch.float32)
    with torch.no_grad():
        grid = stage.sample_images({"unet": unet.eval()}, frozen, seed=cfg.train.seed, batch=batch)
    expected = (grid.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    saved = np.asarray(Image.open(run / "samples" / "step_00000004.png"))
    side = expected.shape[1]
    cols = int(np.ceil(np.sqrt(len(expected))))
    tiles = [saved[r * side:(r + 1) * side, c * side:(c + 1) * side] for r in range(cols) for c in range(cols)]
    diff = np.abs(np.stack(tiles[:len(expected)]).astype(int) - expected.astype(int)).max()
    assert diff <= 1, diff  # the same images (a rounding step of 1/255 at most)


def test_sigkill_then_rerun_is_bit_identical(shards, tmp_path):
    raw = unet_config(shards, train={"max_steps": 40, "sample_every": 0, "log_every": 1},
                      data={"num_workers": 2, "shuffle_buffer": 16, "crop": "random"},
                      eval={"every_steps": 0}, ckpt={"every_steps": 8, "keep_last": 0})
    config = write_config(tmp_path / "resume.yaml", raw)
    ref, run = kill_and_resume(config, tmp_path, 40)
    assert losses(run) == losses(ref)
    assert_same_weights(weights(run), weights(ref))
    assert_same_weights(weights(run, use_ema=True), weights(ref, use_ema=True))
