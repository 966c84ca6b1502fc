"""Flow matching against closed forms (path, velocity, densities, weights) and diffusers' own schedulers."""
from __future__ import annotations

import json
import math

import diffusers
import pytest
import torch
from torch import Tensor

from pipeline.diffusion.flow import FlowConfig, FlowSchedule, resolved_shift, sample_density, shift_levels
from pipeline.diffusion.objective import diffusion_loss, noise_augment
from pipeline.diffusion.samplers import SamplerConfig, make_scheduler, sample_loop, scheduler_config
from pipeline.diffusion.schedules import DiffusionConfig, NoiseSchedule, build_schedule
from pipeline.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def flow(shift: float = 1.0, **flow_keys) -> FlowSchedule:
    cfg = DiffusionConfig(objective="flow", loss_weighting="uniform", flow=FlowConfig(shift=shift, **flow_keys))
    schedule = build_schedule(cfg, resolution=64)
    assert isinstance(schedule, FlowSchedule)
    return schedule


def test_path_velocity_and_inverse_match_the_closed_forms() -> None:
    schedule = flow()
    x0, eps = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 998 + 1
    s = (t / 1000).view(-1, 1, 1, 1)
    x_t = schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps, rtol=0, atol=1e-15)
    # the velocity is the derivative of the path in s: a central difference of the path must give it
    h = 1e-3
    derivative = (schedule.add_noise(x0, eps, t + h) - schedule.add_noise(x0, eps, t - h)) / (2 * h / 1000)
    velocity = schedule.target(x0, eps, t, "v")
    torch.testing.assert_close(velocity, derivative, rtol=0, atol=1e-9)  # the path is linear: rounding only
    x0_back, eps_back = schedule.to_x0_eps(x_t, velocity, t, "v")
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="velocity"):
        schedule.target(x0, eps, t, "eps")


def test_densities_against_their_closed_forms() -> None:
    gen = torch.Generator().manual_seed(0)
    cfg = FlowConfig(logit_mean=0.4, logit_std=0.7, mode_scale=1.29)
    n = 40000
    u = sample_density("uniform", n, cfg, gen, torch.device("cpu"))
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12) ** 0.5 / n**0.5
    logits = torch.logit(sample_density("logit_normal", n, cfg, gen, torch.device("cpu")))
    assert abs(float(logits.mean()) - 0.4) < 4 * 0.7 / n**0.5
    assert abs(float(logits.std()) - 0.7) < 0.02
    # mode: u -> f(u) = 1 - u - c (cos^2(pi u / 2) - 1 + u) is decreasing, so P(f(U) <= f(a)) = 1 - a
    mode = sample_density("mode", n, cfg, gen, torch.device("cpu"))
    for a in (0.1, 0.3, 0.5, 0.8):
        f_a = 1 - a - 1.29 * (math.cos(math.pi * a / 2) ** 2 - 1 + a)
        assert abs(float((mode <= f_a).double().mean()) - (1 - a)) < 4 * (0.25 / n) ** 0.5
    with pytest.raises(ConfigError, match="mode_scale"):
        FlowConfig(mode_scale=2.0)


def test_shift_matches_diffusers_fixed_and_resolution_dependent() -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    ours = flow(shift=3.0)
    reference = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.linspace(1, 1000, 1000, dtype=torch.float64).flip(0) / 1000
    torch.testing.assert_close(shift_levels(u, 3.0), reference.sigmas.double(), rtol=0, atol=1e-6)  # their float32
    cfg = FlowConfig(resolution_shift=True)
    for resolution in (256, 512, 1024):
        mu = calculate_shift((resolution // 16) ** 2)  # Flux's defaults are FlowConfig's
        assert resolved_shift(cfg, resolution) == pytest.approx(math.exp(mu), rel=1e-12)
        dynamic = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        levels = torch.rand(7, dtype=torch.float64) * 0.98 + 0.01
        torch.testing.assert_close(shift_levels(levels, math.exp(mu)), dynamic.time_shift(mu, 1.0, levels),
                                   rtol=1e-12, atol=0)
    # training draws are shifted too: with a = 3 the median level of a uniform u is 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    uniform = flow(shift=3.0, timestep_sampling="uniform")
    draws = uniform.sample_timesteps(20000, torch.Generator().manual_seed(1), torch.device("cpu")) / 1000
    assert abs(float(draws.median()) - 0.75) < 0.02


def test_loss_weights_min_snr_in_x0_space_and_cosmap_against_diffusers() -> None:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    schedule = flow()
    t = torch.rand(6, dtype=torch.float64) * 990 + 5
    s = t / 1000
    x0, eps = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, t)
    wrong_v = schedule.target(x0, eps, t, "v") + 0.1 * torch.randn(6, 8, dtype=torch.float64)
    wrong_x0, _ = schedule.to_x0_eps(x_t, wrong_v, t, "v")
    gamma = 5.0
    v_err = ((wrong_v - schedule.target(x0, eps, t, "v")) ** 2).mean(1)
    x0_err = ((wrong_x0 - x0) ** 2).mean(1)
    snr = ((1 - s) / s) ** 2
    weighted = schedule.loss_weight(t, "v", "min_snr", gamma) * v_err
    torch.testing.assert_close(weighted, snr.clamp(max=gamma) * x0_err, rtol=1e-10, atol=0)
    cosmap = compute_loss_weighting_for_sd3("cosmap", s.float()).double()
    torch.testing.assert_close(schedule.loss_weight(t, "v", "cosmap", gamma), cosmap, rtol=1e-6, atol=0)
    torch.testing.assert_close(schedule.loss_weight(t, "v", "uniform", gamma), torch.ones(6, dtype=torch.float64))


def test_flow_loss_noises_on_the_path_and_targets_the_velocity() -> None:
    schedule = flow(shift=2.0)
    cfg = DiffusionConfig(objective="flow", loss_weighting="uniform", flow=FlowConfig(shift=2.0))
    x0 = torch.randn(4, 3, 8, 8)
    seen = {}

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        seen["x_t"], seen["t"] = x_t.double(), t
        return torch.zeros_like(x_t)

    out = diffusion_loss(predict, x0, schedule, cfg, generator=torch.Generator().manual_seed(0))
    assert seen["t"].dtype == torch.float32 and out.t.dtype == torch.float64
    s = (out.t / 1000).view(-1, 1, 1, 1)
    eps = (seen["x_t"] - (1 - s) * x0.double()) / s  # the noise the loss drew, recovered from the path
    expected = ((eps - x0.double()) ** 2).flatten(1).mean(1)  # the velocity target, predicted as 0
    torch.testing.assert_close(out.per_sample.double(), expected, rtol=1e-5, atol=0)
    assert float(eps.std()) == pytest.approx(1.0, abs=0.1)


def test_noise_augmentation_is_in_flow_time() -> None:
    schedule = flow()
    low_res = torch.rand(3, 3, 4, 4) * 2 - 1
    level = torch.tensor([0.0, 0.3, 1.0])
    got = noise_augment(low_res, level, schedule, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(low_res.shape, generator=torch.Generator().manual_seed(5))
    expected = (1 - level.view(-1, 1, 1, 1)) * low_res + level.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _velocity(x: Tensor, t: Tensor) -> Tensor:
    """A nonlinear, time-dependent velocity field (any will do: both loops must integrate the same ODE)."""
    s = (t.double() / 1000).view(-1, *([1] * (x.dim() - 1)))
    return (torch.tanh(x.double()) * (1 + s) - 0.3 * s).float()


@pytest.mark.parametrize("name", ["flow_euler", "flow_heun"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_our_loop_matches_a_plain_diffusers_loop_from_the_exported_config(name: str, shift: float) -> None:
    schedule = flow(shift=shift)
    sampler = SamplerConfig(name=name, steps=6)
    noise = torch.randn(2, 3, 5, 5)
    ours = sample_loop(_velocity, noise, schedule, "v", sampler)
    config = json.loads(json.dumps(scheduler_config(schedule, sampler, target="v")))
    reference = getattr(diffusers, config["_class_name"]).from_config(config)
    assert reference.config.shift == shift
    reference.set_timesteps(6)
    x = noise.clone()
    for t in reference.timesteps:
        x = reference.step(_velocity(x, t.expand(2)), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=2e-5)  # diffusers steps in float32, we in float64


def test_sdedit_starts_on_the_flow_path_at_the_schedulers_level() -> None:
    schedule = flow(shift=3.0)
    sampler = SamplerConfig(name="flow_euler", steps=10)
    init, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    inputs = []

    def predict(x: Tensor, t: Tensor) -> Tensor:
        inputs.append((x.clone(), t.clone()))
        return _velocity(x, t)

    sample_loop(predict, noise, schedule, "v", sampler, init=init, strength=0.4)
    assert len(inputs) == 4
    reference = make_scheduler(schedule, sampler)
    reference.set_timesteps(10)
    reference.set_begin_index(6)
    start = reference.scale_noise(init, reference.timesteps[6:7], noise)
    torch.testing.assert_close(inputs[0][0], start, rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs[0][1], reference.timesteps[6].expand(2), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="image-to-image"):
        sample_loop(predict, noise, schedule, "v", SamplerConfig(name="flow_heun", steps=4), init=init, strength=0.5)


@pytest.mark.parametrize("name", ["flow_euler", "flow_heun"])
def test_exact_velocity_of_a_point_recovers_it(name: str) -> None:
    schedule = flow(shift=3.0)
    point = torch.randn(1, 3, 4, 4)

    def predict(x: Tensor, t: Tensor) -> Tensor:
        s = (t.double() / 1000).view(-1, 1, 1, 1)
        return ((x.double() - point) / s).float()  # eps - x0 with eps = (x - (1 - s) x0) / s

    out = sample_loop(predict, torch.randn(2, 3, 4, 4), schedule, "v", SamplerConfig(name=name, steps=4))
    torch.testing.assert_close(out, point.expand(2, -1, -1, -1), rtol=0, atol=1e-5)


def test_objective_and_sampler_must_agree() -> None:
    with pytest.raises(ConfigError, match="model.diffusion.target"):
        DiffusionConfig(objective="flow", target="eps")
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        DiffusionConfig(objective="flow", zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="cosmap"):
        DiffusionConfig(loss_weighting="cosmap")
    with pytest.raises(ConfigError, match="flow_euler"):
        make_scheduler(flow(), SamplerConfig(name="dpmpp_2m"))
    vp = build_schedule(DiffusionConfig(), resolution=64)
    assert isinstance(vp, NoiseSchedule)
    with pytest.raises(ConfigError, match="dpmpp_2m"):
        make_scheduler(vp, SamplerConfig(name="flow_euler"))


def test_the_prior_refuses_flow_matching_in_one_line() -> None:
    from pipeline.stages.prior import PriorStageConfig

    flow_cfg = DiffusionConfig(objective="flow", loss_weighting="uniform")
    with pytest.raises(ConfigError, match="model.diffusion.objective must be vp for the prior"):
        PriorStageConfig(clip="bundle/clip", diffusion=flow_cfg)
