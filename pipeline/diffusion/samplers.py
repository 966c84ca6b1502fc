"""Sampling: diffusers schedulers built from our schedule, driven by our loop.

The scheduler classes are diffusers' own (so an exported ``scheduler_config.json`` loads in diffusers and means
the same schedule); the loop is ours because it must (a) call a model in any of the eps / x0 / v
parameterisations, (b) apply dynamic thresholding to x0 before the update, and (c) condition the model on the exact
(fractional) timestep of the noise level the scheduler is at.

The loop converts the model output to x0 itself, optionally thresholds it, and hands the scheduler that x0
(``prediction_type="sample"``), keeping the sample and the sigma tables in float64. The cosine schedule's first
sigma is ~2e4 (abar ~ 2e-9): a scheduler given eps converts back, x0 = (x - s*eps)/a, amplifying any rounding in
its float32 coefficients 2e4-fold, and float32 sigma-space samples (~2e4 * noise) or sigma differences
(3.8 - 2e4) are off by 1e-3 absolute. Measured with the brief's original design (eps to the scheduler, float32
sample): DPM-Solver++'s first step 2e-4 off, Heun without Karras sigmas landing at 0.65 of the right noise level
after its first step. Both widenings cost nothing next to a network evaluation; the model still gets float32.

Shapes: noise / samples (B, C, H, W) (any trailing dims work); t (B,) float32.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, HeunDiscreteScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from pipeline.config_schema import check, doc
from pipeline.diffusion.flow import FlowSchedule
from pipeline.diffusion.schedules import NoiseSchedule, Schedule, check_target, scheduler_betas, x0_eps_from_output
from pipeline.errors import ConfigError

# "trailing" spacing (Lin et al. 2023, Table 2) always starts at t = T-1, the noisiest timestep, where pure noise
# is the right start. "leading" starts at (n-1)*(T//n) (e.g. 990 of 1000 for 10 steps) and "linspace" at 0 for a
# single step, so both would hand the model noise at a level it never saw as pure noise.
TIMESTEP_SPACING = "trailing"

Predict = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler generates images, and how many network evaluations it spends."""

    name: str = doc(
        "dpmpp_2m", "Sampler (a key of SAMPLER_KINDS): 'ddpm' (ancestral), 'ddim', 'dpmpp_2m' (DPM-Solver++ 2M), "
                    "'euler', 'heun' (2nd order, 2*steps-1 network evaluations); for model.diffusion.objective flow: "
                    "'flow_euler', 'flow_heun' (2nd order, 2*steps-1 evaluations).")
    steps: int = doc(30, "Sampling steps, 1..model.diffusion.num_timesteps; for 'ddim' a divisor of num_timesteps.")
    eta: float = doc(0.0, "DDIM only: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise (unitless, 0-1).")
    karras: bool = doc(False, "Karras et al. sigma spacing for euler / heun / dpmpp_2m (ignored by ddpm and ddim); off by "
                               "default: on a cosine schedule even timestep spacing samples the data spread closer.")

    def __post_init__(self) -> None:
        check(self.name in SAMPLERS, "model.sampling.sampler.name",
              f"must be one of {', '.join(SAMPLERS)}, got {self.name!r}")
        check(self.steps >= 1, "model.sampling.sampler.steps", f"must be >= 1, got {self.steps}")
        check(0.0 <= self.eta <= 1.0, "model.sampling.sampler.eta", f"must be in [0, 1], got {self.eta}")
        check(self.eta == 0.0 or self.name == "ddim", "model.sampling.sampler.eta",
              f"only applies to the 'ddim' sampler; set it to 0 for {self.name!r}")


# Our parameterisation names -> diffusers' prediction_type values
PREDICTION_TYPES: dict[str, str] = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


@dataclass(frozen=True)
class SamplerKind:
    """One sampler: its diffusers scheduler class and what our loop must know about it (the only per-sampler code).

    scheduler: the class; options(sampler config) -> its constructor arguments beyond the shared ones;
    sigma_indexed: its state is indexed by a sigma table that may sit between integer timesteps (the noise level
    at loop position i is ``sigmas[i]``, not the reported timestep); step_options(sampler config, generators) ->
    extra ``step()`` arguments; image_to_image: a run may start part-way (Heun's steps are pairs of evaluations);
    steps_divide_timesteps: the step count must divide T (DDIMScheduler steps from t to t - T // steps whatever
    timestep comes next; with any other count the sample and the timestep the model is told drift apart, measured
    5% apart at 30 steps, 5x at 600); flow: it samples a flow-matching stage (velocity in, sample x_s itself,
    noise level ``sigmas[i]`` = s). Which space its sample lives in (VP or "x0 + sigma * eps") is not listed: the
    loop asks the scheduler (``init_noise_sigma``, ``scale_model_input``), so a new scheduler cannot be given the
    wrong start.
    """

    scheduler: type[SchedulerMixin]
    options: Callable[[SamplerConfig], dict[str, Any]]
    sigma_indexed: bool
    step_options: Callable[[SamplerConfig, list[torch.Generator] | None], dict[str, Any]]
    image_to_image: bool = True
    steps_divide_timesteps: bool = False
    flow: bool = False


def _with_generator(_: SamplerConfig, gens: list[torch.Generator] | None) -> dict[str, Any]:
    return {"generator": gens}


SAMPLER_KINDS: dict[str, SamplerKind] = {
    "ddpm": SamplerKind(DDPMScheduler, lambda s: {"variance_type": "fixed_small", "clip_sample": False,
                                                  "thresholding": False}, False, _with_generator),
    "ddim": SamplerKind(DDIMScheduler, lambda s: {"clip_sample": False, "thresholding": False,
                                                  "set_alpha_to_one": True}, False,
                        lambda s, gens: {"eta": s.eta, "generator": gens}, steps_divide_timesteps=True),
    "dpmpp_2m": SamplerKind(DPMSolverMultistepScheduler,
                            lambda s: {"algorithm_type": "dpmsolver++", "solver_order": 2, "thresholding": False,
                                       "use_karras_sigmas": s.karras, "final_sigmas_type": "zero"},
                            True, _with_generator),
    "euler": SamplerKind(EulerDiscreteScheduler, lambda s: {"use_karras_sigmas": s.karras, "final_sigmas_type": "zero"},
                         True, _with_generator),
    "heun": SamplerKind(HeunDiscreteScheduler, lambda s: {"use_karras_sigmas": s.karras, "clip_sample": False},
                        True, lambda s, gens: {}, image_to_image=False),  # Heun's step() takes no generator
    # Flow matching: the schedulers' sigmas are the flow's noise levels s (shifted by the stage's shift) and
    # their timesteps s * T; both start at s = 1 (pure noise), the trailing start of the VP samplers.
    "flow_euler": SamplerKind(FlowMatchEulerDiscreteScheduler, lambda s: {}, True, lambda s, gens: {}, flow=True),
    "flow_heun": SamplerKind(FlowMatchHeunDiscreteScheduler, lambda s: {}, True, lambda s, gens: {},
                             image_to_image=False, flow=True),
}
SAMPLERS: tuple[str, ...] = tuple(SAMPLER_KINDS)
VP_SAMPLERS: tuple[str, ...] = tuple(name for name, kind in SAMPLER_KINDS.items() if not kind.flow)
FLOW_SAMPLERS: tuple[str, ...] = tuple(name for name, kind in SAMPLER_KINDS.items() if kind.flow)


def make_scheduler(schedule: Schedule, sampler: SamplerConfig, target: str = "eps") -> SchedulerMixin:
    """A fresh diffusers scheduler reproducing `schedule` (via ``trained_betas``), before ``set_timesteps``.

    `target` is what ``step()`` will be given (eps / x0 / v; diffusers' prediction_type epsilon / sample /
    v_prediction). Clipping and thresholding are off: the sampling loop thresholds x0 itself, for every sampler.
    A :class:`FlowSchedule` gets a flow-matching scheduler with its shift (given the velocity; `target` unused).
    """
    check_target(target)
    T = schedule.num_timesteps
    if sampler.steps > T:
        raise ConfigError(f"model.sampling.sampler.steps ({sampler.steps}) must be <= "
                          f"model.diffusion.num_timesteps ({T})")
    kind = SAMPLER_KINDS[sampler.name]
    flow = isinstance(schedule, FlowSchedule)
    if kind.flow != flow:
        able = ", ".join(name for name, other in SAMPLER_KINDS.items() if other.flow == flow)
        raise ConfigError(f"model.sampling.sampler.name {sampler.name!r} does not sample objective "
                          f"{'flow' if flow else 'vp'} (model.diffusion.objective); use one of {able}")
    if flow:
        return kind.scheduler(num_train_timesteps=T, shift=schedule.shift, **kind.options(sampler))
    if kind.steps_divide_timesteps and T % sampler.steps:
        raise ConfigError(f"model.sampling.sampler.steps ({sampler.steps}) must divide model.diffusion.num_timesteps "
                          f"({T}) for the {sampler.name!r} sampler (e.g. "
                          f"{', '.join(str(d) for d in _divisors_near(T, sampler.steps))})")
    return kind.scheduler(num_train_timesteps=T, trained_betas=scheduler_betas(schedule),
                          prediction_type=PREDICTION_TYPES[target], timestep_spacing=TIMESTEP_SPACING,
                          **kind.options(sampler))


def _divisors_near(n: int, target: int, most: int = 4) -> list[int]:
    """The `most` divisors of n closest to `target`, ascending (suggestions for a valid DDIM step count)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: abs(d - target))[:most])


# Every diffusers scheduler key that changes how x0 is clamped, with the value that does what our loop does. A user
# who swaps the exported scheduler (``DDIMScheduler.from_config(config)``, the common idiom) otherwise gets that
# class's defaults: DDIM's and DDPM's clip_sample=True clamps x0 to [-1, 1] at every step (measured on a small
# v-prediction stage: 12/30 images as prompted instead of 25/30). Keys of other schedulers are ignored by
# ``from_config`` without a warning (diffusers drops keys of compatible classes).
_NO_CLAMP = {"clip_sample": False, "thresholding": False}


def _x0_limits(threshold: float | None) -> dict[str, Any]:
    """The clamp keys for a stage sampled with `threshold`: None = nothing (latents), 0 = a static clamp to
    [-1, 1], p = Imagen's dynamic thresholding at percentile p (pipeline.diffusion.guidance.dynamic_threshold).

    diffusers' thresholding computes s = clamp(quantile(|x0|, ratio), 1, sample_max_value) and x0 = clamp(x0, -s,
    s) / s: with sample_max_value the float32 maximum it is our dynamic thresholding, with 1 a static clamp.
    """
    if threshold is None:
        return dict(_NO_CLAMP)
    if threshold == 0:
        return {"clip_sample": True, "clip_sample_range": 1.0, "thresholding": True,
                "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
    return {"clip_sample": False, "thresholding": True, "dynamic_thresholding_ratio": threshold,
            "sample_max_value": float(torch.finfo(torch.float32).max)}


def scheduler_config(schedule: Schedule, sampler: SamplerConfig, *, target: str,
                     threshold: float | None = None) -> dict[str, Any]:
    """The JSON-able scheduler config export saves next to the U-Net (``scheduler_config.json``).

    `target` must be the U-Net's own parameterisation (model.diffusion.target): diffusers pipelines hand the raw
    U-Net output to ``scheduler.step``, so the saved prediction_type has to name what the U-Net predicts. It is
    what diffusers' ``save_config`` writes (the config plus ``_class_name`` and ``_diffusers_version``), with the
    x0 clamp of the stage written out for every scheduler that has one (`threshold`: see :func:`_x0_limits`), so
    ``getattr(diffusers, d["_class_name"]).from_config(d)`` rebuilds the same scheduler and any other diffusers
    scheduler built from it clamps as our loop does (checked for the classes in tests/diffusion).
    """
    config = json.loads(make_scheduler(schedule, sampler, target).to_json_string())
    if isinstance(schedule, FlowSchedule):
        return config  # diffusers' flow-matching schedulers have no x0 clamp: only our loop thresholds
    config.update(_x0_limits(threshold))
    return config


def _noise_level(scheduler: SchedulerMixin, kind: SamplerKind, schedule: NoiseSchedule, index: int,
                 timestep: Tensor, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(t for the model (B,) float32, abar (B,) float64) of the sample at loop position `index`.

    Sigma-indexed schedulers may sit between the timesteps they report (DPM-Solver rounds its Karras timesteps to
    integers) and Heun's second evaluation is at the *next* sigma, so their truth is ``sigmas[index]`` (sigmas and
    timesteps are index-aligned, Heun's duplicates included, and the step index starts at 0, see sample_loop);
    abar = 1 / (1 + sigma^2) and t is the fractional timestep of that sigma.
    """
    if kind.sigma_indexed:
        sigma = scheduler.sigmas[index].to(device=device, dtype=torch.float64)
        t = schedule.sigma_to_t(sigma)
        abar = 1.0 / (1.0 + sigma**2)
    else:
        t = timestep.to(device=device, dtype=torch.float64)
        abar = schedule.alpha_bar(t)
    return t.expand(batch).to(torch.float32), abar.expand(batch)


def _prepared_scheduler(schedule: NoiseSchedule, sampler: SamplerConfig, device: torch.device) -> SchedulerMixin:
    """A scheduler for our loop (given x0), with its timesteps set and its tables in float64."""
    scheduler = make_scheduler(schedule, sampler, "x0")
    # diffusers rebuilds abar from float32 betas with a float32 cumprod: 1 - abar near t = 0 is then off by ~1e-5
    # relative. Our float64 table is the one the model was trained with (sigmas below are derived from it).
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.set_timesteps(sampler.steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        # Without a begin index these schedulers look the first timestep up by value and, when it occurs twice
        # (Karras sigmas of a cosine schedule map several sigmas to t ~ 999; Heun repeats every timestep), start at
        # the second occurrence, skipping a sigma and running off the end of the sigma table on the last step.
        scheduler.set_begin_index(0)
    if SAMPLER_KINDS[sampler.name].sigma_indexed:
        # Same values, wider type: their updates subtract sigmas (dt = sigma_next - sigma ~ 3.8 - 2e4), and in
        # float32 that difference alone is off by 1e-3, i.e. 3e-4 of the next noise level.
        scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    return scheduler


def _start_index(sampler: SamplerConfig, total: int, strength: float) -> int:
    """Loop position an image-to-image run starts at: (1 - strength) of the steps skipped, at least one kept."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if not SAMPLER_KINDS[sampler.name].image_to_image and strength < 1.0:
        able = ", ".join(name for name, kind in SAMPLER_KINDS.items() if kind.image_to_image)
        raise ValueError(f"image-to-image (strength < 1) is not supported with the {sampler.name!r} sampler; use "
                         f"one of {able}")
    return min(total - 1, int(round(total * (1.0 - strength))))


def _noised_start(scheduler: SchedulerMixin, kind: SamplerKind, schedule: NoiseSchedule, init: Tensor,
                  noise: Tensor, index: int) -> Tensor:
    """`init` noised to the level of loop position `index`, in the scheduler's own sample space.

    The forward process gives the model's input x_t = sqrt(abar) init + sqrt(1 - abar) noise (VP). Schedulers
    keep their sample in different spaces (Euler/Heun: x_t / sqrt(abar) = x0 + sigma * eps; DDIM, DDPM and
    DPM-Solver: x_t itself), and ``scale_model_input`` is, by diffusers' contract, the map from their space to the
    model's input; so the start is x_t divided by that map's factor at this step, asked of the scheduler itself.
    """
    timestep = scheduler.timesteps[index]
    _, abar = _noise_level(scheduler, kind, schedule, index, timestep, init.shape[0], noise.device)
    shape = (-1,) + (1,) * (init.dim() - 1)
    a, s = abar.sqrt().view(shape), (1.0 - abar).sqrt().view(shape)
    x_t = a * init.to(torch.float64) + s * noise.to(torch.float64)
    factor = scheduler.scale_model_input(torch.ones((), dtype=torch.float64, device=noise.device), timestep)
    return x_t / factor


def sample_loop(predict: Predict, noise: Tensor, schedule: Schedule, target: str, sampler: SamplerConfig, *,
                generators: Sequence[torch.Generator] | None = None,
                threshold: Callable[[Tensor], Tensor] | None = None,
                progress: Callable[[int, int], None] | None = None, init: Tensor | None = None,
                strength: float = 1.0) -> Tensor:
    """Generate x0 (B, C, H, W) float32 from standard-normal `noise` (B, C, H, W).

    With `init` (B, C, H, W) (SDEdit image-to-image): the first (1 - strength) of the steps are skipped and the
    loop starts from `init` noised to the level it would be at there, so strength 1 ignores `init` and small
    strengths keep most of it.

    predict(x_t (B, C, H, W) float32, t (B,) float32) -> output in parameterisation `target` (eps / x0 / v) at
    noise level t of `schedule` (t may be fractional; any float dtype). `generators` (one per image) seed the
    noise that ddpm and ddim(eta > 0) add along the way, so image i does not depend on what else is in the batch;
    without them those samplers draw from the global RNG. `threshold` maps x0 (B, C, H, W) float64 -> x0 (e.g.
    dynamic thresholding) before every update. `progress(done, total)` is called after each of the `total`
    network evaluations (2 * steps - 1 for heun). A :class:`FlowSchedule` is sampled by :func:`flow_loop`.
    """
    check_target(target)
    batch = noise.shape[0]
    if generators is not None and len(generators) != batch:
        raise ValueError(f"generators: need one per image ({batch}), got {len(generators)}")
    if isinstance(schedule, FlowSchedule):
        return flow_loop(predict, noise, schedule, sampler, threshold=threshold, progress=progress, init=init,
                         strength=strength)
    gens = list(generators) if generators is not None else None
    kind = SAMPLER_KINDS[sampler.name]
    scheduler = _prepared_scheduler(schedule, sampler, noise.device)
    timesteps = scheduler.timesteps
    total = len(timesteps)
    start = 0 if init is None else _start_index(sampler, total, strength)
    if start:
        if hasattr(scheduler, "set_begin_index"):  # step-index schedulers; DDPM/DDIM step from the timestep itself
            scheduler.set_begin_index(start)
        x = _noised_start(scheduler, kind, schedule, init, noise, start)
    else:
        x = noise.to(torch.float64) * scheduler.init_noise_sigma
    for index in range(start, total):
        timestep = timesteps[index]
        x_in = scheduler.scale_model_input(x, timestep)  # x_t in VP space for every scheduler
        t, abar = _noise_level(scheduler, kind, schedule, index, timestep, batch, noise.device)
        out = predict(x_in.to(torch.float32), t)
        x0, _ = x0_eps_from_output(x_in, out.to(torch.float64), abar, target)
        x0 = _settle(x0, threshold, progress, index + 1 - start, total - start)
        if index == total - 1:
            # Every sampler's last update lands on the clean sample (sigma 0 / abar 1), where it returns x0 itself
            # (plus, for ddpm, noise of std 1e-10): returning our x0 is the same, without the float32 round trip.
            return x0.to(torch.float32)
        x = scheduler.step(x0.to(torch.float64), timestep, x, **kind.step_options(sampler, gens)).prev_sample
    raise AssertionError("unreachable: set_timesteps produced no timesteps")


def _settle(x0: Tensor, threshold: Callable[[Tensor], Tensor] | None, progress: Callable[[int, int], None] | None,
            done: int, total: int) -> Tensor:
    """One loop position's x0 estimate (B, C, H, W), thresholded when configured, with its progress reported: the
    part of a step every sampling loop shares."""
    if threshold is not None:
        x0 = threshold(x0)
    if progress is not None:
        progress(done, total)
    return x0


def flow_loop(predict: Predict, noise: Tensor, schedule: FlowSchedule, sampler: SamplerConfig, *,
              threshold: Callable[[Tensor], Tensor] | None = None, progress: Callable[[int, int], None] | None = None,
              init: Tensor | None = None, strength: float = 1.0) -> Tensor:
    """Generate x0 (B, C, H, W) float32 from standard-normal `noise` with a flow-matching scheduler.

    predict(x_s float32, t = s * T (B,) float32) -> velocity. As in :func:`sample_loop` the velocity becomes
    x0 = x_s - s v, is thresholded, and goes back to the scheduler as v = (x_s - x0) / s (the scheduler's sigmas
    end at 0, never evaluated: the last loop position returns x0 itself). SDEdit (`init`, `strength`) starts
    at loop position i from (1 - s_i) init + s_i noise, the flow's own path.
    """
    kind = SAMPLER_KINDS[sampler.name]
    scheduler = make_scheduler(schedule, sampler)
    scheduler.set_timesteps(sampler.steps, device=noise.device)
    sigmas = scheduler.sigmas.to(torch.float64)
    scheduler.sigmas = sigmas  # Euler steps by sigma differences: float64 as for the VP sigma samplers
    total = len(scheduler.timesteps)
    start = 0 if init is None else _start_index(sampler, total, strength)
    scheduler.set_begin_index(start)
    x = noise.to(torch.float64)
    if start:
        x = (1 - sigmas[start]) * init.to(torch.float64) + sigmas[start] * x
    batch = noise.shape[0]
    for index in range(start, total):
        sigma = sigmas[index]
        t = (sigma * schedule.num_timesteps).to(torch.float32).expand(batch)
        velocity = predict(x.to(torch.float32), t).to(torch.float64)
        x0 = x - sigma * velocity
        x0 = _settle(x0, threshold, progress, index + 1 - start, total - start)
        if index == total - 1:
            return x0.to(torch.float32)
        velocity = (x - x0) / sigma
        x = scheduler.step(velocity, scheduler.timesteps[index], x, **kind.step_options(sampler, None)).prev_sample
    raise AssertionError("unreachable: set_timesteps produced no timesteps")
