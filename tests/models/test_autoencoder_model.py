"""Autoencoder and discriminator building blocks: typed configs (errors name the key), KL / VQ forward and
backward, the EMA codebook with dead-code restarts, latent scaling, the SD f=8 layout's size, PatchGAN shapes,
GAN losses against closed forms, the adaptive weight against a hand-computed gradient ratio, the perceptual loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.models.autoencoder import AutoencoderConfig, LatentCodec, build_autoencoder, codebook_usage
from pipeline.models.discriminator import (DiscriminatorConfig, PatchDiscriminator, PerceptualLoss, adaptive_weight,
                                           discriminator_loss, generator_loss)

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"
TINY = dict(block_widths=(8, 16, 16), norm_groups=4, latent_channels=4, codebook_size=16)


@pytest.mark.parametrize("kwargs, key", [
    ({"block_widths": (8, 16)}, "model.autoencoder.block_widths"),
    ({"block_widths": (8, 16, 16, 16, 16, 16)}, "model.autoencoder.block_widths"),
    ({"block_widths": (8, 16, 16), "norm_groups": 3}, "model.autoencoder.norm_groups"),
    ({"latent_channels": 0}, "model.autoencoder.latent_channels"),
    ({"codebook_decay": 1.0}, "model.autoencoder.codebook_decay"),
    ({"kl_weight": -1.0}, "model.autoencoder.kl_weight"),
])
def test_autoencoder_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        AutoencoderConfig(**kwargs)


def test_discriminator_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.discriminator\.norm_groups"):
        DiscriminatorConfig(channels=6, norm_groups=5)
    with pytest.raises(ConfigError, match=r"model\.discriminator\.layers"):
        DiscriminatorConfig(layers=0)


def test_yaml_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "ae.yaml"
    path.write_text("stage: autoencoder\nmodel: {autoencoder: {kind: gan}}\n")
    with pytest.raises(ConfigError, match=r"ae\.yaml: model\.autoencoder\.kind expects one of 'kl', 'vq'"):
        load_config(path)
    path.write_text("stage: autoencoder\nmodel: {loss: {disc_strat_step: 3}}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.loss\.disc_strat_step'; did you mean "
                                          r"'model\.loss\.disc_start_step'"):
        load_config(path)


def test_shipped_configs_parse():
    for name in ("demo/autoencoder.yaml", "autoencoder/kl_f8.yaml", "autoencoder/vq_f4.yaml"):
        cfg = load_config(REPO_CONFIGS / name)
        assert cfg.stage == "autoencoder" and cfg.data.resolution % cfg.model.autoencoder.factor == 0


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_forward_backward(kind):
    torch.manual_seed(0)
    ae = build_autoencoder(AutoencoderConfig(kind=kind, **TINY), 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = ae(x)
    assert out.recon.shape == x.shape and out.latent.shape == (2, 4, 4, 4)
    assert (out.logvar is not None) == (kind == "kl") and (out.indices is not None) == (kind == "vq")
    (F.l1_loss(out.recon, x) + out.reg_loss).backward()
    assert ae.vae.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert ae.last_layer().grad.abs().sum() > 0
    if kind == "vq":
        weight = ae.vae.quantize.embedding.weight
        assert not isinstance(weight, nn.Parameter) and "vae.quantize.embedding.weight" in ae.state_dict()
        assert torch.equal(out.indices, torch.cdist(out.latent.permute(0, 2, 3, 1).reshape(-1, 4), weight).argmin(1))
    else:  # KL training samples the posterior; eval (.run(sample=False)) decodes its mean deterministically
        a, b = ae.run(x, sample=False), ae.run(x, sample=False)
        assert torch.equal(a.recon, b.recon)


def test_ema_codebook_update_and_dead_code_restart():
    cfg = AutoencoderConfig(kind="vq", codebook_decay=0.0, restart_after_steps=3, **TINY)
    ae = build_autoencoder(cfg, 16)
    h = torch.randn(1, 4, 2, 2)
    indices = torch.tensor([1, 1, 5, 1])
    stats = ae.codebook_statistics(h, indices)
    flat = h.permute(0, 2, 3, 1).reshape(-1, 4)
    assert stats[1, 0] == 3 and stats[5, 0] == 1 and stats[:, 0].sum() == 4
    assert torch.allclose(stats[1, 1:], flat[[0, 1, 3]].sum(0)) and torch.allclose(stats[5, 1:], flat[2])
    dead = ae.update_codebook(stats, step=1)
    codebook = ae.vae.quantize.embedding.weight
    # decay 0: the code is the mean of its vectors (up to the tiny Laplace smoothing)
    assert torch.allclose(codebook[1], flat[[0, 1, 3]].mean(0), atol=1e-4)
    assert torch.allclose(codebook[5], flat[2], atol=1e-4)
    assert dead.numel() == 0 and ae.code_last_used[1] == 1 and ae.code_last_used[0] == 0
    dead = ae.update_codebook(stats, step=3)  # codes unused since step 0 are dead after 3 steps
    assert sorted(dead.tolist()) == [c for c in range(16) if c not in (1, 5)]
    vectors = torch.randn(dead.numel(), 4)
    ae.restart_codes(dead, vectors, step=3)
    assert torch.equal(codebook[dead], vectors) and (ae.code_last_used == 3).sum() == 16
    assert codebook_usage(stats[:, 0]) == (2 / 16, pytest.approx(math.exp(-(0.75 * math.log(0.75) +
                                                                           0.25 * math.log(0.25)))))


def test_latent_moments_give_unit_variance_scaling():
    ae = build_autoencoder(AutoencoderConfig(kind="kl", latent_stats_decay=0.5, **TINY), 16)
    assert ae.scale_shift() == (1.0, 0.0)
    z = torch.randn(10_000, dtype=torch.float64) * 3.0 + 2.0
    for chunk in z.chunk(4):
        ae.update_latent_moments(torch.stack([torch.tensor(float(chunk.numel()), dtype=torch.float64),
                                              chunk.sum(), chunk.pow(2).sum()]))
    scale, shift = ae.scale_shift()
    assert shift == pytest.approx(2.0, abs=0.1) and scale == pytest.approx(1 / 3.0, rel=0.05)
    vae = ae.finalised_vae()
    assert vae.config.scaling_factor == scale and vae.config.shift_factor == shift
    codec = LatentCodec(vae)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        assert torch.allclose(codec.encode(x), (mean - shift) * scale)
        assert torch.allclose(codec.decode(codec.encode(x), clamp=False), vae.decode(mean).sample, atol=1e-5)


def test_sd_kl_f8_layout_builds_on_meta_with_sds_parameter_count(capsys):
    cfg = load_config(REPO_CONFIGS / "autoencoder" / "kl_f8.yaml")
    with torch.device("meta"):
        ae = build_autoencoder(cfg.model.autoencoder, cfg.data.resolution)
    count = sum(p.numel() for p in ae.vae.parameters())
    with capsys.disabled():
        print(f"\nkl_f8 (SD VAE layout): {count / 1e6:.2f} M parameters, f={cfg.model.autoencoder.factor}")
    assert count == 83_653_863  # diffusers' AutoencoderKL of SD 1.x/2.x (stabilityai/sd-vae-ft-mse)


def test_patch_discriminator_shapes():
    for layers, side, out in ((3, 64, 6), (2, 16, 2), (3, 256, 30)):
        d = PatchDiscriminator(DiscriminatorConfig(channels=8, layers=layers, norm_groups=4))
        assert d(torch.randn(2, 3, side, side)).shape == (2, 1, out, out)
    d = PatchDiscriminator(DiscriminatorConfig(channels=8, layers=2, norm="none", spectral_norm=True))
    logits = d(torch.randn(2, 3, 16, 16))
    logits.mean().backward()
    assert d.net[0].parametrizations.weight.original.grad is not None


def test_gan_losses_match_closed_forms():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])
    fake = torch.tensor([[-2.0, 0.5], [1.5, -0.5]])
    hinge_d = 0.5 * ((0 + 0.5 + 2.0 + 1.0) / 4 + (0 + 1.5 + 2.5 + 0.5) / 4)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(hinge_d)
    assert generator_loss(fake, "hinge").item() == pytest.approx(-(-2.0 + 0.5 + 1.5 - 0.5) / 4)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    ns_d = 0.5 * (sum(sp(-v) for v in real.flatten().tolist()) / 4 + sum(sp(v) for v in fake.flatten().tolist()) / 4)
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(ns_d, rel=1e-6)
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(
        sum(sp(-v) for v in fake.flatten().tolist()) / 4, rel=1e-6)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    torch.manual_seed(0)
    x, target, v = torch.randn(5, 3), torch.randn(5, 2), torch.randn(2)
    layer = nn.Linear(3, 2, bias=False)
    y = layer(x)
    rec = (y - target).pow(2).mean()
    gan = -(y @ v).mean()
    got = adaptive_weight(rec, gan, layer.weight)
    # by hand: d rec / dW = 2/(N*2) (y - t)^T x ; d gan / dW = -(1/N) v x_mean^T
    w = layer.weight.detach()
    y_ = x @ w.T
    grad_rec = 2.0 / y_.numel() * (y_ - target).T @ x
    grad_gan = -torch.outer(v, x.mean(0))
    want = grad_rec.norm() / (grad_gan.norm() + 1e-4)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and not got.requires_grad
    assert adaptive_weight(rec, 1e-9 * gan, layer.weight, max_weight=7.0).item() == 7.0  # clamped
    rec.backward()  # graphs were retained for the real backward


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_perceptual_loss_from_a_torchscript_file(tmp_path):
    torch.manual_seed(0)

    class Taps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            f1 = torch.relu(self.a(x))
            return [f1, torch.relu(self.b(f1))]

    net = Taps()
    torch.jit.script(net).save(str(tmp_path / "features.pt"))
    loss = PerceptualLoss(str(tmp_path / "features.pt"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert loss(x, x).item() == 0.0
    value = loss(x, y)

    def unit(f: torch.Tensor) -> torch.Tensor:
        return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

    want = sum((unit(a) - unit(b)).pow(2).sum(1).mean() for a, b in zip(net(x), net(y))) / 2
    assert value.item() == pytest.approx(want.item(), rel=1e-5) and value.item() > 0
    value.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_perceptual_loss_from_a_vgg16_state_dict(tmp_path):
    from torchvision.models import vgg16

    from pipeline.models.discriminator import VGG16Taps

    torch.manual_seed(0)
    features = vgg16(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16.pth")
    loss = PerceptualLoss(str(tmp_path / "vgg16.pth"))
    assert isinstance(loss.net, VGG16Taps) and len(loss.net(torch.zeros(1, 3, 32, 32))) == 5
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == 0.0 and loss(x, x.flip(3)).item() > 0
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: a state dict without torchvision VGG16"):
        PerceptualLoss(str(tmp_path / "other.pth"))
