"""Latent-space U-Net stages on a tiny trained autoencoder: a latent base stage trains (latents encoded per batch,
or precomputed by `shards precompute --encoder latents:AE_DIR`) and its samples decode to images; a latent
super-resolution stage (low-res image concatenated at latent resolution) samples through the bundle, decoded by
the bundle's autoencoder, which must be the one the stage was trained on."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ae_helpers import ae_config
from pipeline.cli.main import main
from pipeline.diffusion.schedules import DiffusionConfig, build_schedule
from pipeline.errors import CheckpointError
from pipeline.export import export_run
from pipeline.sampling.text2image import Text2Image
from train_helpers import read_metrics, train_inprocess
from unet_helpers import unet_config

LATENT_UNET = {"channels": 16, "channel_mult": [1, 2], "attention_resolutions": [2], "head_width": 8, "norm_groups": 8}


@pytest.fixture(scope="module")
def autoencoder(shards, tmp_path_factory):
    """A tiny KL autoencoder (16 px -> 4 x 4 x 4 latents) trained a few steps and exported."""
    root = tmp_path_factory.mktemp("latent_ae")
    assert train_inprocess(ae_config(shards, train={"max_steps": 3, "sample_every": 0}, eval={"every_steps": 0}),
                           root / "ae") == 0
    return export_run(root / "ae", root / "bundle")


def latent_config(shards, autoencoder, **sections):
    model = {"space": "latent", "autoencoder": str(autoencoder), "unet": LATENT_UNET, **sections.pop("model", {})}
    return unet_config(shards, model=model, **sections)


def test_latent_base_trains_and_its_samples_decode(shards, autoencoder, tmp_path):
    """...with a shifted schedule, whose resolution is the output image's in pixels for a latent stage too (16 px
    images, 4 x 4 latents, base 8 px: log-SNR shifted by 2 log(8/16) at every t, in training and in the bundle)."""
    run = tmp_path / "run"
    shifted = {"schedule": "shifted_cosine", "shift_base_resolution": 8}
    assert train_inprocess(latent_config(shards, autoencoder, model={"diffusion": shifted}), run) == 0
    last = read_metrics(run)[-1]
    assert "eval/loss" in last and "eval/fidelity_colour" in last
    component = export_run(run, autoencoder.parent)
    stage = json.loads((component / "t2i_stage.json").read_text())
    assert stage["space"] == "latent" and stage["grid"] == [4, 4, 4] and stage["autoencoder_sha256"]
    t2i = Text2Image.from_bundle(autoencoder.parent)
    images = t2i.generate("a large red circle on the left", num_images=2, steps=4)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    t = torch.arange(1000, dtype=torch.float64)
    plain = build_schedule(DiffusionConfig(schedule="cosine"), 16)
    shift = t2i.levels[0].schedule.log_sigma(t) - plain.log_sigma(t)  # log sigma = -log-SNR / 2
    torch.testing.assert_close(shift, torch.full_like(t, -math.log(8 / 16)), rtol=0, atol=1e-9)


def test_precomputed_latents_train_the_same_stage(shards, autoencoder, tmp_path):
    pre = tmp_path / "pre"
    for split in ("train", "heldout"):
        assert main(["shards", "precompute", str(shards / split), "--out", str(pre / split),
                     "--encoder", f"latents:{autoencoder}"]) == 0
    raw = latent_config(shards, autoencoder, model={"latent_source": "precomputed"},
                        data={"precomputed_urls": str(pre / "train"), "eval_precomputed_urls": str(pre / "heldout")})
    assert train_inprocess(raw, tmp_path / "run") == 0
    assert "eval/loss" in read_metrics(tmp_path / "run")[-1]


def test_latent_super_resolution_samples_through_the_bundle(shards, autoencoder, tmp_path):
    bundle = tmp_path / "bundle"
    base = unet_config(shards, data={"resolution": 8},
                       model={"unet": {**LATENT_UNET, "attention_resolutions": [4]}},
                       train={"max_steps": 2, "sample_every": 0}, eval={"every_steps": 0})
    sr = latent_config(shards, autoencoder, model={"name": "sr16", "super_res": {"low_res": 8, "level_embed_dim": 8}},
                       train={"max_steps": 2, "sample_every": 0}, eval={"every_steps": 0})
    for name, raw in (("base", base), ("sr", sr)):
        assert train_inprocess(raw, tmp_path / name) == 0
        export_run(tmp_path / name, bundle)
    import shutil

    shutil.copytree(autoencoder, bundle / "autoencoder")
    from pipeline.bundle import add_component

    add_component(bundle, "autoencoder", {"kind": "autoencoder"})
    images = Text2Image.from_bundle(bundle).generate("a small blue square at the top", steps=4)
    assert images.shape == (1, 3, 16, 16)
    other = tmp_path / "other_ae"  # an autoencoder the SR stage was not trained on
    shutil.copytree(autoencoder, other)
    weights = next(other.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    state = {k: v + 0.01 for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))
    shutil.rmtree(bundle / "autoencoder")
    shutil.copytree(other, bundle / "autoencoder")
    add_component(bundle, "autoencoder", {"kind": "autoencoder"})
    with pytest.raises(CheckpointError, match="trained on another autoencoder than the bundle's"):
        Text2Image.from_bundle(bundle)


def test_latent_dit_flow_base_trains_and_samples_through_the_bundle(shards, autoencoder, tmp_path):
    """A DiT (2x2 patches of the 4 x 4 x 4 latents) with flow matching and Flux's resolution shift: the bundle's
    level has the DiT, the flow schedule with the shift of the 16 px output image, and samples decode to images."""
    from diffusers import PixArtTransformer2DModel

    from pipeline.diffusion.flow import FlowConfig, FlowSchedule, resolved_shift

    run = tmp_path / "run"
    model = {"backbone": "dit", "dit": {"patch_size": 2, "depth": 2, "width": 48, "heads": 2},
             "diffusion": {"objective": "flow", "loss_weighting": "uniform", "flow": {"resolution_shift": True}},
             "sampling": {"sampler": {"name": "flow_euler", "steps": 4}, "guidance": 3.0}}
    assert train_inprocess(latent_config(shards, autoencoder, model=model), run) == 0
    assert "eval/fidelity_colour" in read_metrics(run)[-1]
    component = export_run(run, autoencoder.parent)
    assert json.loads((component / "t2i_stage.json").read_text())["grid"] == [4, 4, 4]
    t2i = Text2Image.from_bundle(autoencoder.parent)
    level = t2i.levels[0]
    assert isinstance(level.unet, PixArtTransformer2DModel) and level.unet.config.in_channels == 4
    assert isinstance(level.schedule, FlowSchedule)
    assert level.schedule.shift == pytest.approx(resolved_shift(FlowConfig(resolution_shift=True), 16))
    images = t2i.generate("a large red circle on the left", num_images=2, steps=4)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
