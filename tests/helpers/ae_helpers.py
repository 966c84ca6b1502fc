"""Tiny `autoencoder` stage configs for the tests (on top of the Trainer tests' base config)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, DataConfig
from pipeline.models.autoencoder import AutoencoderConfig
from pipeline.models.discriminator import DiscriminatorConfig
from pipeline.stages.autoencoder import AutoencoderStage, AutoencoderStageConfig
from pipeline.train.stage import StageContext
from train_helpers import base_config

TINY_AE = {"block_widths": [8, 16, 16], "layers_per_block": 1, "latent_channels": 4, "norm_groups": 4,
           "mid_attention": True, "codebook_size": 32, "restart_after_steps": 2}
TINY_DISC = {"channels": 8, "layers": 2, "norm_groups": 4}


def ae_config(shards: Path, *, kind: str = "kl", disc_start_step: int = 3,
              **sections: dict[str, Any]) -> dict[str, Any]:
    """A 16 px f=4 autoencoder + PatchGAN: 6 steps (GAN on from step disc_start_step + 1), eval and grid at 3 and 6."""
    model: dict[str, Any] = {"autoencoder": {**TINY_AE, "kind": kind}, "discriminator": TINY_DISC,
                             "loss": {"disc_start_step": disc_start_step}, "grid_images": 4}
    raw = base_config(shards, model=model, train={"max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 1,
                                                   "log_every": 1, "sample_every": 3, "ema_decay": 0.0},
                      eval={"every_steps": 3, "max_samples": 8, "batch_size": 4}, optim={"lr": 1e-3})
    raw["stage"] = "autoencoder"
    extra = sections.pop("model", {})
    raw["model"] = {**model, **{k: ({**model.get(k, {}), **v} if isinstance(v, dict) else v)
                                for k, v in extra.items()}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def export_tiny_autoencoder(out: Path, kind: str = "kl") -> None:
    """A random tiny 16 px f=4 autoencoder with non-trivial latent scaling, written by the stage's own export."""
    torch.manual_seed(0)
    model = AutoencoderStageConfig(autoencoder=AutoencoderConfig(**{**TINY_AE, "kind": kind}),
                                   discriminator=DiscriminatorConfig(**TINY_DISC))
    stage = AutoencoderStage(Config(stage="autoencoder", model=model, data=DataConfig(resolution=16)),
                             StageContext(rank=0, world_size=1, device=torch.device("cpu"),
                                          compute_dtype=torch.float32))
    modules = stage.build_trainable()
    modules["generator"].latent_moments.copy_(torch.tensor([1.0, 0.3, 4.0], dtype=torch.float64))
    stage.export(modules, out)
