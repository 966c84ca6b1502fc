"""Discrete variance-preserving noise schedules and the eps / x0 / v parameterisations.

The forward process is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for integer t in [0, T-1] (t = 0 is the least
noisy step, as in diffusers). Everything a sampler or the loss needs is a function of abar, so the conversions
below are written once in terms of abar and the :class:`NoiseSchedule` methods only look abar up for t.

Fractional timesteps are allowed everywhere: between integers, log(sigma) with sigma = sqrt((1 - abar) / abar) is
interpolated linearly, which is exactly how diffusers' Euler/Heun/DPM-Solver schedulers map a Karras sigma back to
a (fractional) timestep (their ``_sigma_to_t``). Hence a model conditioned on our fractional t sees the noise
level those schedulers actually sampled at.

Tables are float64 (the cosine schedule's last abar is ~2e-9; float32 would lose the 1 - abar digits near t = 0).
Shapes: t (B,); x0, eps, x_t, out (B, ...) with any number of trailing dims.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pipeline.config_schema import check, doc
from pipeline.diffusion.flow import FLOW_WEIGHTINGS, FlowConfig, FlowSchedule, resolved_shift
from pipeline.diffusion.tensors import check_range, coef, work_dtype

Target = Literal["eps", "x0", "v"]
TARGETS: tuple[str, ...] = ("eps", "x0", "v")
SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "cosine", "shifted_cosine")
WEIGHTINGS: tuple[str, ...] = ("uniform", "min_snr", "cosmap")
OBJECTIVES: tuple[str, ...] = ("vp", "flow")

COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s: keeps beta_0 from being vanishingly small
MAX_BETA = 0.999  # the cap of diffusers' "squaredcos_cap_v2"; without it the last beta is 1 and abar_{T-1} = 0
# abar at t = T-1 of a zero-terminal-SNR schedule. Exactly 0 makes sigma_max infinite (sigma-space samplers, the
# log-sigma table, eps -> x0); diffusers' samplers substitute 2^-24 for it (their rescale_betas_zero_snr), and so do
# we, in training as in sampling: the signal left at t = T-1 is sqrt(2^-24) = 2.4e-4 of x0 (vs 4% for SD's schedule).
TERMINAL_ABAR = 2.0**-24


@dataclass(frozen=True)
class DiffusionConfig:
    """The `model.diffusion` section: noise schedule, prediction target and loss weighting of a diffusion stage."""

    objective: Literal["vp", "flow"] = doc(
        "vp", "Diffusion process: 'vp' (the discrete variance-preserving DDPM family: schedule, eps / x0 / v) or "
              "'flow' (rectified flow x_t = (1 - s) x0 + s eps, velocity target eps - x0, settings in `flow`; "
              "needs target v and a flow_* sampler; schedule, betas and zero_terminal_snr do not apply).")
    schedule: Literal["linear", "scaled_linear", "cosine", "shifted_cosine"] = doc(
        "cosine", "Noise schedule: 'linear' betas (DDPM), 'scaled_linear' (betas linear in sqrt(beta): Stable "
                  "Diffusion's), 'cosine' (Nichol & Dhariwal, diffusers' squaredcos_cap_v2) or 'shifted_cosine' "
                  "(cosine with log-SNR shifted by 2*log(shift_base_resolution / resolution), 'simple diffusion', for "
                  "high resolutions).")
    num_timesteps: int = doc(1000, "Training timesteps T; t runs over 0..T-1.")
    beta_start: float = doc(1e-4, "First beta of the linear / scaled_linear schedule (unitless variance per step).")
    beta_end: float = doc(0.02, "Last beta of the linear / scaled_linear schedule (unitless variance per step).")
    zero_terminal_snr: bool = doc(False, "Rescale the schedule so that t = T-1 holds no signal (Lin et al. 2023: "
                                         "sqrt(abar) shifted to 0 at T-1 and scaled to keep t = 0; abar_{T-1} = 2^-24 "
                                         "so sigma stays finite). Training then sees at t = T-1 the pure noise sampling "
                                         "starts from. Needs target v or x0 (eps cannot give x0 without signal).")
    shift_base_resolution: int = doc(64, "Pixels of the output image (for a latent stage too: the image side its "
                                         "latents decode to, data.resolution, never the latent side); the resolution "
                                         "at which the shifted cosine schedule equals the plain cosine one.")
    target: Literal["eps", "x0", "v"] = doc("v", "What the network predicts: noise 'eps', clean data 'x0', or "
                                                 "velocity 'v' = sqrt(abar)*eps - sqrt(1-abar)*x0.")
    loss_weighting: Literal["uniform", "min_snr", "cosmap"] = doc(
        "min_snr", "Per-timestep loss weight: 'uniform' (1), min-SNR-gamma (Hang et al. 2023), expressed for "
                   "`target` (for flow: on the velocity), or 'cosmap' (SD3's cosine-map weight; flow only).")
    min_snr_gamma: float = doc(5.0, "gamma of min-SNR weighting: the signal-to-noise ratio above which timesteps "
                                    "stop gaining weight (unitless).")
    offset_noise: float = doc(0.0, "Offset noise (Guttenberg 2023): std of a constant per sample and channel added "
                                   "to the training noise, so the model learns to change an image's mean (very "
                                   "dark or bright images); 0 = off, 0.05-0.1 usual (unitless, data units).")
    flow: FlowConfig = doc(FlowConfig(), "Flow matching (objective: flow): training timestep density and shift.")

    def __post_init__(self) -> None:
        check(self.schedule in SCHEDULES, "model.diffusion.schedule",
              f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        check(self.num_timesteps >= 2, "model.diffusion.num_timesteps", f"must be >= 2, got {self.num_timesteps}")
        check(0.0 < self.beta_start <= self.beta_end < 1.0, "model.diffusion.beta_start",
              f"and beta_end must satisfy 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}")
        check(self.shift_base_resolution > 0, "model.diffusion.shift_base_resolution",
              f"must be a positive pixel count, got {self.shift_base_resolution}")
        check(self.target in TARGETS, "model.diffusion.target",
              f"must be one of {', '.join(TARGETS)}, got {self.target!r}")
        check(self.loss_weighting in WEIGHTINGS, "model.diffusion.loss_weighting",
              f"must be one of {', '.join(WEIGHTINGS)}, got {self.loss_weighting!r}")
        check(self.min_snr_gamma > 0, "model.diffusion.min_snr_gamma", f"must be > 0, got {self.min_snr_gamma}")
        check(not (self.zero_terminal_snr and self.target == "eps"), "model.diffusion.zero_terminal_snr",
              "needs model.diffusion.target v or x0: at zero terminal SNR an eps prediction says nothing about x0")
        check(self.offset_noise >= 0, "model.diffusion.offset_noise", f"must be >= 0, got {self.offset_noise}")
        check(self.objective in OBJECTIVES, "model.diffusion.objective",
              f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "flow":
            check(self.target == "v", "model.diffusion.target",
                  f"must be v (the velocity eps - x0) with objective flow, got {self.target!r}")
            check(not self.zero_terminal_snr, "model.diffusion.zero_terminal_snr",
                  "does not apply to objective flow (its noise level 1 is pure noise already); set it to false")
            check(self.loss_weighting in FLOW_WEIGHTINGS, "model.diffusion.loss_weighting",
                  f"must be one of {', '.join(FLOW_WEIGHTINGS)} with objective flow, got {self.loss_weighting!r}")
        else:
            check(self.loss_weighting != "cosmap", "model.diffusion.loss_weighting",
                  "cosmap is a flow-matching weight; use uniform or min_snr with objective vp")


def check_target(kind: str) -> None:
    """Raise ValueError unless `kind` is one of eps / x0 / v."""
    if kind not in TARGETS:
        raise ValueError(f"prediction target must be one of {', '.join(TARGETS)}, got {kind!r}")


def x0_eps_from_output(x_t: Tensor, out: Tensor, abar: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by the network output `out` in parameterisation `kind` at noise level abar (B,).

    x_t, out: (B, ...). Returns tensors in float32 or wider (the wider of the inputs' dtypes).
    """
    check_target(kind)
    dtype = torch.promote_types(work_dtype(x_t), work_dtype(out))
    a, s = coef(abar.sqrt(), x_t, dtype), coef((1 - abar).sqrt(), x_t, dtype)
    x_t, out = x_t.to(dtype), out.to(dtype)
    if kind == "eps":
        return (x_t - s * out) / a, out
    if kind == "x0":
        return out, (x_t - a * out) / s
    # v = a*eps - s*x0 and x_t = a*x0 + s*eps form a rotation (a^2 + s^2 = 1), so the inverse is its transpose
    return a * x_t - s * out, s * x_t + a * out


def output_from_x0_eps(x0: Tensor, eps: Tensor, abar: Tensor, kind: str) -> Tensor:
    """The network output in parameterisation `kind` for (x0, eps) at noise level abar (B,); float32 or wider."""
    check_target(kind)
    dtype = torch.promote_types(work_dtype(x0), work_dtype(eps))
    if kind == "eps":
        return eps.to(dtype)
    if kind == "x0":
        return x0.to(dtype)
    a, s = coef(abar.sqrt(), x0, dtype), coef((1 - abar).sqrt(), x0, dtype)
    return a * eps.to(dtype) - s * x0.to(dtype)


class NoiseSchedule:
    """A discrete VP schedule given by its betas (float64, (T,)); every other table is derived from them.

    Building from betas (not abar) keeps us on the path a diffusers scheduler takes with ``trained_betas``
    (abar = cumprod(1 - betas)); diffusers does it in float32, we in float64.
    """

    def __init__(self, betas: Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"a noise schedule needs a 1-D tensor of at least 2 betas, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta of a noise schedule must lie in (0, 1)")
        self.betas = betas
        self.num_timesteps = int(betas.numel())
        log_abar = torch.cumsum(torch.log1p(-betas), 0)
        self.alphas_cumprod = torch.exp(log_abar)
        # 1 - abar via expm1: near t = 0 abar is 0.99996 and the plain subtraction would lose 5 digits
        self.log_sigmas = 0.5 * (torch.log(-torch.expm1(log_abar)) - log_abar)
        self._device_tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(alphas_cumprod, log_sigmas) on `device`, cached so a training step does not copy them every call."""
        if device not in self._device_tables:
            self._device_tables[device] = (self.alphas_cumprod.to(device), self.log_sigmas.to(device))
        return self._device_tables[device]

    def _timesteps(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t).to(torch.float64)
        check_range(t, 0, self.num_timesteps - 1, "timesteps")
        return t

    def log_sigma(self, t: Tensor) -> Tensor:
        """log(sigma) at (fractional) t (B,), float64; linear in t between integer timesteps."""
        t = self._timesteps(t)
        _, log_sigmas = self._tables(t.device)
        lo = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - lo
        return log_sigmas[lo] + w * (log_sigmas[lo + 1] - log_sigmas[lo])

    def alpha_bar(self, t: Tensor) -> Tensor:
        """abar at (fractional) t (B,), float64; exactly the table value at integer t."""
        t = self._timesteps(t)
        abar, _ = self._tables(t.device)
        nearest = t.round()
        interpolated = torch.sigmoid(-2 * self.log_sigma(t))  # abar = 1 / (1 + sigma^2)
        return torch.where(t == nearest, abar[nearest.long()], interpolated)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio abar / (1 - abar) = 1 / sigma^2 at t (B,), float64."""
        return torch.exp(-2 * self.log_sigma(t))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep (float64, same shape) whose sigma is `sigma` (> 0); inverse of the interpolation.

        Sigmas outside the table's range map to 0 or T-1, as in diffusers' ``_sigma_to_t``.
        """
        sigma = torch.as_tensor(sigma).to(torch.float64)
        _, log_sigmas = self._tables(sigma.device)
        ls = torch.log(sigma.clamp(min=1e-10))
        lo = (torch.searchsorted(log_sigmas, ls.reshape(-1)).reshape(ls.shape) - 1).clamp(0, self.num_timesteps - 2)
        w = ((ls - log_sigmas[lo]) / (log_sigmas[lo + 1] - log_sigmas[lo])).clamp(0, 1)
        return lo + w

    def sample_timesteps(self, batch: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(B,) int64 training timesteps, uniform over 0..T-1, drawn on the generator's device, returned on `device`."""
        draw_on = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=draw_on).to(device)

    def level_timestep(self, level: Tensor) -> Tensor:
        """(Fractional) timestep level * (T-1) (float64) of noise-augmentation levels (B,) in [0, 1]."""
        return torch.as_tensor(level).to(torch.float64) * (self.num_timesteps - 1)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, computed in float32 or wider, returned in x0's dtype."""
        abar = self.alpha_bar(t)
        dtype = torch.promote_types(work_dtype(x0), work_dtype(eps))
        a, s = coef(abar.sqrt(), x0, dtype), coef((1 - abar).sqrt(), x0, dtype)
        return (a * x0.to(dtype) + s * eps.to(dtype)).to(x0.dtype)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, kind: str) -> Tensor:
        """What a network with parameterisation `kind` should output for (x0, eps) at t; float32 or wider."""
        return output_from_x0_eps(x0, eps, self.alpha_bar(t), kind)

    def to_x0_eps(self, x_t: Tensor, out: Tensor, t: Tensor, kind: str) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by network output `out` (parameterisation `kind`) for x_t at t."""
        return x0_eps_from_output(x_t, out, self.alpha_bar(t), kind)

    def from_x0_eps(self, x_t: Tensor, x0: Tensor, eps: Tensor, t: Tensor, kind: str) -> Tensor:
        """Inverse of :meth:`to_x0_eps`. `x_t` is not needed by eps/x0/v (it is implied by x0 and eps); it is
        accepted so both directions take the same arguments."""
        del x_t
        return output_from_x0_eps(x0, eps, self.alpha_bar(t), kind)

    def loss_weight(self, t: Tensor, kind: str, weighting: str, gamma: float) -> Tensor:
        """Per-sample weight (B,) float64 of the MSE on target `kind`.

        min-SNR-gamma weights the x0-space error by min(snr, gamma). The MSE on eps is snr times the x0-space
        error and the MSE on v is (snr + 1) times it (x_t fixed), so the same weighting reads min(snr, g) / snr
        for eps, min(snr, g) for x0 and min(snr, g) / (snr + 1) for v.
        """
        check_target(kind)
        if weighting == "uniform":
            t = torch.as_tensor(t)
            return torch.ones(t.shape, dtype=torch.float64, device=t.device)
        if weighting != "min_snr":
            raise ValueError(f"loss weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if gamma <= 0:
            raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        if kind == "eps":
            return clipped / snr
        if kind == "x0":
            return clipped
        return clipped / (snr + 1)


def cosine_betas(num_timesteps: int, offset: float = COSINE_OFFSET, max_beta: float = MAX_BETA) -> Tensor:
    """Nichol & Dhariwal's cosine betas, float64 (T,), discretised as diffusers' "squaredcos_cap_v2":
    beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta) with f(u) = cos((u + s) / (1 + s) * pi/2)^2."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def _shift_log_snr(betas: Tensor, shift: float) -> Tensor:
    """Betas of the schedule whose log-SNR is that of `betas` plus `shift` at every timestep."""
    log_abar = torch.cumsum(torch.log1p(-betas), 0)
    log_snr = log_abar - torch.log(-torch.expm1(log_abar))  # logit(abar)
    shifted_log_abar = torch.nn.functional.logsigmoid(log_snr + shift)
    step = torch.diff(shifted_log_abar, prepend=torch.zeros(1, dtype=torch.float64))
    return -torch.expm1(step)  # beta_t = 1 - abar_t / abar_{t-1}


def zero_terminal_snr(betas: Tensor, terminal_abar: float = TERMINAL_ABAR) -> Tensor:
    """Betas (T,) float64 of Lin et al.'s rescale (2023, Algorithm 1): sqrt(abar) shifted so its last value is 0
    and scaled so its first is kept, then abar_{T-1} set to `terminal_abar` (see TERMINAL_ABAR)."""
    root = torch.exp(0.5 * torch.cumsum(torch.log1p(-betas), 0))
    first, last = root[0].clone(), root[-1].clone()
    abar = ((root - last) * first / (first - last)) ** 2
    abar[-1] = terminal_abar
    previous = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return 1 - abar / previous


Schedule = NoiseSchedule | FlowSchedule


def build_schedule(cfg: DiffusionConfig, resolution: int) -> Schedule:
    """The schedule `cfg` describes for a stage whose output images have side `resolution` in pixels (a latent
    stage passes its image side, not its latent side, so shift_base_resolution means the same in both spaces).

    `resolution` only matters for 'shifted_cosine': log-SNR += 2*log(shift_base_resolution / resolution), so a
    larger image (more redundant pixels) gets proportionally more noise at every t ("simple diffusion").
    The zero-terminal-SNR rescale comes last, so the shifted schedule's terminal SNR is zero too.
    Objective 'flow' gives a :class:`FlowSchedule` instead, its shift resolved for `resolution`.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be a positive pixel count, got {resolution}")
    if cfg.objective == "flow":
        return FlowSchedule(cfg.flow, cfg.num_timesteps, resolved_shift(cfg.flow, resolution))
    T = cfg.num_timesteps
    if cfg.schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    elif cfg.schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float64) ** 2
    else:
        betas = cosine_betas(T)
        if cfg.schedule == "shifted_cosine":
            betas = _shift_log_snr(betas, 2 * math.log(cfg.shift_base_resolution / resolution))
    if cfg.zero_terminal_snr:
        betas = zero_terminal_snr(betas)
    return NoiseSchedule(betas)


def scheduler_betas(schedule: NoiseSchedule) -> list[float]:
    """The betas as plain floats: diffusers schedulers take them as ``trained_betas`` (and JSON stores them)."""
    return schedule.betas.tolist()
