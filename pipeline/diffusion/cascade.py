"""Cascade sampling: prompts -> T5 -> base stage -> each super-resolution stage -> images, as one library function.

Training-time sample grids and evaluation (one stage), the bundle sampler and ``python -m pipeline sample`` (the
whole cascade) all call :func:`sample_stage` / :func:`sample_cascade`, so what a run's metrics report is what a
user gets. Pure: no distributed code; every stage's U-Net is called through :func:`pipeline.models.unet.unet_forward`.

Determinism: every image i of a call draws its initial noise, its noise-augmentation noise and its ancestral
noise from its own generator, seeded from (seed, stage index, i); so image i of a seed does not depend on how many
images are drawn with it, and a seed reproduces the same images on the same machine and software.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config_schema import check, doc
from pipeline.diffusion.guidance import classifier_free, dynamic_threshold, static_threshold
from pipeline.diffusion.objective import noise_augment
from pipeline.diffusion.samplers import SamplerConfig, sample_loop
from pipeline.diffusion.schedules import NoiseSchedule
from pipeline.errors import UsageError
from pipeline.models.unet import Conditioning, null_condition, unet_forward

TextEncoder = Callable[[list[str], "StageSampler"], tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplingConfig:
    """How a stage samples by default (saved with the weights; every key can be overridden per call)."""

    sampler: SamplerConfig = doc(SamplerConfig(), "Sampler and number of steps.")
    guidance: float = doc(4.0, "Classifier-free guidance scale (>= 1; 1 = no guidance, one network pass per step).")
    guidance_rescale: float = doc(0.0, "Guidance rescale factor (0-1, Lin et al. 2023); 0 = off.")
    dynamic_threshold: float = doc(0.995, "Imagen dynamic thresholding percentile of |x0| per image (pixel stages "
                                          "only; 0 = a static clamp to [-1, 1]).")

    def __post_init__(self) -> None:
        check(self.guidance >= 1.0, "sampling.guidance", f"must be >= 1 (1 disables guidance), got {self.guidance}")
        check(0.0 <= self.guidance_rescale <= 1.0, "sampling.guidance_rescale",
              f"must be in [0, 1], got {self.guidance_rescale}")
        check(self.dynamic_threshold == 0.0 or 0.5 <= self.dynamic_threshold <= 1.0, "sampling.dynamic_threshold",
              f"must be 0 (off) or a percentile in [0.5, 1], got {self.dynamic_threshold}")


@dataclass
class StageSampler:
    """One cascade stage, ready to sample.

    unet: the denoiser (eval mode); cond: its conditioning sizes; schedule/target: its diffusion process;
    resolution: side in pixels of this stage's output image; grid: (C, H, W) of the U-Net's own sample (pixels, or
    latents for a latent stage); low_res: side of the image it upsamples (0 = base stage); sample_noise_level:
    noise-augmentation level of that image at sampling; decode: latents (B, C, H, W) -> images (B, 3, R, R) in
    [-1, 1] for latent stages (None = pixel space); defaults: its own sampling settings.
    """

    name: str
    unet: nn.Module
    cond: Conditioning
    schedule: NoiseSchedule
    target: str
    resolution: int
    grid: tuple[int, int, int]
    defaults: SamplingConfig
    low_res: int = 0
    sample_noise_level: float = 0.0
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def pixel_space(self) -> bool:
        return self.decode is None


def image_seed(seed: int, stage_index: int, image: int) -> int:
    """A 63-bit seed for one (seed, stage, image) triple: the first 8 bytes of their SHA-256.

    A hash, not arithmetic: a linear mix such as seed * P + stage * Q + image gives image Q of stage 0 the seed of
    image 0 of stage 1 (a collision from the 10,007th image on with Q = 10,007); distinct triples collide here only
    with the probability of a 63-bit hash collision.
    """
    digest = hashlib.sha256(f"{seed}/{stage_index}/{image}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generators(seed: int, stage_index: int, count: int, device: torch.device) -> list[torch.Generator]:
    """One generator per image, seeded from (seed, stage, image index) only (see the module docstring)."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, stage_index, i)) for i in range(count)]


def _noise(shape: tuple[int, ...], gens: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in gens]).to(device)


def low_res_input(images: torch.Tensor, stage: StageSampler, level: torch.Tensor,
                  gens: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """The previous stage's images (B, 3, r, r) in [-1, 1] -> the noise-augmented conditioning image (B, 3, H, W)
    at the U-Net's grid size (bicubic up- or down-sampling), at augmentation `level` (B,)."""
    side = stage.grid[1]
    resized = F.interpolate(images.float(), size=(side, side), mode="bicubic", align_corners=False)
    if gens is None:
        return noise_augment(resized, level, stage.schedule)
    return torch.stack([noise_augment(resized[i:i + 1], level[i:i + 1], stage.schedule, generator=g)[0]
                        for i, g in enumerate(gens)])


def _threshold(stage: StageSampler, settings: SamplingConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if not stage.pixel_space:
        return None  # latents have no [-1, 1] range to clamp to
    if settings.dynamic_threshold:
        return lambda x0: dynamic_threshold(x0, settings.dynamic_threshold)
    return static_threshold


def sample_stage(stage: StageSampler, inputs: dict[str, torch.Tensor], *, settings: SamplingConfig | None = None,
                 seed: int = 0, stage_index: int = 0, progress: Progress | None = None,
                 drop_keys: tuple[str, ...] = ("text", "image_embed"), init: torch.Tensor | None = None,
                 strength: float = 1.0) -> torch.Tensor:
    """Images (B, 3, R, R) in [-1, 1] from one stage.

    inputs: the conditioning of :func:`pipeline.models.unet.unet_forward` ("text", "mask", and "image_embed" when
    the stage uses one) plus, for a super-resolution stage, "images": the previous stage's output (B, 3, r, r) in
    [-1, 1], which is noise-augmented at the stage's sample_noise_level here. Guidance drops `drop_keys`.
    init: the stage's own grid (B, C, H, W) to start from (SDEdit image-to-image, see sample_loop) at `strength`.
    """
    settings = settings or stage.defaults
    device = inputs["text"].device
    batch = inputs["text"].shape[0]
    gens = generators(seed, stage_index, batch, device)
    cond = {k: v for k, v in inputs.items() if k != "images"}
    if stage.low_res:
        if "images" not in inputs:
            raise UsageError(f"stage {stage.name!r} upsamples {stage.low_res} px images; give it the previous "
                             "stage's output")
        level = torch.full((batch,), stage.sample_noise_level, device=device)
        cond["low_res"] = low_res_input(inputs["images"], stage, level, gens)
        cond["level"] = level
    uncond = null_condition(cond, torch.ones(batch, dtype=torch.bool, device=device), keys=drop_keys)
    dtype = next(stage.unet.parameters()).dtype
    cond = {k: (v.to(dtype) if v.is_floating_point() and k != "level" else v) for k, v in cond.items()}
    uncond = {k: (v.to(dtype) if v.is_floating_point() and k != "level" else v) for k, v in uncond.items()}

    def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
        return unet_forward(stage.unet, stage.cond, x.to(dtype), t, c).float()

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return classifier_free(model_fn, x_t, t, cond, uncond, settings.guidance, settings.guidance_rescale)

    noise = _noise(stage.grid, gens, device)
    with torch.no_grad():
        x0 = sample_loop(predict, noise, stage.schedule, stage.target, settings.sampler, generators=gens,
                         threshold=_threshold(stage, settings), progress=progress, init=init, strength=strength)
        images = x0 if stage.decode is None else stage.decode(x0)
    return images.float().clamp(-1.0, 1.0)


def sample_cascade(stages: Sequence[StageSampler], prompts: list[str], encode_text: TextEncoder, *, seed: int = 0,
                   settings: Sequence[SamplingConfig | None] | None = None,
                   extra: dict[str, torch.Tensor] | None = None, progress: Progress | None = None,
                   init: torch.Tensor | None = None, strength: float = 1.0) -> list[torch.Tensor]:
    """Run every stage in order; returns each stage's images (B, 3, R_i, R_i) in [-1, 1] (the last is the result).

    encode_text(prompts, stage) -> (T5 tokens (B, L, D), mask (B, L)) for that stage (stages may differ in
    max_length); extra: further conditioning (e.g. "image_embed" (B, E) from the prior) given to the stages whose
    Conditioning uses it; init/strength: the base stage's image-to-image start (its own grid, see sample_stage).
    """
    check_chain(stages)
    settings = list(settings) if settings is not None else [None] * len(stages)
    outputs: list[torch.Tensor] = []
    images = None
    for index, stage in enumerate(stages):
        text, mask = encode_text(prompts, stage)
        inputs = {"text": text, "mask": mask}
        if stage.cond.image_embed_dim:
            if not extra or "image_embed" not in extra:
                raise UsageError(f"stage {stage.name!r} is conditioned on a CLIP image embedding; the cascade needs "
                                 "a prior (or an image) to provide one")
            inputs["image_embed"] = extra["image_embed"]
        if stage.low_res:
            inputs["images"] = images
        images = sample_stage(stage, inputs, settings=settings[index], seed=seed, stage_index=index,
                              progress=progress, init=init if index == 0 else None, strength=strength)
        outputs.append(images)
    return outputs


def check_chain(stages: Sequence[StageSampler]) -> None:
    """A cascade starts with a base stage and each super-resolution stage upsamples the previous one's output."""
    if not stages:
        raise UsageError("a cascade needs at least a base stage")
    if stages[0].low_res:
        raise UsageError(f"the first cascade stage {stages[0].name!r} is a super-resolution stage "
                         f"({stages[0].low_res} -> {stages[0].resolution} px); a cascade starts with a base stage")
    for prev, stage in zip(stages, stages[1:]):
        if stage.low_res != prev.resolution:
            raise UsageError(f"cascade stages do not chain: {prev.name!r} makes {prev.resolution} px images but "
                             f"{stage.name!r} upsamples {stage.low_res or 'no'} px images")


def with_overrides(settings: SamplingConfig, *, guidance: float | None = None, steps: int | None = None,
                   sampler: str | None = None) -> SamplingConfig:
    """`settings` with the given values replaced (validated: a guidance < 1 or bad steps raise ConfigError)."""
    sampler_cfg = settings.sampler
    if sampler is not None or steps is not None:
        sampler_cfg = replace(sampler_cfg, name=sampler or sampler_cfg.name, steps=steps or sampler_cfg.steps)
    return replace(settings, sampler=sampler_cfg, guidance=settings.guidance if guidance is None else guidance)
