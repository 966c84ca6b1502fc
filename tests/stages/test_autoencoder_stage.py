"""The `autoencoder` stage through the one Trainer (in-process, ZeRO-0): both parts step, the GAN switches on after
model.loss.disc_start_step, held-out PSNR/SSIM/latent statistics are logged, grids written, and the export loads
with diffusers' from_pretrained and decodes our latents to the same images."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ae_helpers import ae_config
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.export import export_run
from pipeline.stages.autoencoder import AutoencoderStage, load_codec
from pipeline.train.stage import StageContext
from pipeline.train.rng import seed_all
from train_helpers import read_metrics, train_inprocess, weights, write_config


def _initial_weights(raw: dict, tmp_path) -> dict[str, dict[str, torch.Tensor]]:
    """The parts as the Trainer builds them before step 1 (it seeds with train.seed first)."""
    cfg = load_config(write_config(tmp_path / "initial.yaml", raw))
    stage = AutoencoderStage(cfg, StageContext(rank=0, world_size=1, device=torch.device("cpu"),
                                               compute_dtype=torch.float32))
    seed_all(cfg.train.seed)
    return {name: module.state_dict() for name, module in stage.build_trainable().items()}


def _decodes_like_diffusers(component, run) -> None:
    """Our LatentCodec (from the run dir and from the export) and diffusers' own class agree on latents/images."""
    from diffusers import AutoencoderKL, VQModel

    stage_json = json.loads((component / "t2i_stage.json").read_text())
    cls = AutoencoderKL if stage_json["kind"] == "kl" else VQModel
    vae = cls.from_pretrained(str(component)).eval()
    from_run, from_export = load_codec(run), load_codec(component.parent)  # run dir, bundle root
    assert from_run.scale == vae.config.scaling_factor == stage_json["scaling_factor"] != 1.0
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = from_run.encode(images)
        assert latents.shape == (3, *stage_json["latent_shape"])
        assert torch.allclose(from_export.encode(images), latents, atol=1e-5)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        theirs = vae.decode(latents / vae.config.scaling_factor + shift).sample.clamp(-1, 1)
        assert torch.allclose(from_run.decode(latents), theirs, atol=1e-5)
        assert torch.allclose(from_export.decode(latents), theirs, atol=1e-5)


def test_kl_stage_trains_both_parts_switches_the_gan_on_evaluates_and_exports(shards, tmp_path):
    raw = ae_config(shards, kind="kl", disc_start_step=3, train={"grad_accum_steps": 2},
                    ckpt={"every_steps": 3})
    run = tmp_path / "run"
    initial = _initial_weights(raw, tmp_path)
    assert train_inprocess(raw, run) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    before, after = records[:3], records[3:]
    # GAN off up to disc_start_step: no generator GAN term, zero-weighted discriminator loss (still computed)
    assert all(r["generator/gan_weight"] == 0 and r["generator/gan_loss"] == 0 for r in before)
    assert all(r["loss/discriminator"] == 0 and r["discriminator/disc_loss"] > 0 for r in before)
    assert all(r["generator/gan_weight"] > 0 and r["generator/gan_loss"] != 0 for r in after)
    # The same loss, averaged over the two micro-batches in fp32 (the loss) and in fp64 (the metric): equal to
    # rounding, not bit for bit.
    assert all(r["loss/discriminator"] == pytest.approx(r["discriminator/disc_loss"], rel=1e-6) for r in after)
    assert all(r["discriminator/disc_loss"] > 0 for r in after)
    assert len({round(r["discriminator/disc_loss"], 6) for r in after}) == 3  # the discriminator loss moves
    assert all(r["generator/kl_loss"] > 0 and r["generator/rec_loss"] > 0 for r in records)
    # Both engines step: the discriminator only once the GAN is on (zero gradients before, no weight decay)
    at3, at6 = weights(run, "step_00000003"), weights(run, "step_00000006")
    disc_keys = [k for k in initial["discriminator"] if k in at3["discriminator"]]
    assert all(torch.equal(at3["discriminator"][k], initial["discriminator"][k].float()) for k in disc_keys)
    assert any(not torch.equal(at6["discriminator"][k], at3["discriminator"][k]) for k in disc_keys)
    key = "vae.decoder.conv_out.weight"
    assert not torch.equal(at3["generator"][key], initial["generator"][key])
    assert int(at6["generator"]["micro_steps"]) == 12  # 6 steps x 2 micro-batches, checkpointed
    evals = [r for r in records if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for name in ("eval/psnr", "eval/ssim", "eval/latent_std", "eval/latent_mean", "eval/latent_second_moment",
                 "eval/kl_per_latent"):
        assert name in evals[-1], name
    assert 5.0 < evals[-1]["eval/psnr"] < 60.0 and -1.0 < evals[-1]["eval/ssim"] <= 1.0
    grid = Image.open(run / "samples" / "step_00000006.png")
    assert grid.size == (2 * 16 * 2, 2 * 16)  # 4 pairs (input | reconstruction) in rows of 2

    component = export_run(run, tmp_path / "bundle")
    assert component.name == "autoencoder" and (component / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((component / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["shift_factor"] != 0.0
    _decodes_like_diffusers(component, run)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_vq_stage_with_a_perceptual_loss_trains_reports_codebook_usage_and_exports(shards, tmp_path):
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    torch.jit.script(features).save(str(tmp_path / "features.pt"))  # a tiny random frozen feature network
    run = tmp_path / "run"
    raw = ae_config(shards, kind="vq", disc_start_step=2, model={"loss": {"perceptual_path": str(tmp_path /
                                                                                                "features.pt")}})
    assert train_inprocess(raw, run) == 0
    records = read_metrics(run)
    assert all(r["generator/perceptual_loss"] > 0 for r in records)
    assert all(0 < r["generator/codebook_usage"] <= 1 and r["generator/codebook_perplexity"] >= 1 for r in records)
    assert sum(r["generator/codes_restarted"] for r in records) > 0  # dead codes came back (restart_after_steps 2)
    assert max(r["generator/codebook_usage"] for r in records[2:]) > records[0]["generator/codebook_usage"]
    assert all(r["generator/vq_loss"] > 0 for r in records)
    assert "eval/codebook_usage" in records[-1] and "eval/codebook_perplexity" in records[-1]
    assert "eval/kl_per_latent" not in records[-1]
    component = export_run(run, tmp_path / "bundle")
    config = json.loads((component / "config.json").read_text())
    assert config["_class_name"] == "VQModel" and config["num_vq_embeddings"] == 32
    _decodes_like_diffusers(component, run)


def test_configuration_errors_are_one_clear_line(shards, tmp_path):
    raw = ae_config(shards, data={"resolution": 18})
    with pytest.raises(ConfigError, match=r"data.resolution \(18\) must be divisible by the autoencoder's "
                                          r"downsampling factor 4"):
        train_inprocess(raw, tmp_path / "a")
    raw = ae_config(shards, model={"discriminator": {"layers": 3}})
    with pytest.raises(ConfigError, match=r"too small for model.discriminator.layers=3"):
        train_inprocess(raw, tmp_path / "b")
    raw = ae_config(shards, model={"loss": {"perceptual_path": str(tmp_path / "vgg.pth")}})
    with pytest.raises(ConfigError, match=r"model.loss.perceptual_path: .*vgg.pth does not exist"):
        train_inprocess(raw, tmp_path / "c")
    with pytest.raises(ConfigError, match="no such autoencoder"):
        load_codec(tmp_path / "nothing")


def test_random_windows_are_uniformly_placed_sub_images_drawn_from_the_checkpointed_generator():
    from pipeline.stages.autoencoder import random_windows

    images = torch.rand(64, 3, 16, 12, dtype=torch.float64)
    torch.manual_seed(5)
    windows = random_windows(images, 8)
    assert windows.shape == (64, 3, 8, 8) and windows.dtype == torch.float64
    offsets = set()
    for image, window in zip(images, windows):
        found = [(y, x) for y in range(9) for x in range(5) if torch.equal(image[:, y:y + 8, x:x + 8], window)]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 20  # independent offsets per image, not one per batch
    assert {y for y, _ in offsets} >= {0, 8} and {x for _, x in offsets} >= {0, 4}  # the borders are reachable
    torch.manual_seed(5)
    assert torch.equal(random_windows(images, 8), windows)  # the global generator decides: resumes draw the same


def test_training_on_windows_shows_both_parts_windows_and_evaluates_whole_images(shards, tmp_path):
    raw = ae_config(shards, model={"train_window": 12, "autoencoder": {"mid_attention": False}},
                    disc_start_step=0)
    cfg = load_config(write_config(tmp_path / "window.yaml", raw))
    stage = AutoencoderStage(cfg, StageContext(rank=0, world_size=1, device=torch.device("cpu"),
                                               compute_dtype=torch.float32))
    parts = stage.build_trainable()
    seen = []
    parts["discriminator"].register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1}
    generator = stage.training_step(parts, {}, batch, "generator")
    assert torch.isfinite(generator.loss)
    stage.training_step(parts, {}, batch, "discriminator")
    # the generator's GAN term judges 4 reconstructed windows, the discriminator 4 real + 4 reconstructed windows
    assert seen == [(4, 3, 12, 12), (8, 3, 12, 12)]

    assert train_inprocess(raw, tmp_path / "run") == 0
    evals = [r for r in read_metrics(tmp_path / "run") if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [3, 6] and 5.0 < evals[-1]["eval/psnr"] < 60.0
    grid = Image.open(tmp_path / "run" / "samples" / "step_00000006.png")
    assert grid.size == (2 * 16 * 2, 2 * 16)  # whole 16 px held-out images in the grid


def test_training_window_errors_are_one_clear_line(shards, tmp_path):
    for model, message in (({"train_window": 10}, r"model.train_window.*divisible by the downsampling factor 4"),
                           ({"train_window": 8}, r"model.train_window.*mid_attention off"),
                           ({"train_window": 20, "autoencoder": {"mid_attention": False}},
                            r"model.train_window \(20\) is larger than data.resolution \(16\)"),
                           ({"train_window": 8, "autoencoder": {"mid_attention": False}},
                            r"model.train_window \(8\) is too small for model.discriminator.layers=2")):
        with pytest.raises(ConfigError, match=message):
            train_inprocess(ae_config(shards, model=model), tmp_path / str(len(message)))
