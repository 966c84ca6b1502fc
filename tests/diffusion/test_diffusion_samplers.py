"""The sampling loop against oracle denoisers, independent float64 references and diffusers' own configs."""
from __future__ import annotations

import inspect
import json
import math

import diffusers
import pytest
import torch
from torch import Tensor

from pipeline.diffusion.guidance import dynamic_threshold, static_threshold
from pipeline.diffusion.samplers import (VP_SAMPLERS, SamplerConfig, make_scheduler, sample_loop, scheduler_config)
from pipeline.diffusion.schedules import DiffusionConfig, NoiseSchedule, build_schedule
from pipeline.errors import ConfigError

# diffusers' set_timesteps calls np.array on a torch tensor with numpy 2 (their issue, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TARGETS = ("eps", "x0", "v")
SCHEDULE = build_schedule(DiffusionConfig(), resolution=64)  # cosine, T = 1000: sigma_max ~ 2e4
MU, STD = 0.3, 0.5  # Gaussian data N(MU, STD^2), elementwise


def point_oracle(schedule: NoiseSchedule, point: Tensor, kind: str):
    """The exact denoiser of the one-point data distribution {point}, answering in parameterisation `kind`."""
    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        x0 = point.expand_as(x_t).double()
        abar = schedule.alpha_bar(t.double()).reshape(-1, *([1] * (x_t.dim() - 1)))
        eps = (x_t.double() - abar.sqrt() * x0) / (1 - abar).sqrt()
        return schedule.target(x0, eps, t.double(), kind).float()
    return predict


def gaussian_x0(abar: Tensor, x_t: Tensor) -> Tensor:
    """E[x0 | x_t] for x0 ~ N(MU, STD^2): MU + sqrt(a) STD^2 / (a STD^2 + 1 - a) * (x_t - sqrt(a) MU)."""
    a = abar.reshape(-1, *([1] * (x_t.dim() - 1)))
    return MU + a.sqrt() * STD**2 / (a * STD**2 + 1 - a) * (x_t - a.sqrt() * MU)


def gaussian_oracle(schedule: NoiseSchedule, kind: str = "x0"):
    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        abar = schedule.alpha_bar(t.double())
        x0 = gaussian_x0(abar, x_t.double())
        a = abar.reshape(-1, *([1] * (x_t.dim() - 1)))
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return schedule.target(x0, eps, t.double(), kind).float()
    return predict


def test_sampler_config_validation() -> None:
    with pytest.raises(ConfigError, match="model.sampling.sampler.steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ConfigError, match="model.sampling.sampler.eta"):
        SamplerConfig(name="ddim", eta=1.5)
    with pytest.raises(ConfigError, match="model.sampling.sampler.eta"):
        SamplerConfig(name="euler", eta=0.5)
    with pytest.raises(ConfigError, match="model.sampling.sampler.name"):
        SamplerConfig(name="plms")
    with pytest.raises(ConfigError, match="model.sampling.sampler.steps"):
        make_scheduler(SCHEDULE, SamplerConfig(steps=1001))
    with pytest.raises(ConfigError, match="must divide"):
        make_scheduler(SCHEDULE, SamplerConfig(name="ddim", steps=30))


@pytest.mark.parametrize("name", VP_SAMPLERS)
@pytest.mark.parametrize("kind", TARGETS)
def test_point_mass_is_recovered_by_every_sampler_and_target(name: str, kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    point = 2 * torch.rand(1, 2, 4, 4, generator=g) - 1
    karras_options = (True, False) if name in ("euler", "heun", "dpmpp_2m") else (True,)
    for steps in ((1, 2, 8, 40) if name == "ddim" else (1, 2, 7, 30)):  # ddim: divisors of T
        for karras in karras_options:
            out = sample_loop(point_oracle(SCHEDULE, point, kind), torch.randn(3, 2, 4, 4, generator=g), SCHEDULE,
                              kind, SamplerConfig(name=name, steps=steps, karras=karras))
            # eps at t = 999 pins x0 down only to float32 eps / sqrt(abar) ~ 6e-8 * 2e4; one step is all there is
            tol = 1e-2 if (kind == "eps" and steps == 1) else 1e-5
            assert out.shape == (3, 2, 4, 4) and out.dtype == torch.float32
            assert (out - point).abs().max().item() < tol, (steps, karras)


def _zero_data_level_checker(noise: Tensor, seen: list[tuple[float, float]]):
    """predict for data x0 = 0 (x0 target): then every x_t is sqrt(1 - abar) * noise exactly (deterministic
    samplers), so the norm ratio |x_t| / |noise| is the true noise level of the model's input. Records (true
    level, level implied by the t the model was given)."""
    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        level = (x_t.double().norm() / noise.double().norm()).item()
        seen.append((level, math.sqrt(1 - SCHEDULE.alpha_bar(t.double())[0].item())))
        return torch.zeros_like(x_t)
    return predict


@pytest.mark.parametrize("name, karras", [("ddim", True), ("dpmpp_2m", True), ("dpmpp_2m", False),
                                          ("euler", True), ("heun", True)])
def test_all_thousand_steps(name: str, karras: bool) -> None:
    """Karras sigmas of the cosine schedule map many sigmas to t ~ 999 (and Heun repeats every timestep): the
    scheduler must still visit every sigma once, in order, and the model must see each one's timestep."""
    noise = torch.randn(1, 1, 16, 16)
    seen: list[tuple[float, float]] = []
    calls = []
    sample_loop(_zero_data_level_checker(noise, seen), noise, SCHEDULE, "x0",
                SamplerConfig(name=name, steps=1000, karras=karras), progress=lambda i, n: calls.append((i, n)))
    total = 1999 if name == "heun" else 1000
    assert calls == [(i, total) for i in range(1, total + 1)]
    for level, expected in seen:
        assert level == pytest.approx(expected, rel=1e-5)


def test_ddpm_thousand_steps_recovers_the_point() -> None:
    point = torch.full((1, 1, 2, 2), -0.25)
    out = sample_loop(point_oracle(SCHEDULE, point, "v"), torch.randn(2, 1, 2, 2), SCHEDULE, "v",
                      SamplerConfig(name="ddpm", steps=1000))
    assert (out - point).abs().max().item() < 1e-5


@pytest.mark.parametrize("name, steps, karras", [("ddim", 20, True), ("dpmpp_2m", 12, True), ("dpmpp_2m", 12, False),
                                                 ("euler", 9, True), ("heun", 6, True), ("heun", 6, False)])
def test_model_sees_the_timestep_of_its_input_noise_level(name: str, steps: int, karras: bool) -> None:
    """With data x0 = 0 every x_t is sqrt(1 - abar) * noise exactly; the t handed to the model must say so.

    DPM-Solver reports its Karras timesteps rounded to integers: passing the scheduler's timestep instead of the
    sigma's would be off by up to half a step. Heun's second evaluations and its huge first step (sigma 2e4 -> 3.8
    without Karras sigmas, where float32 sigma arithmetic alone misses by 3e-4) are covered too.
    """
    noise = torch.randn(1, 1, 64, 64)
    seen: list[tuple[float, float]] = []
    sample_loop(_zero_data_level_checker(noise, seen), noise, SCHEDULE, "x0",
                SamplerConfig(name=name, steps=steps, karras=karras))
    assert len(seen) == (2 * steps - 1 if name == "heun" else steps)
    for level, expected in seen:
        assert level == pytest.approx(expected, rel=1e-5)


def _ddim_reference(schedule: NoiseSchedule, noise: Tensor, steps: int) -> Tensor:
    """Deterministic DDIM in float64 on trailing timesteps (steps must divide T), Gaussian-data denoiser."""
    T = schedule.num_timesteps
    ts = [T - 1 - k * (T // steps) for k in range(steps)]
    x = noise.double()
    for k, t in enumerate(ts):
        a = schedule.alphas_cumprod[t]
        x0 = gaussian_x0(a.reshape(1), x)
        if k == steps - 1:
            return x0
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        a_next = schedule.alphas_cumprod[ts[k + 1]]
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    raise AssertionError


def _dpmpp_2m_reference(sigmas: Tensor, noise: Tensor) -> Tensor:
    """k-diffusion's sample_dpmpp_2m in float64 over the given sigmas (last one 0), Gaussian-data denoiser."""
    sigmas = sigmas.double()
    x = noise.double() * sigmas[0]
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = MU + STD**2 / (STD**2 + s**2) * (x - MU)  # E[x0 | x0 + s * eps]
        if s_next == 0:
            return denoised
        h = torch.log(s) - torch.log(s_next)
        d = denoised if old is None else (1 + h / (2 * h_last)) * denoised - h / (2 * h_last) * old
        x = (s_next / s) * x - torch.expm1(-h) * d
        old, h_last = denoised, h
    raise AssertionError


@pytest.mark.parametrize("name, steps, karras, kind", [("ddim", 50, True, "eps"), ("ddim", 200, True, "v"),
                                                       ("dpmpp_2m", 30, False, "v"), ("dpmpp_2m", 100, True, "x0")])
def test_gaussian_data_matches_reference_and_distribution(name: str, steps: int, karras: bool, kind: str) -> None:
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(4, 1, 32, 32, generator=g)
    out = sample_loop(gaussian_oracle(SCHEDULE, kind), noise, SCHEDULE, kind,
                      SamplerConfig(name=name, steps=steps, karras=karras)).double()
    if name == "ddim":
        reference = _ddim_reference(SCHEDULE, noise, steps)
    else:
        scheduler = make_scheduler(SCHEDULE, SamplerConfig(name=name, steps=steps, karras=karras))
        scheduler.set_timesteps(steps)
        reference = _dpmpp_2m_reference(scheduler.sigmas, noise)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    # deterministic samplers map each noise value affinely: out = MU + gain * noise, gain -> STD as steps grow
    n = noise.double()
    gain = ((out - MU) * n).sum() / (n * n).sum()
    assert (out - MU - gain * n).abs().max().item() < 1e-4
    assert gain.item() == pytest.approx(STD, rel=0.04)
    # and the samples have the data's statistics (the seed is fixed: these bounds cannot drift)
    assert out.mean().item() == pytest.approx(MU, abs=4 * STD / math.sqrt(out.numel()))
    assert out.std().item() == pytest.approx(STD, rel=0.06)


def test_ddpm_ancestral_sampling_has_data_statistics() -> None:
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(100 + i) for i in range(2)]
    out = sample_loop(gaussian_oracle(SCHEDULE, "eps"), noise, SCHEDULE, "eps", SamplerConfig(name="ddpm", steps=250),
                      generators=generators)
    assert out.mean().item() == pytest.approx(MU, abs=4 * STD / math.sqrt(out.numel()))
    assert out.std().item() == pytest.approx(STD, rel=0.06)


def test_ddim_eta_zero_is_deterministic() -> None:
    noise = torch.randn(2, 3, 8, 8)
    cfg = SamplerConfig(name="ddim", steps=10)
    first = sample_loop(gaussian_oracle(SCHEDULE, "v"), noise, SCHEDULE, "v", cfg,
                        generators=[torch.Generator().manual_seed(i) for i in (1, 2)])
    second = sample_loop(gaussian_oracle(SCHEDULE, "v"), noise, SCHEDULE, "v", cfg,
                         generators=[torch.Generator().manual_seed(i) for i in (8, 9)])
    assert torch.equal(first, second)
    stochastic = SamplerConfig(name="ddim", steps=10, eta=1.0)
    a = sample_loop(gaussian_oracle(SCHEDULE, "v"), noise, SCHEDULE, "v", stochastic,
                    generators=[torch.Generator().manual_seed(i) for i in (1, 2)])
    b = sample_loop(gaussian_oracle(SCHEDULE, "v"), noise, SCHEDULE, "v", stochastic,
                    generators=[torch.Generator().manual_seed(i) for i in (8, 9)])
    assert (a - b).abs().max().item() > 1e-2  # eta = 1 does use the generators


@pytest.mark.parametrize("name, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_per_image_generators_make_images_independent_of_the_batch(name: str, eta: float) -> None:
    cfg = SamplerConfig(name=name, steps=10, eta=eta)
    noise = torch.randn(3, 2, 6, 6)
    seeds = (11, 22, 33)
    batch = sample_loop(gaussian_oracle(SCHEDULE), noise, SCHEDULE, "x0", cfg,
                        generators=[torch.Generator().manual_seed(s) for s in seeds])
    alone = sample_loop(gaussian_oracle(SCHEDULE), noise[1:2], SCHEDULE, "x0", cfg,
                        generators=[torch.Generator().manual_seed(seeds[1])])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)
    other_seed = sample_loop(gaussian_oracle(SCHEDULE), noise[1:2], SCHEDULE, "x0", cfg,
                             generators=[torch.Generator().manual_seed(99)])
    assert (other_seed - alone).abs().max().item() > 1e-2
    with pytest.raises(ValueError, match="one per image"):
        sample_loop(gaussian_oracle(SCHEDULE), noise, SCHEDULE, "x0", cfg, generators=[torch.Generator()])


@pytest.mark.parametrize("name", VP_SAMPLERS)
def test_threshold_is_applied_to_every_x0(name: str) -> None:
    point = torch.full((1, 1, 3, 3), 3.0)  # outside [-1, 1]: clamping changes the answer
    calls = []

    def clamp(x0: Tensor) -> Tensor:
        calls.append(x0.shape)
        return static_threshold(x0, 1.0)

    cfg = SamplerConfig(name=name, steps=5)
    out = sample_loop(point_oracle(SCHEDULE, point, "eps"), torch.randn(2, 1, 3, 3), SCHEDULE, "eps", cfg,
                      threshold=clamp)
    assert len(calls) == (9 if name == "heun" else 5) and calls[0] == (2, 1, 3, 3)
    torch.testing.assert_close(out, torch.ones(2, 1, 3, 3), rtol=0, atol=1e-5)
    noise = torch.randn(2, 1, 3, 3)  # an identity threshold changes nothing
    plain = sample_loop(gaussian_oracle(SCHEDULE, "v"), noise, SCHEDULE, "v", cfg,
                        generators=[torch.Generator().manual_seed(i) for i in range(2)])
    same = sample_loop(gaussian_oracle(SCHEDULE, "v"), noise, SCHEDULE, "v", cfg, threshold=lambda x0: x0,
                       generators=[torch.Generator().manual_seed(i) for i in range(2)])
    torch.testing.assert_close(same, plain, rtol=0, atol=0)


def test_low_precision_model_output_is_sampled_in_float32() -> None:
    point = torch.full((1, 1, 2, 2), 0.5)
    oracle = point_oracle(SCHEDULE, point, "x0")
    out = sample_loop(lambda x, t: oracle(x, t).to(torch.bfloat16), torch.randn(2, 1, 2, 2), SCHEDULE, "x0",
                      SamplerConfig(name="dpmpp_2m", steps=8))
    assert out.dtype == torch.float32
    assert (out - 0.5).abs().max().item() < 1e-6  # 0.5 is exact in bf16
    with pytest.raises(ValueError, match="prediction target"):
        sample_loop(oracle, torch.randn(1, 1, 2, 2), SCHEDULE, "sample", SamplerConfig())


@pytest.mark.parametrize("name", VP_SAMPLERS)
def test_scheduler_config_rebuilds_the_scheduler(name: str) -> None:
    schedule = build_schedule(DiffusionConfig(schedule="shifted_cosine"), resolution=256)
    cfg = SamplerConfig(name=name, steps=20)
    for target, prediction_type in (("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")):
        saved = json.loads(json.dumps(scheduler_config(schedule, cfg, target=target)))  # JSON-able
        rebuilt = getattr(diffusers, saved["_class_name"]).from_config(saved)
        original = make_scheduler(schedule, cfg, target)
        assert type(rebuilt) is type(original)
        for key, value in original.config.items():  # the clamp keys are checked by the test below
            if not key.startswith("_") and key not in ("clip_sample", "thresholding"):
                assert saved[key] == value, key
        assert rebuilt.config.prediction_type == prediction_type  # what the exported U-Net predicts
        assert rebuilt.config.timestep_spacing == "trailing"
    # trained_betas reproduce our schedule up to diffusers' float32 storage
    torch.testing.assert_close(rebuilt.alphas_cumprod.double(), schedule.alphas_cumprod, rtol=1e-4, atol=0)
    rebuilt.set_timesteps(20)
    assert rebuilt.timesteps[0].item() == pytest.approx(999, abs=1e-3)  # starts at the noisiest timestep
    with pytest.raises(TypeError):
        scheduler_config(schedule, cfg)  # the U-Net's target is required: a wrong prediction_type is silent


# The schedulers a diffusers user is likely to build from the exported config (README: "Export").
SWAPPED = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
           "UniPCMultistepScheduler", "DEISMultistepScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "PNDMScheduler")  # LMS needs scipy


def _diffusers_loop(scheduler, predict, noise: Tensor, steps: int) -> Tensor:
    """The loop of a diffusers pipeline: scale the input, call the model, step (model output as exported)."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(predict(x_in, t.reshape(1).expand(x.shape[0]).float()), t, x).prev_sample
    return x


@pytest.mark.parametrize("class_name", SWAPPED)
def test_exported_config_keeps_swapped_schedulers_faithful(class_name: str) -> None:
    """Latent-like data N(0.3, 1.5^2) reaches far outside [-1, 1]: any scheduler built from the exported config
    must sample it without clamping x0 (DDIM's and DDPM's defaults clip_sample=True would: std 0.8, not 1.5), and
    a pixel stage's config must bring its dynamic thresholding to the schedulers that have one."""
    mu, std = 0.3, 1.5
    # linear: a plain float32 Heun loop on the cosine schedule's sigma_max 2e4 is off by itself (module docstring)
    schedule = build_schedule(DiffusionConfig(schedule="linear"), resolution=64)

    def predict(x_t: Tensor, t: Tensor) -> Tensor:  # exact v for Gaussian data, as a v-prediction U-Net
        a = schedule.alpha_bar(t.double()).reshape(-1, *([1] * (x_t.dim() - 1)))
        x0 = mu + a.sqrt() * std**2 / (a * std**2 + 1 - a) * (x_t.double() - a.sqrt() * mu)
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()

    exported = scheduler_config(schedule, SamplerConfig(steps=20), target="v")  # a latent stage: no threshold
    scheduler = getattr(diffusers, class_name).from_config(exported)
    keys = inspect.signature(type(scheduler).__init__).parameters
    assert all(scheduler.config[k] is False for k in ("clip_sample", "thresholding") if k in keys)
    noise = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # the ancestral schedulers draw from the global RNG in a plain loop
    out = _diffusers_loop(scheduler, predict, noise, 50)
    assert out.mean().item() == pytest.approx(mu, abs=0.1)
    assert out.std().item() == pytest.approx(std, rel=0.1)
    pixel = getattr(diffusers, class_name).from_config(
        scheduler_config(schedule, SamplerConfig(steps=20), target="v", threshold=0.995))
    keys = inspect.signature(type(pixel).__init__).parameters
    if "thresholding" in keys:
        assert pixel.config.thresholding and pixel.config.dynamic_thresholding_ratio == 0.995
        x0 = torch.linspace(-3, 3, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
        torch.testing.assert_close(pixel._threshold_sample(x0.clone()), dynamic_threshold(x0, 0.995))
    if "clip_sample" in keys:
        assert pixel.config.clip_sample is False  # dynamic thresholding, not a clamp to [-1, 1]


@pytest.mark.parametrize("name", [n for n in VP_SAMPLERS if n != "heun"])
@pytest.mark.parametrize("strength", [0.3, 0.6, 0.9])
def test_image_to_image_start_and_result_have_the_right_statistics(name: str, strength: float) -> None:
    """SDEdit from an init image drawn from the data N(MU, STD^2): the first model input is the forward process
    at the start level (std sqrt(abar STD^2 + 1 - abar)) for every sampler, whatever space its scheduler keeps
    its sample in, and the result has the data's statistics. (dpmpp_2m once started from x_t / sqrt(abar): std
    1.48 instead of 0.86 at strength 0.6, and an output std of 0.86 for data std 0.5.)"""
    g = torch.Generator().manual_seed(5)
    init = MU + STD * torch.randn(4, 1, 32, 32, generator=g)
    noise = torch.randn(4, 1, 32, 32, generator=g)
    seen: list[tuple[float, float]] = []
    oracle = gaussian_oracle(SCHEDULE, "v")

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        seen.append((x_t.double().std().item(), t[0].item()))
        return oracle(x_t, t)

    steps = 50
    cfg = SamplerConfig(name=name, steps=steps)
    out = sample_loop(predict, noise, SCHEDULE, "v", cfg, init=init, strength=strength,
                      generators=[torch.Generator().manual_seed(i) for i in range(4)])
    first_std, first_t = seen[0]
    start = round(steps * (1 - strength))
    T = SCHEDULE.num_timesteps
    assert len(seen) == steps - start
    assert first_t == pytest.approx(round(T - start * T / steps) - 1, abs=1e-3)  # trailing spacing
    abar = SCHEDULE.alphas_cumprod[round(first_t)].double()
    forward = abar.sqrt() * init.double() + (1 - abar).sqrt() * noise.double()  # the forward process, by hand
    assert first_std == pytest.approx(forward.std().item(), rel=1e-6)
    assert first_std == pytest.approx(math.sqrt(abar * STD**2 + 1 - abar), rel=0.05)  # population value
    # The result has the data's statistics, as far as the sampler's own discretisation gets from pure noise
    # (first-order samplers at 50 steps under-disperse by a few percent)
    plain = sample_loop(oracle, noise, SCHEDULE, "v", cfg, generators=[torch.Generator().manual_seed(i)
                                                                      for i in range(4)])
    assert out.mean().item() == pytest.approx(MU, abs=4 * STD / math.sqrt(out.numel()))
    assert out.std().item() == pytest.approx(STD, rel=0.12)
    assert abs(out.std().item() - plain.std().item()) < 0.03


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler", "ddpm"])
def test_image_to_image_keeps_the_init_at_low_strength_and_ignores_it_at_full_strength(name):
    """SDEdit: with an oracle denoiser for a 2-point data set {-1, +1}, starting from init = +0.9 at strength 0.3
    must end at the point nearest to init; strength 1 equals plain sampling from the same noise."""
    from pipeline.diffusion.samplers import SamplerConfig, sample_loop
    from pipeline.diffusion.schedules import DiffusionConfig, build_schedule

    schedule = build_schedule(DiffusionConfig(schedule="cosine"), 64)

    def predict(x_t, t):  # posterior mean of x0 for data uniform on {-1, +1} (per element), as x0
        abar = schedule.alpha_bar(t).view(-1, 1).to(x_t.dtype)
        logit = 2 * abar.sqrt() * x_t / (1 - abar)
        return torch.tanh(logit)

    sampler = SamplerConfig(name=name, steps=20)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 8, generator=gen)
    init = torch.full((64, 8), 0.9)
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    low = sample_loop(predict, noise, schedule, "x0", sampler, init=init, strength=0.3, generators=gens)
    assert (low > 0.5).float().mean() > 0.9  # stays with +1 (plain sampling: about half)
    full = sample_loop(predict, noise, schedule, "x0", sampler, init=init, strength=1.0,
                       generators=[torch.Generator().manual_seed(i) for i in range(64)])
    plain = sample_loop(predict, noise, schedule, "x0", sampler, generators=[torch.Generator().manual_seed(i)
                                                                             for i in range(64)])
    torch.testing.assert_close(full, plain)
    assert 0.3 < (plain > 0).float().mean() < 0.7  # from pure noise both points are drawn
    with pytest.raises(ValueError, match="strength"):
        sample_loop(predict, noise, schedule, "x0", sampler, init=init, strength=0.0)
