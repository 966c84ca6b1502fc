"""Noise schedules against closed forms, parameterisation round trips, fractional timesteps, min-SNR weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

from pipeline.diffusion.schedules import (DiffusionConfig, NoiseSchedule, build_schedule, cosine_betas,
                                          scheduler_betas)
from pipeline.errors import ConfigError

# diffusers' set_timesteps calls np.array on a torch tensor with numpy 2 (their issue, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TARGETS = ("eps", "x0", "v")


def _cosine_f(u: np.ndarray) -> np.ndarray:
    return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


@pytest.mark.parametrize("kwargs, key", [
    ({"num_timesteps": 1}, "model.diffusion.num_timesteps"),
    ({"beta_start": 0.0}, "model.diffusion.beta_start"),
    ({"beta_start": 0.03, "beta_end": 0.02}, "model.diffusion.beta_start"),
    ({"beta_end": 1.0}, "model.diffusion.beta_start"),
    ({"shift_base_resolution": 0}, "model.diffusion.shift_base_resolution"),
    ({"min_snr_gamma": 0.0}, "model.diffusion.min_snr_gamma"),
    ({"target": "sample"}, "model.diffusion.target"),
    ({"schedule": "sigmoid"}, "model.diffusion.schedule"),
    ({"loss_weighting": "snr"}, "model.diffusion.loss_weighting"),
    ({"zero_terminal_snr": True, "target": "eps"}, "model.diffusion.zero_terminal_snr"),
])
def test_config_rejects_invalid_values_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        DiffusionConfig(**kwargs)


def test_cosine_matches_closed_form_and_diffusers() -> None:
    T = 1000
    schedule = build_schedule(DiffusionConfig(schedule="cosine", num_timesteps=T), resolution=64)
    f = _cosine_f(np.arange(T + 1) / T)
    closed = f[1:] / f[0]  # abar_t = f((t+1)/T) / f(0) while no beta is capped
    uncapped = (1 - f[1:] / f[:-1]) < 0.999
    assert uncapped[:-1].all() and not uncapped[-1]  # only the very last beta hits the cap
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy()[uncapped], closed[uncapped], rtol=1e-12)
    assert schedule.betas[-1].item() == pytest.approx(0.999, abs=1e-15)
    # same discretisation as diffusers' squaredcos_cap_v2 (which it stores in float32)
    np.testing.assert_allclose(schedule.betas.numpy(), betas_for_alpha_bar(T).double().numpy(), rtol=1e-6)


def test_linear_betas_and_cumulative_product() -> None:
    cfg = DiffusionConfig(schedule="linear", num_timesteps=500, beta_start=2e-4, beta_end=0.03)
    schedule = build_schedule(cfg, resolution=32)
    betas = np.linspace(2e-4, 0.03, 500)
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-14)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    assert schedule.num_timesteps == 500


def test_scaled_linear_is_stable_diffusions_schedule() -> None:
    from diffusers import DDPMScheduler

    cfg = DiffusionConfig(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = build_schedule(cfg, resolution=256)
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas.double()
    torch.testing.assert_close(schedule.betas, reference, rtol=1e-6, atol=0)  # diffusers stores float32
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(4.68e-3, rel=1e-2)  # SD's 7% signal at t = T-1


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "shifted_cosine"])
def test_zero_terminal_snr_matches_lin_et_al_and_keeps_t0(name: str) -> None:
    """Against diffusers' own implementation of Lin et al.'s Algorithm 1 (their rescale_zero_terminal_snr),
    except the last abar, which both we and diffusers' samplers set to 2^-24 instead of 0."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    plain_cfg = DiffusionConfig(schedule=name, beta_start=0.00085, beta_end=0.012, shift_base_resolution=64)
    plain = build_schedule(plain_cfg, resolution=256)
    rescaled = build_schedule(DiffusionConfig(**{**plain_cfg.__dict__, "zero_terminal_snr": True}), resolution=256)
    reference = torch.cumprod(1 - rescale_zero_terminal_snr(plain.betas.clone()), 0)
    torch.testing.assert_close(rescaled.alphas_cumprod[:-1], reference[:-1], rtol=1e-10, atol=1e-15)
    assert rescaled.alphas_cumprod[-1].item() == pytest.approx(2.0**-24, rel=1e-9) and reference[-1].item() == pytest.approx(0, abs=1e-15)
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    assert bool((rescaled.alphas_cumprod[1:] < rescaled.alphas_cumprod[:-1]).all())
    assert math.isfinite(rescaled.log_sigmas[-1].item())


def test_shipped_latent_config_trains_at_zero_terminal_snr() -> None:
    """configs/unet/latent256_sd2.yaml: SD's scaled_linear schedule rescaled to zero terminal SNR, so t = T-1 in
    training is the pure noise sampling starts from (SD2's plain schedule keeps sqrt(4.7e-3) = 7% of x0 there)."""
    from pathlib import Path

    from pipeline.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / "unet" / "latent256_sd2.yaml")
    schedule = build_schedule(cfg.model.diffusion, cfg.data.resolution)
    assert cfg.model.diffusion.schedule == "scaled_linear" and cfg.model.diffusion.target == "v"
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(2.0**-24, rel=1e-9)


@pytest.mark.parametrize("resolution", [16, 64, 256, 1024])
def test_shifted_cosine_offsets_log_snr_by_two_log_ratio(resolution: int) -> None:
    base = 64
    cosine = build_schedule(DiffusionConfig(schedule="cosine"), resolution)
    shifted = build_schedule(DiffusionConfig(schedule="shifted_cosine", shift_base_resolution=base), resolution)
    offset = _logit(shifted.alphas_cumprod) - _logit(cosine.alphas_cumprod)
    expected = 2 * math.log(base / resolution)
    np.testing.assert_allclose(offset.numpy(), np.full(1000, expected), atol=1e-8)
    t = torch.rand(64, dtype=torch.float64) * 999  # the SNR ratio holds at fractional t as well
    np.testing.assert_allclose((shifted.snr(t) / cosine.snr(t)).numpy(), math.exp(expected), rtol=1e-8)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "shifted_cosine"])
def test_snr_definition_and_monotonic_alpha_bar(name: str) -> None:
    schedule = build_schedule(DiffusionConfig(schedule=name), resolution=256)
    abar = schedule.alphas_cumprod
    assert bool((abar > 0).all() and (abar < 1).all())
    assert bool((abar[1:] < abar[:-1]).all())
    t = torch.cat([torch.arange(1000, dtype=torch.float64), torch.rand(100, dtype=torch.float64) * 999])
    a = schedule.alpha_bar(t)
    np.testing.assert_allclose(schedule.snr(t).numpy(), (a / (1 - a)).numpy(), rtol=1e-9)


@pytest.mark.parametrize("kind", TARGETS)
def test_conversions_round_trip_in_fp64(kind: str) -> None:
    schedule = build_schedule(DiffusionConfig(), resolution=64)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.cat([torch.tensor([0.0, 999.0, 998.5]), torch.rand(13, generator=g, dtype=torch.float64) * 999])
    x_t = schedule.add_noise(x0, eps, t)
    a = schedule.alpha_bar(t).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-12, atol=1e-12)
    out = schedule.target(x0, eps, t, kind)
    expected = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    back_x0, back_eps = schedule.to_x0_eps(x_t, out, t, kind)
    torch.testing.assert_close(back_x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back_eps, eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.from_x0_eps(x_t, back_x0, back_eps, t, kind), out, rtol=1e-9, atol=1e-9)


def test_add_noise_returns_input_dtype_computed_in_fp32() -> None:
    schedule = build_schedule(DiffusionConfig(), resolution=64)
    x0 = torch.randn(4, 3, 8, 8).to(torch.bfloat16)
    eps = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 300, 700, 999])
    x_t = schedule.add_noise(x0, eps, t)
    assert x_t.dtype == torch.bfloat16
    reference = schedule.add_noise(x0.double(), eps.double(), t)
    torch.testing.assert_close(x_t, reference.to(torch.bfloat16), rtol=0, atol=0)  # one rounding, at the end
    assert schedule.target(x0, eps, t, "v").dtype == torch.float32


def test_fractional_timesteps_interpolate_log_sigma() -> None:
    schedule = build_schedule(DiffusionConfig(schedule="shifted_cosine"), resolution=128)
    integers = torch.arange(1000)
    assert torch.equal(schedule.alpha_bar(integers), schedule.alphas_cumprod)
    assert torch.equal(schedule.alpha_bar(integers.double()), schedule.alphas_cumprod)
    lo = torch.randint(0, 999, (200,))
    w = torch.rand(200, dtype=torch.float64)
    log_sigma = 0.5 * torch.log((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
    expected = (1 - w) * log_sigma[lo] + w * log_sigma[lo + 1]
    abar = schedule.alpha_bar(lo + w)
    torch.testing.assert_close(0.5 * torch.log((1 - abar) / abar), expected, rtol=1e-10, atol=1e-10)
    # sigma_to_t inverts it
    torch.testing.assert_close(schedule.sigma_to_t(expected.exp()), lo + w, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_fractional_timesteps_match_diffusers_karras_sigma_to_t(name: str) -> None:
    schedule = build_schedule(DiffusionConfig(schedule=name), resolution=64)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, trained_betas=scheduler_betas(schedule),
                                       use_karras_sigmas=True, timestep_spacing="trailing")
    scheduler.set_timesteps(25)
    timesteps, sigmas = scheduler.timesteps.double(), scheduler.sigmas[:-1].double()
    assert (timesteps != timesteps.round()).sum() > 20  # really fractional
    # diffusers keeps its tables and timesteps in float32 (t ~ 999 +- 6e-5, where log sigma changes by 3.5 per
    # unit t on the cosine schedule), hence the tolerances
    torch.testing.assert_close(schedule.alpha_bar(timesteps), 1 / (1 + sigmas**2), rtol=1e-3, atol=0)
    torch.testing.assert_close(schedule.sigma_to_t(sigmas), timesteps, rtol=0, atol=1e-3)


def test_scheduler_betas_are_the_schedule() -> None:
    schedule = build_schedule(DiffusionConfig(schedule="shifted_cosine"), resolution=512)
    betas = scheduler_betas(schedule)
    assert isinstance(betas, list) and all(isinstance(b, float) for b in betas)
    rebuilt = NoiseSchedule(torch.tensor(betas, dtype=torch.float64))
    assert torch.equal(rebuilt.alphas_cumprod, schedule.alphas_cumprod)


def test_min_snr_weights_agree_in_x0_space() -> None:
    """min(snr, g) in x0 space: eps-MSE is snr * x0-MSE and v-MSE is (snr + 1) * x0-MSE (x_t fixed)."""
    schedule = build_schedule(DiffusionConfig(), resolution=64)
    gamma = 5.0
    t = torch.arange(0, 1000, 7)
    snr = schedule.snr(t)
    w = {k: schedule.loss_weight(t, k, "min_snr", gamma) for k in TARGETS}
    expected = torch.minimum(snr, torch.full_like(snr, gamma))
    torch.testing.assert_close(w["x0"], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(w["eps"] * snr, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(w["v"] * (snr + 1), expected, rtol=1e-12, atol=0)
    assert bool((w["eps"][snr < gamma] == 1).all()) and bool((w["eps"][snr > gamma] < 1).all())
    for k in TARGETS:
        assert torch.equal(schedule.loss_weight(t, k, "uniform", gamma), torch.ones(len(t), dtype=torch.float64))

    # the same x0-space error, measured in each parameterisation and weighted, gives the same weighted loss
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(t), 4, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 4, generator=g, dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, t)
    x0_wrong = x0 + 0.1 * torch.randn(len(t), 4, generator=g, dtype=torch.float64)
    eps_wrong = schedule.to_x0_eps(x_t, x0_wrong, t, "x0")[1]  # the eps that x0_wrong implies for this x_t
    x0_mse = ((x0_wrong - x0) ** 2).mean(1)
    for k in TARGETS:
        mse = ((schedule.target(x0_wrong, eps_wrong, t, k) - schedule.target(x0, eps, t, k)) ** 2).mean(1)
        torch.testing.assert_close(w[k] * mse, expected * x0_mse, rtol=1e-6, atol=1e-12)


def test_user_errors_raise_value_error() -> None:
    schedule = build_schedule(DiffusionConfig(), resolution=64)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        schedule.alpha_bar(torch.tensor([0.0, 999.5]))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        schedule.add_noise(x, x, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="prediction target"):
        schedule.target(x, x, torch.tensor([1, 2]), "noise")
    with pytest.raises(ValueError, match="loss weighting"):
        schedule.loss_weight(torch.tensor([1, 2]), "v", "p2", 5.0)
    with pytest.raises(ValueError, match="resolution"):
        build_schedule(DiffusionConfig(schedule="shifted_cosine"), 0)
    with pytest.raises(ValueError, match="beta"):
        NoiseSchedule(torch.tensor([0.1, 1.0]))
    assert cosine_betas(10).shape == (10,)
