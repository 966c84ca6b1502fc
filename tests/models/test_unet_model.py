"""The U-Net builder and the conditioning convention (pipeline/models/unet.py): shipped configs build, the T5
padding mask makes padded token embeddings irrelevant, the null condition, and clear config errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.models.diffusers_attention import install_attention
from pipeline.models.unet import Conditioning, UNetConfig, build_unet, masked_mean, null_condition, unet_forward
from pipeline.stages.unet import UNetStage
from pipeline.train.stage import StageContext
from unet_helpers import tiny_unet

REPO = Path(__file__).resolve().parents[2]

CTX = StageContext(rank=0, world_size=1, device=torch.device("cpu"), compute_dtype=torch.float32)


def inputs(batch: int, length: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 2:] = False
    text = torch.randn(batch, length, dim, generator=gen) * mask[..., None]
    return {"text": text, "mask": mask, "image_embed": torch.randn(batch, 12, generator=gen),
            "low_res": torch.randn(batch, 3, 8, 8, generator=gen), "level": torch.tensor([0.1, 0.7, 0.3])}


@pytest.mark.parametrize("cond", [Conditioning(24, pooled_text=True), Conditioning(24, pooled_text=False),
                                  Conditioning(24, True, image_embed_dim=12, level_dim=8, low_res_channels=3)])
def test_padded_token_embeddings_change_nothing(cond):
    unet = tiny_unet(cond)
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([10.0, 500.0, 999.0])
    base = inputs(3, 9, 24, seed=1)
    garbage = dict(base)
    garbage["text"] = torch.where(base["mask"][..., None], base["text"], 50 * torch.randn_like(base["text"]))
    with torch.no_grad():
        a = unet_forward(unet, cond, x, t, base)
        b = unet_forward(unet, cond, x, t, garbage)
        shuffled = dict(base, text=base["text"].flip(0), mask=base["mask"].flip(0))
        c = unet_forward(unet, cond, x, t, shuffled)
    assert torch.equal(a, b)  # exactly: padded positions never reach the output
    assert not torch.allclose(a, c)  # while the real tokens do matter


def test_masked_mean_ignores_padding_and_null_condition_is_one_zero_token():
    data = inputs(3, 9, 24, seed=2)
    torch.testing.assert_close(masked_mean(data["text"], data["mask"])[1], data["text"][1, :2].mean(0))
    drop = torch.tensor([True, False, True])
    out = null_condition(data, drop)
    assert torch.equal(out["text"][0], torch.zeros(9, 24)) and torch.equal(out["text"][1], data["text"][1])
    assert out["mask"][0].tolist() == [True] + [False] * 8 and torch.equal(out["mask"][1], data["mask"][1])
    assert torch.equal(out["image_embed"][2], torch.zeros(12)) and torch.equal(out["low_res"], data["low_res"])
    text_only = null_condition(data, drop, keys=("text",))
    assert torch.equal(text_only["image_embed"], data["image_embed"])


@pytest.mark.parametrize("name", ["base64", "sr256", "sr1024"])
def test_real_configs_build_on_the_meta_device(name, capsys):
    cfg = load_config(REPO / "configs" / "unet" / f"{name}.yaml")
    stage = UNetStage(cfg, CTX)
    with torch.device("meta"):
        unet = stage.build_trainable()["unet"]
    params = sum(p.numel() for p in unet.parameters())
    with capsys.disabled():
        print(f"\n{name}: {params / 1e6:.1f} M parameters, {cfg.data.resolution} px, "
              f"T5 width {unet.config.encoder_hid_dim}")
    assert unet.config.encoder_hid_dim == 4096  # T5-XXL tokens
    assert 200e6 < params < 600e6  # "a few hundred M" each


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.unet.norm_groups"):
        UNetConfig(channels=24, norm_groups=16)
    with pytest.raises(ConfigError, match="model.unet.head_width"):
        UNetConfig(channels=32, head_width=24, norm_groups=8)
    with pytest.raises(ConfigError, match="model.unet.channel_mult"):
        UNetConfig(channel_mult=())
