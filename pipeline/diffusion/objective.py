"""The diffusion training objective and the conditioning tricks around it.

- :func:`diffusion_loss`: draw t and eps (:func:`training_noise`, with optional offset noise), noise x0, ask the
  network for its target, weighted MSE (per-pixel weights from a mask: :func:`masked_mean`).
- :func:`cfg_drop`: which samples lose their condition (classifier-free guidance training).
- :func:`noise_augment`, :func:`random_levels`: Imagen's noise-conditioning augmentation of the low-resolution
  input of a super-resolution stage (the features that tell the network its level belong to the network's
  conditioning: pipeline.models.unet.level_embedding).

Randomness comes from `generator` when given, else from torch's global RNG: the Trainer checkpoints the global RNG
state of every rank, so drawing from it by default keeps resumed training bit-identical.

Shapes: x0 / low_res (B, C, H, W) (any trailing dims); t, level, loss weights (B,); pixel weights broadcastable to
x0, e.g. (B, 1, H, W).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.diffusion.schedules import DiffusionConfig, Schedule, check_range

Predict = Callable[[Tensor, Tensor], Tensor]



class LossOutput(NamedTuple):
    """loss: scalar, mean over the batch of weight * per_sample; per_sample: (B,) unweighted MSE (float32);
    t: (B,) timesteps drawn (int64 for VP, float64 in [0, T] for flow)."""

    loss: Tensor
    per_sample: Tensor
    t: Tensor


def _generator_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where to draw: a generator only draws on its own device (a CPU generator cannot fill a CUDA tensor)."""
    return generator.device if generator is not None else device


def stratified_timesteps(batch: int, num_timesteps: int, device: torch.device | str,
                         generator: torch.Generator | None = None) -> Tensor:
    """(B,) int64 timesteps, sample j uniform in the j-th of B equal slices of 0..T-1: still uniform over t for a
    sample drawn at random, but a batch covers the whole range (a held-out loss per timestep bucket then has every
    bucket filled as soon as B >= buckets, instead of whatever a few uniform draws happen to hit)."""
    device = torch.device(device)
    u = torch.rand(batch, generator=generator, device=_generator_device(generator, device), dtype=torch.float64)
    slices = (torch.arange(batch, dtype=torch.float64, device=u.device) + u) / batch
    return (slices * num_timesteps).long().clamp(max=num_timesteps - 1).to(device)


def training_noise(x0: Tensor, offset: float, generator: torch.Generator | None = None) -> Tensor:
    """eps ~ N(0, I) shaped like x0 (B, C, ...), float32 or wider, plus offset noise: `offset` * N(0, 1) constant
    over each sample's channel (B, C, 1, ...). Without offset nothing more is drawn (the RNG stream is unchanged)."""
    dtype = torch.promote_types(x0.dtype, torch.float32)
    draw_on = _generator_device(generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=draw_on, dtype=dtype).to(x0.device)
    if offset > 0:
        shape = (*x0.shape[:2], *([1] * (x0.dim() - 2)))
        eps = eps + offset * torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(x0.device)
    return eps


def masked_mean(err: Tensor, weights: Tensor | None) -> Tensor:
    """Per-sample mean (B,) of err (B, ...) weighted by `weights` (broadcastable to err, >= 0, e.g. a (B, 1, H, W)
    mask that is 0 on watermarks or padding): sum(w * err) / sum(w) per sample, 0 for a sample weighted 0
    everywhere (it then adds nothing to the loss instead of dividing by zero)."""
    batch = err.shape[0]
    if weights is None:
        return err.reshape(batch, -1).mean(dim=1)
    weights = weights.to(device=err.device, dtype=err.dtype).expand_as(err)
    if weights.device.type == "cpu" and bool((weights < 0).any()):
        raise ValueError("loss weights (the sample's mask) must be >= 0")
    total = weights.reshape(batch, -1).sum(dim=1)
    weighted = (weights * err).reshape(batch, -1).sum(dim=1)
    return torch.where(total > 0, weighted / total.clamp(min=torch.finfo(err.dtype).tiny), torch.zeros_like(total))


def diffusion_loss(predict: Predict, x0: Tensor, schedule: Schedule, cfg: DiffusionConfig,
                   generator: torch.Generator | None = None, t: Tensor | None = None,
                   weights: Tensor | None = None) -> LossOutput:
    """Weighted MSE between predict(x_t, t) and the `cfg.target` of (x0, eps), eps ~ N(0, I), t from the
    schedule's training density (VP: uniform over 0..T-1; flow: the shifted density of model.diffusion.flow).

    predict(x_t (B, ...) in x0's dtype, t (B,) int64 (VP) or float32 in [0, T] (flow)) -> (B, ...). The MSE is
    taken in float32 (or wider): a bf16 difference of two nearly equal predictions would be mostly rounding error.
    `t` (B,) int64: use these timesteps
    instead of drawing them (e.g. :func:`stratified_timesteps` for a held-out loss). `weights`: per-pixel loss
    weights broadcastable to x0 (e.g. (B, 1, H, W) from a mask in the sample): the MSE becomes their weighted mean
    (:func:`masked_mean`). The noise carries cfg.offset_noise (:func:`training_noise`).
    """
    batch, device = x0.shape[0], x0.device
    if t is None:
        t = schedule.sample_timesteps(batch, generator, device)
    eps = training_noise(x0, cfg.offset_noise, generator)
    x_t = schedule.add_noise(x0, eps, t)
    target = schedule.target(x0, eps, t, cfg.target)
    out = predict(x_t, t.float() if t.is_floating_point() else t)  # flow: float64 draws, float32 like sampling
    if out.shape != x0.shape:
        raise ValueError(f"the network returned shape {tuple(out.shape)} for inputs of shape {tuple(x0.shape)}")
    err = (out.to(target.dtype) - target) ** 2
    per_sample = masked_mean(err, weights)
    weight = schedule.loss_weight(t, cfg.target, cfg.loss_weighting, cfg.min_snr_gamma).to(per_sample.dtype)
    return LossOutput(loss=(weight * per_sample).mean(), per_sample=per_sample, t=t)


def cfg_drop(batch_size: int, prob: float, device: torch.device | str,
             generator: torch.Generator | None = None) -> Tensor:
    """(B,) bool, True where a sample's condition is replaced by the null condition (probability `prob` each)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"condition drop probability must be in [0, 1], got {prob}")
    device = torch.device(device)
    u = torch.rand(batch_size, generator=generator, device=_generator_device(generator, device))
    return (u < prob).to(device)  # rand is in [0, 1): prob 0 never drops, prob 1 always does


def noise_augment(low_res: Tensor, level: Tensor, schedule: Schedule,
                  generator: torch.Generator | None = None) -> Tensor:
    """Imagen's noise-conditioning augmentation: low_res (B, ...) noised to the timestep of `level`.

    The stage's own forward process at ``schedule.level_timestep(level)``: VP z = sqrt(abar) x + sqrt(1 - abar) eps
    at timestep level * (T-1) (fractional), flow z = (1 - level) x + level eps; so level 0 is (almost) clean and
    level 1 is (almost) pure noise. The super-resolution U-Net learns to ignore artefacts of the base stage's
    output that look like this noise. Returns low_res's dtype.
    """
    level = torch.as_tensor(level, device=low_res.device)
    if level.shape != (low_res.shape[0],):
        raise ValueError(f"noise-augmentation level must have shape ({low_res.shape[0]},), got {tuple(level.shape)}")
    check_range(level, 0.0, 1.0, "noise-augmentation levels")
    eps_dtype = torch.promote_types(low_res.dtype, torch.float32)
    eps = torch.randn(low_res.shape, generator=generator, device=_generator_device(generator, low_res.device),
                      dtype=eps_dtype).to(low_res.device)
    return schedule.add_noise(low_res, eps, schedule.level_timestep(level))


def random_levels(batch: int, max_level: float, device: torch.device | str,
                  generator: torch.Generator | None = None) -> Tensor:
    """(B,) float32 augmentation levels, uniform in [0, max_level] (training draws a fresh level per sample)."""
    if not 0.0 <= max_level <= 1.0:
        raise ValueError(f"maximum noise-augmentation level must be in [0, 1], got {max_level}")
    device = torch.device(device)
    u = torch.rand(batch, generator=generator, device=_generator_device(generator, device))
    return (u * max_level).to(device)
