"""Classifier-free-guidance training drops of the unet stage: every conditioning state sampling uses (nothing, text
only, image embedding only, both) gets its configured share of the samples."""
from __future__ import annotations

import pytest
import torch

from pipeline.config_schema import from_dict
from pipeline.stages.unet import guidance_dropout
from pipeline.stages.unet_config import UNetStageConfig

B, L, D, E = 20000, 3, 2, 4


def _inputs() -> dict[str, torch.Tensor]:
    return {"text": torch.rand(B, L, D) + 0.5, "mask": torch.ones(B, L, dtype=torch.bool),
            "image_embed": torch.rand(B, E) + 0.5}


def _states(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    text_null = (out["text"] == 0).all(dim=(1, 2)) & (out["mask"].sum(1) == 1) & out["mask"][:, 0]
    embed_null = (out["image_embed"] == 0).all(dim=1)
    return text_null, embed_null


def test_unclip_stage_trains_the_unconditional_state_at_cond_drop_prob_not_a_product():
    mcfg = from_dict(UNetStageConfig, {"cond_drop_prob": 0.3, "image_embed": {
        "dim": E, "clip": "clip", "drop_prob": 0.2, "text_drop_prob": 0.25}})
    text_null, embed_null = _states(guidance_dropout(_inputs(), mcfg, torch.device("cpu")))
    shares = {"both": (text_null & embed_null), "text only": (text_null & ~embed_null),
              "embed only": (~text_null & embed_null), "neither": (~text_null & ~embed_null)}
    # Tolerance 0.015 is over 4 sigma at B = 20000. P(both) = 0.3 + 0.7 * 0.2 * 0.25; text dropped alone = 0.7 * 0.8 * 0.25; embedding alone = 0.7 * 0.2 * 0.75
    expected = {"both": 0.335, "text only": 0.14, "embed only": 0.105, "neither": 0.42}
    for name, mask in shares.items():
        assert mask.float().mean().item() == pytest.approx(expected[name], abs=0.015), name


def test_text_only_stage_drops_the_text_alone():
    mcfg = from_dict(UNetStageConfig, {"cond_drop_prob": 0.5})
    inputs = _inputs()
    del inputs["image_embed"]
    out = guidance_dropout(inputs, mcfg, torch.device("cpu"))
    text_null = (out["text"] == 0).all(dim=(1, 2))
    assert text_null.float().mean().item() == pytest.approx(0.5, abs=0.015)
    kept = ~text_null
    assert torch.equal(out["text"][kept], inputs["text"][kept]) and out["mask"][kept].all()
