"""model.loss_mask: the stage asks the loader for masks and weights its loss with them (full weight = no mask,
zero weight = no loss), area-averaged onto a latent grid."""
from __future__ import annotations

import torch

from pipeline.config import load_config
from pipeline.stages.unet import UNetStage
from pipeline.text.t5 import T5Tokenize
from pipeline.train.stage import StageContext
from unet_helpers import dit_demo_config

CTX = StageContext(rank=0, world_size=1, device=torch.device("cpu"), compute_dtype=torch.float32)


def test_loss_masks_weight_the_training_loss(shards):
    stage = UNetStage(load_config(None, base=dit_demo_config(shards, model={"loss_mask": True})), CTX)
    assert stage.sample_spec().loss_mask
    models, frozen = stage.build_trainable(), stage.build_frozen()
    captions = ["a large red circle on the left", "a small blue square at the top"]
    batch = {"image": torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "caption": captions, **T5Tokenize("tiny", 24)(captions)}

    def loss(mask: torch.Tensor | None) -> float:
        torch.manual_seed(4)  # the same draws (dropout, timesteps, noise) for every call
        data = dict(batch) if mask is None else {**batch, "loss_mask": mask}
        if mask is None:
            plain = UNetStage(load_config(None, base=dit_demo_config(shards)), CTX)
            return float(plain.training_step(models, frozen, data, "unet").loss.detach())
        return float(stage.training_step(models, frozen, data, "unet").loss.detach())

    full = torch.full((2, 1, 16, 16), 255, dtype=torch.uint8)
    assert loss(full) == loss(None) > 0
    assert loss(torch.zeros_like(full)) == 0.0
    half = full.clone()
    half[..., 8:] = 0
    assert 0 < loss(half) != loss(full)
    weights = stage._loss_weights({"loss_mask": half}, torch.zeros(2, 4, 4, 4))  # a 4x4 latent grid
    assert weights.shape == (2, 1, 4, 4) and torch.equal(weights[..., :2], torch.ones(2, 1, 4, 2))
    assert torch.equal(weights[..., 2:], torch.zeros(2, 1, 4, 2))
