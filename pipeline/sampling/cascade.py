"""Cascade sampling: prompts -> T5 -> base level -> each super-resolution level -> images, as one library function.

A cascade is a list of :class:`CascadeLevel`: one trained U-Net each (a `unet` stage's network, exported or live),
with its noise schedule, conditioning and resolution. Training-time sample grids and evaluation (one level), the
bundle sampler and ``python -m pipeline sample`` (the whole cascade) all call :func:`sample_level` /
:func:`sample_cascade`, so what a run's metrics report is what a user gets. Pure: no distributed code; every
level's U-Net is called through :func:`pipeline.models.unet.unet_forward`.

Determinism: every image i of a call draws its initial noise, its noise-augmentation noise and its ancestral
noise from its own generator, seeded from (seed, level index, i); so image i of a seed does not depend on how many
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
from pipeline.diffusion.schedules import Schedule
from pipeline.errors import UsageError
from pipeline.models.unet import Conditioning, default_sizes, null_condition, unet_forward
from pipeline.sampling.shapes import cascade_shapes

TextEncoder = Callable[[list[str], "CascadeLevel"], tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplingConfig:
    """How a cascade level samples by default (saved with the weights; every key can be overridden per call)."""

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
class CascadeLevel:
    """One level of the cascade (the network of one `unet` training stage), ready to sample.

    unet: the denoiser (eval mode); cond: its conditioning sizes; schedule/target: its diffusion process;
    resolution: side in pixels of this level's output image; grid: (C, H, W) of the U-Net's own sample (pixels, or
    latents for a latent level); low_res: side of the image it upsamples (0 = base level); sample_noise_level:
    noise-augmentation level of that image at sampling; decode: latents (B, C, H, W) -> images (B, 3, R, R) in
    [-1, 1] for latent levels (None = pixel space); defaults: its own sampling settings; drop_sizes: guidance's
    unconditional branch also gets the null sizes (the stage trained with micro_conditioning.drop_with_text);
    buckets: the (height, width) output shapes it was trained on (empty: the resolution square only).
    """

    name: str
    unet: nn.Module
    cond: Conditioning
    schedule: Schedule
    target: str
    resolution: int
    grid: tuple[int, int, int]
    defaults: SamplingConfig
    low_res: int = 0
    sample_noise_level: float = 0.0
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    drop_sizes: bool = False
    buckets: tuple[tuple[int, int], ...] = ()

    @property
    def pixel_space(self) -> bool:
        return self.decode is None

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """The (height, width) output shapes this level samples."""
        return self.buckets or ((self.resolution, self.resolution),)

    def grid_for(self, shape: tuple[int, int] | None) -> tuple[int, int, int]:
        """(C, h, w) of the U-Net's sample for an output image of `shape` (None: the resolution square)."""
        if shape is None:
            return self.grid
        factor = self.resolution // self.grid[1]  # pixels per latent cell (1 in pixel space)
        if shape[0] % factor or shape[1] % factor:
            raise UsageError(f"cascade level {self.name!r}: {shape[0]}x{shape[1]} is not a whole number of "
                             f"{factor}-pixel latent cells")
        return self.grid[0], shape[0] // factor, shape[1] // factor


def image_seed(seed: int, level_index: int, image: int) -> int:
    """A 63-bit seed for one (seed, cascade level, image) triple: the first 8 bytes of their SHA-256.

    A hash, not arithmetic: a linear mix such as seed * P + level * Q + image gives image Q of level 0 the seed of
    image 0 of level 1 (a collision from the 10,007th image on with Q = 10,007); distinct triples collide here only
    with the probability of a 63-bit hash collision.
    """
    digest = hashlib.sha256(f"{seed}/{level_index}/{image}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generators(seed: int, level_index: int, count: int, device: torch.device,
               image_indices: Sequence[int] | None = None) -> list[torch.Generator]:
    """One generator per image, seeded from (seed, cascade level, image index) only (see the module docstring);
    image_indices: the images' indices (default 0 .. count - 1)."""
    indices = range(count) if image_indices is None else image_indices
    if len(indices) != count:
        raise ValueError(f"{len(indices)} image indices for {count} images")
    return [torch.Generator(device=device).manual_seed(image_seed(seed, level_index, i)) for i in indices]


def _noise(shape: tuple[int, ...], gens: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in gens]).to(device)


def low_res_input(images: torch.Tensor, level: CascadeLevel, noise_level: torch.Tensor,
                  gens: Sequence[torch.Generator] | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The previous level's images (B, 3, h, w) in [-1, 1] -> the noise-augmented conditioning image (B, 3, H, W)
    at the U-Net's grid size `size` (default: the level's square grid; bicubic up- or down-sampling), at
    augmentation level `noise_level` (B,)."""
    resized = F.interpolate(images.float(), size=size or level.grid[1:], mode="bicubic", align_corners=False)
    if gens is None:
        return noise_augment(resized, noise_level, level.schedule)
    return torch.stack([noise_augment(resized[i:i + 1], noise_level[i:i + 1], level.schedule, generator=g)[0]
                        for i, g in enumerate(gens)])


def _threshold(level: CascadeLevel, settings: SamplingConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if not level.pixel_space:
        return None  # latents have no [-1, 1] range to clamp to
    if settings.dynamic_threshold:
        return lambda x0: dynamic_threshold(x0, settings.dynamic_threshold)
    return static_threshold


def sample_level(level: CascadeLevel, inputs: dict[str, torch.Tensor], *, settings: SamplingConfig | None = None,
                 seed: int = 0, level_index: int = 0, progress: Progress | None = None,
                 drop_keys: tuple[str, ...] = ("text", "image_embed"), init: torch.Tensor | None = None,
                 strength: float = 1.0, image_indices: Sequence[int] | None = None,
                 shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from one cascade level; (H, W) = `shape` (default: R x R, the level's
    resolution; :func:`pipeline.sampling.shapes.cascade_shapes` says which shapes a level can make).

    inputs: the conditioning of :func:`pipeline.models.unet.unet_forward` ("text", "mask", and "image_embed" when
    the level uses one) plus, for a super-resolution level, "images": the previous level's output (B, 3, r, r) in
    [-1, 1], which is noise-augmented at the level's sample_noise_level here. A level with size conditioning
    takes "sizes" (B, 6) and defaults to "uncropped, original = target". Guidance drops `drop_keys` (and the sizes
    with the text when the level was trained so).
    init: the level's own grid (B, C, H, W) to start from (SDEdit image-to-image, see sample_loop) at `strength`.
    image_indices: each image's index in the seed's sequence (default 0 .. B-1); evaluation numbers images by their
    held-out sample, so an image does not depend on which rank or batch draws it.
    """
    settings = settings or level.defaults
    device = inputs["text"].device
    batch = inputs["text"].shape[0]
    gens = generators(seed, level_index, batch, device, image_indices)
    grid = level.grid_for(shape)
    height, width = shape or (level.resolution, level.resolution)
    cond = {k: v for k, v in inputs.items() if k != "images"}
    if level.low_res:
        if "images" not in inputs:
            raise UsageError(f"cascade level {level.name!r} upsamples {level.low_res} px images; give it the "
                             "previous level's output")
        noise_level = torch.full((batch,), level.sample_noise_level, device=device)
        cond["low_res"] = low_res_input(inputs["images"], level, noise_level, gens, size=grid[1:])
        cond["level"] = noise_level
    if level.cond.size_dim and "sizes" not in cond:
        cond["sizes"] = default_sizes(batch, height, width, device=device)
    if level.drop_sizes and "text" in drop_keys:
        drop_keys = (*drop_keys, "sizes")
    uncond = null_condition(cond, torch.ones(batch, dtype=torch.bool, device=device), keys=drop_keys)
    dtype = next(level.unet.parameters()).dtype
    cond = {k: (v.to(dtype) if v.is_floating_point() and k != "level" else v) for k, v in cond.items()}
    uncond = {k: (v.to(dtype) if v.is_floating_point() and k != "level" else v) for k, v in uncond.items()}

    def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
        return unet_forward(level.unet, level.cond, x.to(dtype), t, c).float()

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return classifier_free(model_fn, x_t, t, cond, uncond, settings.guidance, settings.guidance_rescale)

    noise = _noise(grid, gens, device)
    with torch.no_grad():
        x0 = sample_loop(predict, noise, level.schedule, level.target, settings.sampler, generators=gens,
                         threshold=_threshold(level, settings), progress=progress, init=init, strength=strength)
        images = x0 if level.decode is None else level.decode(x0)
    return images.float().clamp(-1.0, 1.0)


def sample_cascade(levels: Sequence[CascadeLevel], prompts: list[str], encode_text: TextEncoder, *, seed: int = 0,
                   settings: Sequence[SamplingConfig | None] | None = None,
                   extra: dict[str, torch.Tensor] | None = None, progress: Progress | None = None,
                   init: torch.Tensor | None = None, strength: float = 1.0,
                   original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
                   shape: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Run every level in order; returns each level's images (B, 3, H_i, W_i) in [-1, 1] (the last is the result).

    shape: (height, width) of the final images (default: the resolution squares); each level makes it scaled to its
    resolution, and a shape some level was not trained on fails with one line (pipeline.sampling.shapes).

    encode_text(prompts, level) -> (T5 tokens (B, L, D), mask (B, L)) for that level (levels may differ in
    max_length); extra: further conditioning (e.g. "image_embed" (B, E) from the prior) given to the levels whose
    Conditioning uses it; init/strength: the base level's image-to-image start (its own grid, see sample_level);
    original_size (height, width; default: each level's own output size) and crop_top_left (in pixels of the last
    level's output, scaled to each level's) condition the levels trained with size conditioning.
    """
    check_chain(levels)
    if original_size is not None and (len(original_size) != 2 or min(original_size) < 1):
        raise UsageError(f"original_size must be (height, width) in pixels >= 1, got {original_size}")
    if len(crop_top_left) != 2 or min(crop_top_left) < 0:
        raise UsageError(f"crop_top_left must be (top, left) in pixels >= 0, got {crop_top_left}")
    shapes = cascade_shapes(levels, *shape) if shape is not None else [None] * len(levels)
    settings = list(settings) if settings is not None else [None] * len(levels)
    outputs: list[torch.Tensor] = []
    images = None
    for index, level in enumerate(levels):
        text, mask = encode_text(prompts, level)
        inputs = {"text": text, "mask": mask}
        if level.cond.image_embed_dim:
            if not extra or "image_embed" not in extra:
                raise UsageError(f"cascade level {level.name!r} is conditioned on a CLIP image embedding; the "
                                 "cascade needs a prior (or an image) to provide one")
            inputs["image_embed"] = extra["image_embed"]
        if level.low_res:
            inputs["images"] = images
        if level.cond.size_dim:
            scale = level.resolution / levels[-1].resolution
            crop = (round(crop_top_left[0] * scale), round(crop_top_left[1] * scale))
            height, width = shapes[index] or (level.resolution, level.resolution)
            inputs["sizes"] = default_sizes(text.shape[0], height, width, original=original_size,
                                            crop_top_left=crop, device=text.device)
        images = sample_level(level, inputs, settings=settings[index], seed=seed, level_index=index,
                              progress=progress, init=init if index == 0 else None, strength=strength,
                              shape=shapes[index])
        outputs.append(images)
    return outputs


def check_chain(levels: Sequence[CascadeLevel]) -> None:
    """A cascade starts with a base level and each super-resolution level upsamples the previous one's output."""
    if not levels:
        raise UsageError("a cascade needs at least a base level")
    if levels[0].low_res:
        raise UsageError(f"the first cascade level {levels[0].name!r} is a super-resolution stage "
                         f"({levels[0].low_res} -> {levels[0].resolution} px); a cascade starts with a base stage")
    for prev, level in zip(levels, levels[1:]):
        if level.low_res != prev.resolution:
            raise UsageError(f"cascade levels do not chain: {prev.name!r} makes {prev.resolution} px images but "
                             f"{level.name!r} upsamples {level.low_res or 'no'} px images")


def with_overrides(settings: SamplingConfig, *, guidance: float | None = None, steps: int | None = None,
                   sampler: str | None = None) -> SamplingConfig:
    """`settings` with the given values replaced (validated: a guidance < 1 or bad steps raise ConfigError)."""
    sampler_cfg = settings.sampler
    if sampler is not None or steps is not None:
        sampler_cfg = replace(sampler_cfg, name=sampler or sampler_cfg.name, steps=steps or sampler_cfg.steps)
    return replace(settings, sampler=sampler_cfg, guidance=settings.guidance if guidance is None else guidance)
