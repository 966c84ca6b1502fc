"""Bucketed super-resolution and latent U-Net stages: the low-res image is the same bucket at the lower resolution,
the autoencoder encodes any bucket shape, and a bucketed cascade samples a wide image end to end."""
from __future__ import annotations

import pytest
import torch

from ae_helpers import ae_config
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.export import export_run
from pipeline.models.autoencoder import load_autoencoder
from pipeline.sampling.text2image import Text2Image
from pipeline.stages.unet import UNetStage
from pipeline.text.t5 import T5Tokenize
from pipeline.train.stage import StageContext
from train_helpers import train_inprocess
from unet_helpers import unet_config

PROMPT = "a large red circle on the left"
BASE_UNET = {"channels": 16, "channel_mult": [1, 2], "attention_resolutions": [4], "head_width": 8, "norm_groups": 8}
LATENT_UNET = {"channels": 16, "channel_mult": [1, 2], "attention_resolutions": [2], "head_width": 8, "norm_groups": 8}
FAST = {"train": {"max_steps": 2, "sample_every": 0}, "eval": {"every_steps": 0}}


def _stage(raw: dict) -> UNetStage:
    ctx = StageContext(rank=0, world_size=1, device=torch.device("cpu"), compute_dtype=torch.float32)
    return UNetStage(load_config(None, base=raw), ctx)


def test_super_resolution_low_res_is_the_same_bucket_at_the_lower_resolution(shards):
    stage = _stage(unet_config(shards, super_res=True, data={"buckets": {"enabled": True, "step": 4}}))
    models, frozen = stage.build_trainable(), stage.build_frozen()
    captions = [PROMPT, "a small blue square at the top"]
    images = torch.full((2, 3, 12, 20), -1.0)
    images[:, 0, :, :10] = 1.0  # red left half, black right half: the low-res must keep it on the left
    batch = {"image": images, "caption": captions, **T5Tokenize("tiny", 16)(captions)}
    low = stage._low_res(images)
    assert low.shape == (2, 3, 6, 10)
    assert low[:, 0, :, :4].min() > 0.9 and low[:, 0, :, 6:].max() < -0.9
    inputs = stage._inputs(frozen, batch, train=True)
    assert inputs["low_res"].shape == (2, 3, 12, 20)
    out = stage.training_step(models, frozen, batch, "unet")
    assert torch.isfinite(out.loss)
    with pytest.raises(ConfigError, match="bucket 10x22 at 16 px is no whole image at the low resolution 12 px"):
        _stage(unet_config(shards, super_res=True, model={"super_res": {"low_res": 12, "level_embed_dim": 8}},
                           data={"buckets": {"enabled": True, "shapes": [[10, 22]], "step": 2}}))


def test_bucketed_pixel_cascade_samples_a_wide_image(shards, tmp_path):
    base = unet_config(shards, data={"resolution": 8, "buckets": {"enabled": True, "step": 2, "min_side": 4,
                                                                  "max_side": 16}},
                       model={"unet": BASE_UNET}, **FAST)
    sr = unet_config(shards, super_res=True, data={"buckets": {"enabled": True, "step": 4}}, **FAST)
    for name, raw in (("base", base), ("sr", sr)):
        assert train_inprocess(raw, tmp_path / name) == 0
        export_run(tmp_path / name, tmp_path / "bundle")
    t2i = Text2Image.from_bundle(tmp_path / "bundle")
    images = t2i.generate(PROMPT, steps=2, height=8, width=32)
    assert images.shape == (1, 3, 8, 32) and torch.isfinite(images).all()


def test_latent_stage_trains_on_buckets_and_samples_them(shards, tmp_path):
    assert train_inprocess(ae_config(shards, **FAST), tmp_path / "ae") == 0
    autoencoder = export_run(tmp_path / "ae", tmp_path / "bundle")
    codec = load_autoencoder(autoencoder)
    wide = torch.rand(1, 3, 8, 32) * 2 - 1
    with torch.no_grad():
        latents = codec.encode(wide)
        assert latents.shape == (1, 4, 2, 8) and codec.decode(latents).shape == (1, 3, 8, 32)
    model = {"space": "latent", "autoencoder": str(autoencoder), "unet": LATENT_UNET}
    raw = unet_config(shards, model=model, data={"buckets": {"enabled": True, "step": 8}}, **FAST)
    assert train_inprocess(raw, tmp_path / "latent") == 0
    export_run(tmp_path / "latent", tmp_path / "bundle")
    images = Text2Image.from_bundle(tmp_path / "bundle").generate(PROMPT, steps=2, height=8, width=32)
    assert images.shape == (1, 3, 8, 32)
    with pytest.raises(ConfigError, match="data.crop random: precomputed bucketed latents hold one"):
        _stage(unet_config(shards, model={**model, "latent_source": "precomputed"},
                           data={"buckets": {"enabled": True, "step": 8}, "crop": "random"}))
    with pytest.raises(ConfigError, match=r"bucket 28x8 is not divisible by 8 \(autoencoder factor 4 x 2: 2 U-Net levels"):
        _stage(unet_config(shards, model=model, data={"buckets": {"enabled": True, "step": 4}}))
