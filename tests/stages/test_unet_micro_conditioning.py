"""SDXL size and crop micro-conditioning (model.micro_conditioning): the embedding reaches the U-Net, sampling
defaults to "uncropped, original = target", the bundle carries the setting, and the bucketed demo config trains
and samples with it on."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import pipeline.sampling.cascade as cascade
from pipeline.cli.main import main
from pipeline.diffusion.samplers import SamplerConfig
from pipeline.diffusion.schedules import DiffusionConfig, build_schedule
from pipeline.errors import ConfigError, UsageError
from pipeline.export import export_run
from pipeline.models.unet import (Conditioning, class_vector, default_sizes, null_condition, size_embedding,
                                  unet_forward)
from pipeline.sampling.cascade import CascadeLevel, SamplingConfig, sample_level
from pipeline.sampling.text2image import Text2Image
from train_helpers import read_metrics, train_inprocess
from unet_helpers import tiny_unet, unet_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "unet_buckets.yaml"
COND = Conditioning(text_dim=8, pooled_text=True, size_dim=6)


def _inputs(batch: int) -> dict[str, torch.Tensor]:
    return {"text": torch.randn(batch, 5, 8), "mask": torch.ones(batch, 5, dtype=torch.bool)}


def test_size_embedding_matches_an_fp64_reference_and_changes_the_output():
    sizes = torch.randint(0, 2048, (3, 6))
    dim = 7  # odd: one zero feature per count
    got = size_embedding(sizes, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = sizes.double()[..., None] * freqs
    ref = torch.cat([args.sin(), args.cos(), torch.zeros(3, 6, 1, dtype=torch.float64)], dim=-1).flatten(1)
    # float32 arguments up to 2048 rad: an ulp of 2048 is 2.4e-4, so features agree to about that
    torch.testing.assert_close(got.double(), ref, atol=5e-4, rtol=0)

    unet = tiny_unet(COND)
    inputs = _inputs(2)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    a = {**inputs, "sizes": default_sizes(2, 8, 8)}
    b = {**inputs, "sizes": default_sizes(2, 8, 8, original=(6, 16), crop_top_left=(0, 3))}
    assert class_vector(COND, a).shape == (2, 8 + 6 * 6)
    with torch.no_grad():
        out_a, out_b = unet_forward(unet, COND, x, t, a), unet_forward(unet, COND, x, t, b)
    assert (out_a - out_b).abs().max() > 1e-4
    drop = torch.tensor([True, False])
    assert torch.equal(null_condition(a, drop)["sizes"], a["sizes"])  # kept unless asked for
    nulled = null_condition(a, drop, keys=("text", "sizes"))["sizes"]
    assert nulled[0].eq(0).all() and torch.equal(nulled[1], a["sizes"][1])


def _level(unet: torch.nn.Module, drop_sizes: bool) -> CascadeLevel:
    diffusion = DiffusionConfig()
    return CascadeLevel(name="base", unet=unet, cond=COND, schedule=build_schedule(diffusion, 8),
                        target=diffusion.target, resolution=8, grid=(3, 8, 8),
                        defaults=SamplingConfig(sampler=SamplerConfig(name="ddim", steps=2), guidance=3.0),
                        drop_sizes=drop_sizes)


@pytest.mark.parametrize("drop_sizes", [False, True])
def test_sampling_defaults_to_uncropped_original_equal_target(drop_sizes, monkeypatch):
    unet = tiny_unet(COND)
    inputs = _inputs(2)
    seen: list[torch.Tensor] = []
    forward = cascade.unet_forward

    def spy(net, cond, x, t, c):
        seen.append(c["sizes"].clone())
        return forward(net, cond, x, t, c)

    monkeypatch.setattr(cascade, "unet_forward", spy)
    default = sample_level(_level(unet, drop_sizes), inputs, seed=1)
    assert seen and all(s.shape == (4, 6) for s in seen)  # guidance: conditional and unconditional halves at once
    assert all(torch.equal(s[:2], default_sizes(2, 8, 8)) for s in seen)
    expected_uncond = torch.zeros(2, 6, dtype=torch.int64) if drop_sizes else default_sizes(2, 8, 8)
    assert all(torch.equal(s[2:], expected_uncond) for s in seen)
    explicit = sample_level(_level(unet, drop_sizes), {**inputs, "sizes": default_sizes(2, 8, 8)}, seed=1)
    torch.testing.assert_close(default, explicit, atol=0, rtol=0)
    other = sample_level(_level(unet, drop_sizes), {**inputs, "sizes": default_sizes(2, 8, 8, original=(4, 16))},
                         seed=1)
    assert (other - default).abs().max() > 1e-4


def test_micro_conditioning_needs_buckets(shards, tmp_path):
    raw = unet_config(shards, model={"micro_conditioning": {"enabled": True}}, train={"max_steps": 1})
    with pytest.raises(ConfigError, match="model.micro_conditioning.enabled needs data.buckets.enabled"):
        train_inprocess(raw, tmp_path / "run")


def test_bucketed_demo_with_micro_conditioning_trains_exports_and_samples(tmp_path):
    shards = tmp_path / "mixed"
    assert main(["shards", "synthetic", "--out", str(shards), "--num-samples", "60", "--shard-size", "60",
                 "--resolution", "16", "--aspect-ratios", "1:1,16:9,9:16"]) == 0
    raw = yaml.safe_load(CONFIG.read_text())
    raw["data"]["urls"] = str(shards)
    raw["data"]["num_workers"] = 0
    assert raw["model"]["micro_conditioning"]["enabled"]  # the config has it on
    raw["model"]["micro_conditioning"].update(embed_dim=8, drop_with_text=True)
    raw["model"]["unet"].update(channels=16, norm_groups=8, head_width=16)
    raw["train"].update(max_steps=2, micro_batch_size=4, log_every=1, sample_every=0)
    raw["ckpt"]["every_steps"] = 2
    assert train_inprocess(raw, tmp_path / "run") == 0
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run"))
    export_run(tmp_path / "run", tmp_path / "bundle")
    meta = json.loads((tmp_path / "bundle" / "unet_base" / "t2i_stage.json").read_text())
    assert meta["conditioning"]["size_dim"] == 8
    assert meta["model"]["micro_conditioning"] == {"enabled": True, "embed_dim": 8, "drop_with_text": True}
    t2i = Text2Image.from_bundle(tmp_path / "bundle")
    assert t2i.levels[0].cond.size_dim == 8 and t2i.levels[0].drop_sizes
    prompt = "a large red circle on the left"
    default = t2i.generate(prompt, steps=2, seed=0)
    same = t2i.generate(prompt, steps=2, seed=0, original_size=(16, 16), crop_top_left=(0, 0))
    cropped = t2i.generate(prompt, steps=2, seed=0, original_size=(9, 32), crop_top_left=(0, 5))
    torch.testing.assert_close(default, same, atol=0, rtol=0)
    assert default.shape == (1, 3, 16, 16) and (cropped - default).abs().max() > 1e-4
    with pytest.raises(UsageError, match="crop_top_left must be"):
        t2i.generate(prompt, steps=2, crop_top_left=(-1, 0))
    # the same conditioning from the command line: `sample --original-size H,W --crop-top-left TOP,LEFT`
    out = tmp_path / "cropped.png"
    assert main(["sample", str(tmp_path / "bundle"), "--prompt", prompt, "--out", str(out), "--steps", "2",
                 "--original-size", "9,32", "--crop-top-left", "0,5"]) == 0
    with Image.open(out) as written:
        expected = ((cropped[0].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
        assert (torch.from_numpy(np.array(written)).int() - expected.int()).abs().max() <= 1
    with pytest.raises(SystemExit) as bad:
        main(["sample", str(tmp_path / "bundle"), "--prompt", prompt, "--out", str(out), "--original-size", "9"])
    assert bad.value.code == 2
