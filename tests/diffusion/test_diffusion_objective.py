"""Training loss (targets, weights, RNG use), CFG dropout, noise-conditioning augmentation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from pipeline.diffusion.objective import (cfg_drop, diffusion_loss, masked_mean, noise_augment, random_levels,
                                          training_noise)
from pipeline.diffusion.schedules import DiffusionConfig, NoiseSchedule, build_schedule
from pipeline.models.unet import level_embedding

SCHEDULE = build_schedule(DiffusionConfig(), resolution=64)


def exact_predictor(schedule: NoiseSchedule, x0: Tensor, kind: str):
    """Knows x0, so it can return the exact target for any x_t: eps = (x_t - sqrt(a) x0) / sqrt(1 - a)."""
    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        eps = schedule.to_x0_eps(x_t, x0, t, "x0")[1]
        return schedule.target(x0, eps, t, kind)
    return predict


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_exact_target_gives_zero_loss_and_a_wrong_one_does_not(kind: str) -> None:
    cfg = DiffusionConfig(target=kind)
    x0 = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    out = diffusion_loss(exact_predictor(SCHEDULE, x0, kind), x0, SCHEDULE, cfg)
    assert out.loss.item() < 1e-20 and out.per_sample.shape == (8,)
    assert out.t.shape == (8,) and out.t.dtype == torch.int64
    assert bool(((out.t >= 0) & (out.t < 1000)).all())
    other = {"eps": "v", "x0": "eps", "v": "x0"}[kind]
    wrong = diffusion_loss(exact_predictor(SCHEDULE, x0, other), x0, SCHEDULE, cfg)
    assert wrong.loss.item() > 1e-3


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_loss_weighting_is_applied(kind: str) -> None:
    x0 = torch.randn(64, 2, 4, 4, dtype=torch.float64)
    exact = exact_predictor(SCHEDULE, x0, kind)
    off_by = 0.3  # a constant error: per-sample MSE = 0.09 whatever t is

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        return exact(x_t, t) + off_by

    weighted = diffusion_loss(predict, x0, SCHEDULE, DiffusionConfig(target=kind, loss_weighting="min_snr"))
    torch.testing.assert_close(weighted.per_sample, torch.full((64,), off_by**2, dtype=torch.float64))
    w = SCHEDULE.loss_weight(weighted.t, kind, "min_snr", 5.0)
    assert w.std() > 0  # the draw covers timesteps with different weights
    torch.testing.assert_close(weighted.loss, (w * off_by**2).mean())
    uniform = diffusion_loss(predict, x0, SCHEDULE, DiffusionConfig(target=kind, loss_weighting="uniform"))
    torch.testing.assert_close(uniform.loss, torch.tensor(off_by**2, dtype=torch.float64))


def test_loss_is_taken_in_float32_for_bf16_inputs_and_backpropagates() -> None:
    x0 = torch.randn(4, 3, 8, 8).to(torch.bfloat16)
    weight = torch.nn.Parameter(torch.zeros(()))
    seen = []

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        seen.append(x_t.dtype)
        return (x_t * weight).to(torch.bfloat16)

    out = diffusion_loss(predict, x0, SCHEDULE, DiffusionConfig())
    assert seen == [torch.bfloat16] and out.loss.dtype == torch.float32 and out.per_sample.dtype == torch.float32
    out.loss.backward()
    assert weight.grad is not None and weight.grad.abs() > 0


def test_randomness_comes_from_the_generator_or_the_global_rng() -> None:
    x0 = torch.randn(16, 1, 4, 4)
    predict = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    cfg = DiffusionConfig()
    a = diffusion_loss(predict, x0, SCHEDULE, cfg, generator=torch.Generator().manual_seed(5))
    b = diffusion_loss(predict, x0, SCHEDULE, cfg, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.t, b.t) and torch.equal(a.per_sample, b.per_sample)
    torch.manual_seed(123)
    c = diffusion_loss(predict, x0, SCHEDULE, cfg)
    torch.manual_seed(123)
    d = diffusion_loss(predict, x0, SCHEDULE, cfg)
    e = diffusion_loss(predict, x0, SCHEDULE, cfg)  # the global RNG moved on
    assert torch.equal(c.t, d.t) and torch.equal(c.per_sample, d.per_sample)
    assert not torch.equal(d.t, e.t)


def test_cfg_drop_rate() -> None:
    g = torch.Generator().manual_seed(0)
    n = 200_000
    drop = cfg_drop(n, 0.1, "cpu", generator=g)
    assert drop.dtype == torch.bool and drop.shape == (n,)
    # binomial std is sqrt(0.1 * 0.9 / n) = 6.7e-4; the seed is fixed, so this 7.5-sigma bound cannot flake
    assert drop.float().mean().item() == pytest.approx(0.1, abs=5e-3)
    assert not cfg_drop(1000, 0.0, "cpu").any() and cfg_drop(1000, 1.0, "cpu").all()
    with pytest.raises(ValueError, match="probability"):
        cfg_drop(4, 1.5, "cpu")


def test_noise_augment_at_a_stated_level() -> None:
    t_quarter = SCHEDULE.sigma_to_t(torch.tensor(math.sqrt(3.0), dtype=torch.float64))  # abar = 1/(1+3) = 0.25
    level = (t_quarter / 999).reshape(1).repeat(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 64, generator=g, dtype=torch.float64)
    z = noise_augment(x, level, SCHEDULE, generator=g)
    noise = z - 0.5 * x  # sqrt(abar) = 0.5
    assert noise.std().item() == pytest.approx(math.sqrt(0.75), rel=0.01)  # 49k samples: std error 0.3%
    assert abs((noise * x).mean().item()) < 0.02  # independent of x: the signal scale is exactly 0.5
    assert z.dtype == x.dtype
    ends = noise_augment(x[:2], torch.tensor([0.0, 1.0]), SCHEDULE)
    abar_0, abar_end = SCHEDULE.alphas_cumprod[0].item(), SCHEDULE.alphas_cumprod[-1].item()
    assert (ends[0] - x[0]).std().item() == pytest.approx(math.sqrt(1 - abar_0), rel=0.03)  # almost clean
    assert ends[1].std().item() == pytest.approx(1.0, rel=0.03) and abar_end < 1e-8  # almost pure noise
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        noise_augment(x, torch.tensor([0.1, 0.2, 0.3, 1.2]), SCHEDULE)


def test_random_levels_and_level_embedding() -> None:
    levels = random_levels(50_000, 0.3, "cpu", generator=torch.Generator().manual_seed(0))
    assert levels.shape == (50_000,) and levels.min() >= 0 and levels.max() <= 0.3
    assert levels.mean().item() == pytest.approx(0.15, abs=3e-3)  # std of the mean 3.9e-4
    emb = level_embedding(torch.tensor([0.0, 0.25, 0.5]), 16)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))  # sin(0), cos(0)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(8) / 8)
    torch.testing.assert_close(emb[1, :8], torch.sin(250.0 * freqs))
    torch.testing.assert_close(emb[1, 8:], torch.cos(250.0 * freqs))
    odd = level_embedding(torch.tensor([0.5]), 7)
    assert odd.shape == (1, 7) and odd[0, -1] == 0
    close = level_embedding(torch.tensor([0.50, 0.51]), 64)  # nearby levels still get distinguishable features
    assert (close[0] - close[1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="dim"):
        level_embedding(torch.tensor([0.5]), 1)
    with pytest.raises(ValueError, match="maximum"):
        random_levels(3, 2.0, "cpu")


def test_stratified_timesteps_cover_every_slice_and_are_uniform_overall() -> None:
    from pipeline.diffusion.objective import stratified_timesteps

    g = torch.Generator().manual_seed(0)
    t = stratified_timesteps(4, 1000, "cpu", generator=g)
    assert t.dtype == torch.int64 and [int(v) // 250 for v in t] == [0, 1, 2, 3]  # one per quarter
    many = torch.cat([stratified_timesteps(5, 1000, "cpu", generator=g) for _ in range(4000)])
    counts = torch.bincount(many // 100, minlength=10).double() / many.numel()
    assert many.min() >= 0 and many.max() <= 999
    torch.testing.assert_close(counts, torch.full((10,), 0.1, dtype=torch.float64), atol=0.01, rtol=0)
    again = stratified_timesteps(4, 1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, t)


def test_offset_noise_is_a_constant_per_sample_and_channel_of_the_stated_std() -> None:
    x0 = torch.zeros(64, 8, 6, 6)
    plain = training_noise(x0, 0.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(plain, torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)))
    offset = training_noise(x0, 0.1, torch.Generator().manual_seed(3)) - plain  # same stream, then the offset
    torch.testing.assert_close(offset, offset[..., :1, :1].expand_as(offset), rtol=0, atol=1e-6)
    std = float(offset[..., 0, 0].double().std())
    assert abs(std - 0.1) < 0.1 * 4 / (2 * 64 * 8) ** 0.5  # sample std of 512 normals: relative error 1/sqrt(2n)


@pytest.mark.parametrize("objective", ["vp", "flow"])
def test_the_loss_noises_with_the_offset_noise(objective: str) -> None:
    cfg = DiffusionConfig(objective=objective, loss_weighting="uniform", offset_noise=0.2)
    schedule = build_schedule(cfg, resolution=16)
    x0 = torch.randn(3, 3, 8, 8)
    seen = {}

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    out = diffusion_loss(predict, x0, schedule, cfg, generator=torch.Generator().manual_seed(9))
    replay = torch.Generator().manual_seed(9)  # the loss draws t, then the noise
    t = schedule.sample_timesteps(3, replay, x0.device)
    eps = training_noise(x0, 0.2, replay)
    torch.testing.assert_close(out.t, t)
    torch.testing.assert_close(seen["x_t"], schedule.add_noise(x0, eps, t), rtol=0, atol=0)


def test_masked_loss_ignores_masked_pixels_and_matches_a_float64_reference() -> None:
    schedule = build_schedule(DiffusionConfig(objective="flow", loss_weighting="uniform"), resolution=16)
    cfg = DiffusionConfig(objective="flow", loss_weighting="uniform")
    x0 = torch.randn(3, 3, 8, 8)
    mask = (torch.rand(3, 1, 8, 8) > 0.5).float()
    mask[2] = 0  # a sample masked everywhere adds nothing
    prediction = torch.randn(3, 3, 8, 8)

    def run(pred: Tensor):
        return diffusion_loss(lambda x_t, t: pred, x0, schedule, cfg, generator=torch.Generator().manual_seed(1),
                              weights=mask)

    out = run(prediction)
    changed = run(prediction + 5.0 * (1 - mask) * torch.randn(3, 3, 8, 8))  # only where the mask is 0
    torch.testing.assert_close(changed.per_sample, out.per_sample, rtol=0, atol=0)
    replay = torch.Generator().manual_seed(1)
    t = schedule.sample_timesteps(3, replay, x0.device)
    eps = training_noise(x0, 0.0, replay).double()
    err = (prediction.double() - (eps - x0.double())) ** 2
    w = mask.double().expand_as(err)
    expected = (w * err).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1e-300)
    torch.testing.assert_close(out.per_sample.double(), expected, rtol=1e-6, atol=0)
    assert float(out.per_sample[2]) == 0.0
    assert bool((out.per_sample[:2] > 0).all())
    with pytest.raises(ValueError, match=">= 0"):
        masked_mean(torch.ones(1, 4), -torch.ones(1, 4))
