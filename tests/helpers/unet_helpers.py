"""Tiny `unet` stage configs for the tests (on top of the Trainer tests' base config), and a tiny U-Net."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.models.diffusers_attention import install_attention
from pipeline.models.unet import Conditioning, UNetConfig, build_unet
from train_helpers import REPO, base_config

TINY_UNET = {"channels": 16, "channel_mult": [1, 2], "blocks_per_level": 1, "attention_resolutions": [8],
             "head_width": 8, "norm_groups": 8}


def unet_config(shards: Path, *, super_res: bool = False, **sections: dict[str, Any]) -> dict[str, Any]:
    """A 16 px base (or 8 -> 16 px super-resolution) stage with the tiny T5: 6 steps, eval and grid at step 3."""
    model: dict[str, Any] = {"name": "sr16" if super_res else "base", "unet": TINY_UNET,
                             "text_encoder": {"path": "tiny", "max_length": 16},
                             "sampling": {"sampler": {"name": "ddim", "steps": 4}, "guidance": 3.0},
                             "eval_prompts": 4, "grid_images": 4}
    if super_res:
        model["super_res"] = {"low_res": 8, "level_embed_dim": 8}
    raw = base_config(shards, model=model, train={"max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 1,
                                                   "log_every": 1, "sample_every": 3, "ema_decay": 0.9},
                      eval={"every_steps": 3, "max_samples": 8, "batch_size": 4}, optim={"lr": 1e-3})
    raw["stage"] = "unet"
    raw["model"] = {**model, **sections.pop("model", {})}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def tiny_unet(cond: Conditioning, side: int = 8, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = UNetConfig(channels=16, channel_mult=(1, 2), attention_resolutions=(side // 2,), head_width=8,
                     norm_groups=8)
    unet = build_unet(cfg, sample_size=side, in_channels=3, out_channels=3, cond=cond).eval()
    install_attention(unet, "sdpa")
    return unet


def dit_demo_config(shards: Path, *, super_res: bool = False, **sections: dict[str, Any]) -> dict[str, Any]:
    """configs/demo/dit_flow.yaml as shipped, with the test's shards and a 6-step schedule (eval/grid at 3);
    `sections` update the sections they name."""
    raw = yaml.safe_load((REPO / "configs" / "demo" / "dit_flow.yaml").read_text(encoding="utf-8"))
    raw["data"].update(urls=str(shards / "train"), eval_urls=str(shards / "heldout"), num_workers=0,
                       shuffle_buffer=16)
    raw["train"] = {"max_steps": 6, "micro_batch_size": 4, "log_every": 1, "sample_every": 3, "ema_decay": 0.9,
                    "seed": 0}
    raw["eval"] = {"every_steps": 3, "max_samples": 8, "batch_size": 4}
    raw["ckpt"] = {"every_steps": 3, "keep_last": 0}
    raw["log"] = {"tensorboard": False, "progress_bar": False}
    raw["model"].update(eval_prompts=4, grid_images=4)
    raw["model"]["sampling"]["sampler"]["steps"] = 4
    if super_res:
        raw["model"].update(name="sr16", super_res={"low_res": 8, "level_embed_dim": 8})
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw
