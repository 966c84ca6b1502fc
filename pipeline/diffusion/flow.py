"""Rectified flow (flow matching): the straight path between data and noise, and the velocity along it.

x_s = (1 - s) x0 + s eps for a noise level s in [0, 1] (s = 0 clean data, s = 1 pure noise), and the network
predicts the velocity dx_s/ds = eps - x0 (Liu et al. 2022; Esser et al. 2024, "SD3"). Networks and diffusers
schedulers are conditioned on the timestep t = s * T (T = ``model.diffusion.num_timesteps``, 1000 by default),
diffusers' convention (``FlowMatchEulerDiscreteScheduler.timesteps = sigmas * num_train_timesteps``), so every
method below takes t in [0, T], like :class:`pipeline.diffusion.schedules.NoiseSchedule` takes its integer steps.

Training draws u from a density on (0, 1) (uniform, logit-normal or SD3's "mode" density) and applies the shift
s = a u / (1 + (a - 1) u): a > 1 moves training (and, through the exported scheduler, sampling) towards noisier
levels, which larger images need (more redundant pixels survive a given s). a is fixed, or Flux's resolution rule
a = exp(mu) with mu linear in the token count of the image (``FlowConfig``).

Shapes: t, s (B,); x0, eps, x_t, out (B, ...) with any number of trailing dims.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pipeline.config_schema import check, doc
from pipeline.diffusion.tensors import check_range, coef, work_dtype

DENSITIES: tuple[str, ...] = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTINGS: tuple[str, ...] = ("uniform", "min_snr", "cosmap")
# Flux's resolution rule counts tokens of its f8 autoencoder's latents packed 2x2: one token per 16x16 pixels.
PIXELS_PER_TOKEN_SIDE = 16


@dataclass(frozen=True)
class FlowConfig:
    """The `model.diffusion.flow` section: how a flow-matching stage draws its noise levels during training."""

    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = doc(
        "logit_normal", "Density of the unshifted noise level u in (0, 1): 'uniform', 'logit_normal' (u = "
                        "sigmoid(N(logit_mean, logit_std^2)), SD3's default) or 'mode' (SD3's mode density with "
                        "`mode_scale`).")
    logit_mean: float = doc(0.0, "Mean of the normal whose sigmoid is u ('logit_normal'; unitless).")
    logit_std: float = doc(1.0, "Standard deviation of that normal ('logit_normal'; unitless, > 0).")
    mode_scale: float = doc(1.29, "Scale of SD3's mode density ('mode'; 0 = uniform; unitless, in [-1, 2/(pi-2)]).")
    shift: float = doc(1.0, "Fixed shift a of the noise level, s = a u / (1 + (a - 1) u) (1 = none; SD3 uses 3 at "
                            "1024 px). Also the exported scheduler's `shift`, so sampling uses the same levels.")
    resolution_shift: bool = doc(False, "Replace `shift` by Flux's resolution rule a = exp(mu), mu linear in the "
                                        "image's token count (data.resolution / 16)^2, from base_shift at "
                                        "base_image_seq_len to max_shift at max_image_seq_len.")
    base_shift: float = doc(0.5, "mu at base_image_seq_len (resolution_shift; unitless).")
    max_shift: float = doc(1.15, "mu at max_image_seq_len (resolution_shift; unitless).")
    base_image_seq_len: int = doc(256, "Token count at which mu = base_shift (256 = a 256 px image).")
    max_image_seq_len: int = doc(4096, "Token count at which mu = max_shift (4096 = a 1024 px image).")

    def __post_init__(self) -> None:
        check(self.timestep_sampling in DENSITIES, "model.diffusion.flow.timestep_sampling",
              f"must be one of {', '.join(DENSITIES)}, got {self.timestep_sampling!r}")
        check(self.logit_std > 0, "model.diffusion.flow.logit_std", f"must be > 0, got {self.logit_std}")
        # the mode density's map u -> 1 - u - scale (cos^2(pi u / 2) - 1 + u) is monotone only in this range
        check(-1.0 <= self.mode_scale <= 2 / (math.pi - 2), "model.diffusion.flow.mode_scale",
              f"must be in [-1, {2 / (math.pi - 2):.3f}] (the density's map is monotone there), got {self.mode_scale}")
        check(self.shift > 0, "model.diffusion.flow.shift", f"must be > 0, got {self.shift}")
        check(0 < self.base_image_seq_len < self.max_image_seq_len, "model.diffusion.flow.base_image_seq_len",
              f"and max_image_seq_len must satisfy 0 < base < max, got {self.base_image_seq_len} and "
              f"{self.max_image_seq_len}")


def resolved_shift(cfg: FlowConfig, resolution: int) -> float:
    """The shift a for output images of side `resolution` pixels (a latent stage passes its image side)."""
    if not cfg.resolution_shift:
        return cfg.shift
    tokens = (resolution // PIXELS_PER_TOKEN_SIDE) ** 2
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return math.exp(cfg.base_shift + slope * (tokens - cfg.base_image_seq_len))


def shift_levels(u: Tensor, shift: float) -> Tensor:
    """s = a u / (1 + (a - 1) u): keeps 0 and 1, and for a > 1 raises every level in between."""
    return shift * u / (1 + (shift - 1) * u)


def sample_density(kind: str, batch: int, cfg: FlowConfig, generator: torch.Generator | None,
                   device: torch.device) -> Tensor:
    """(B,) float64 unshifted levels u in [0, 1] from density `kind`, drawn on `device` (the generator's)."""
    if kind == "logit_normal":
        normal = torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal)
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    if kind == "uniform":
        return u
    if kind == "mode":
        return 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"timestep density must be one of {', '.join(DENSITIES)}, got {kind!r}")


class FlowSchedule:
    """The rectified-flow process, addressed by timestep t = s * T in [0, T] (see the module docstring)."""

    def __init__(self, cfg: FlowConfig, num_timesteps: int, shift: float) -> None:
        if num_timesteps < 2 or shift <= 0:
            raise ValueError(f"a flow schedule needs num_timesteps >= 2 and shift > 0, got {num_timesteps}, {shift}")
        self.cfg = cfg
        self.num_timesteps = num_timesteps
        self.shift = shift

    def level(self, t: Tensor) -> Tensor:
        """Noise level s = t / T (B,) float64."""
        t = torch.as_tensor(t).to(torch.float64)
        check_range(t, 0, self.num_timesteps, "flow timesteps")
        return t / self.num_timesteps

    def sample_timesteps(self, batch: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(B,) float64 training timesteps: shifted levels of the configured density, times T, on `device`."""
        draw_on = generator.device if generator is not None else device
        u = sample_density(self.cfg.timestep_sampling, batch, self.cfg, generator, draw_on)
        return (shift_levels(u, self.shift) * self.num_timesteps).to(device)

    def level_timestep(self, level: Tensor) -> Tensor:
        """Timestep of noise-augmentation level (B,) in [0, 1]: the level is the flow's own s."""
        return torch.as_tensor(level).to(torch.float64) * self.num_timesteps

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - s) x0 + s eps, computed in float32 or wider, returned in x0's dtype."""
        dtype = torch.promote_types(work_dtype(x0), work_dtype(eps))
        s = coef(self.level(t), x0, dtype)
        return ((1 - s) * x0.to(dtype) + s * eps.to(dtype)).to(x0.dtype)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, kind: str) -> Tensor:
        """The velocity eps - x0 (float32 or wider); `kind` must be 'v' (flow stages predict velocity)."""
        _check_velocity(kind)
        dtype = torch.promote_types(work_dtype(x0), work_dtype(eps))
        return eps.to(dtype) - x0.to(dtype)

    def to_x0_eps(self, x_t: Tensor, out: Tensor, t: Tensor, kind: str) -> tuple[Tensor, Tensor]:
        """(x0, eps) of velocity `out` at x_t: x0 = x_t - s v, eps = x_t + (1 - s) v."""
        _check_velocity(kind)
        dtype = torch.promote_types(work_dtype(x_t), work_dtype(out))
        s = coef(self.level(t), x_t, dtype)
        x_t, out = x_t.to(dtype), out.to(dtype)
        return x_t - s * out, x_t + (1 - s) * out

    def loss_weight(self, t: Tensor, kind: str, weighting: str, gamma: float) -> Tensor:
        """Per-sample weight (B,) float64 of the velocity MSE.

        x0 = x_t - s v, so the x0-space error is s^2 times the velocity error: min-SNR-gamma (x0 error weighted
        by min(snr, gamma), snr = ((1 - s) / s)^2) reads min((1 - s)^2, gamma s^2) on velocity. 'cosmap' is
        SD3's cosine-map weight 2 / (pi (1 - 2 s + 2 s^2)).
        """
        _check_velocity(kind)
        s = self.level(t)
        if weighting == "uniform":
            return torch.ones_like(s)
        if weighting == "min_snr":
            if gamma <= 0:
                raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
            return torch.minimum((1 - s) ** 2, gamma * s**2)
        if weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
        raise ValueError(f"flow loss weighting must be one of {', '.join(FLOW_WEIGHTINGS)}, got {weighting!r}")


def _check_velocity(kind: str) -> None:
    if kind != "v":
        raise ValueError(f"a flow-matching stage predicts the velocity (target 'v'), got {kind!r}")
