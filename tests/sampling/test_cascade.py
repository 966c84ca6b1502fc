"""Cascade sampling (pipeline/sampling/cascade.py): stages chain, seeds reproduce, image i does not depend on
how many images are drawn with it, guidance < 1 and broken cascades fail with one clear line."""
from __future__ import annotations

import pytest
import torch

from pipeline.sampling.cascade import SamplingConfig, CascadeLevel, check_chain, sample_cascade, with_overrides
from pipeline.diffusion.samplers import SamplerConfig
from pipeline.diffusion.schedules import DiffusionConfig, build_schedule
from pipeline.errors import ConfigError, UsageError
from pipeline.models.unet import Conditioning
from unet_helpers import tiny_unet

TEXT_DIM = 24


def level(name: str, resolution: int, low_res: int = 0, sampler: str = "ddpm") -> CascadeLevel:
    cond = Conditioning(TEXT_DIM, True, level_dim=8 if low_res else 0, low_res_channels=3 if low_res else 0)
    settings = SamplingConfig(sampler=SamplerConfig(name=sampler, steps=4), guidance=3.0)
    return CascadeLevel(name=name, unet=tiny_unet(cond, side=resolution, seed=resolution), cond=cond,
                        schedule=build_schedule(DiffusionConfig(), resolution), target="v", resolution=resolution,
                        grid=(3, resolution, resolution), defaults=settings, low_res=low_res, sample_noise_level=0.2)


def encode(prompts: list[str], level: CascadeLevel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fake text encoder: a deterministic embedding per prompt, 5 tokens, the last 2 padded."""
    rows = []
    for prompt in prompts:
        gen = torch.Generator().manual_seed(sum(map(ord, prompt)))
        rows.append(torch.randn(5, TEXT_DIM, generator=gen))
    mask = torch.tensor([[True, True, True, False, False]] * len(prompts))
    return torch.stack(rows) * mask[..., None], mask


@pytest.fixture(scope="module")
def cascade() -> list[CascadeLevel]:
    return [level("base", 8), level("sr16", 16, low_res=8, sampler="dpmpp_2m")]


def test_cascade_chains_is_seeded_and_image_i_does_not_depend_on_the_batch(cascade):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    outs = sample_cascade(cascade, prompts, encode, seed=7)
    assert [tuple(o.shape) for o in outs] == [(3, 3, 8, 8), (3, 3, 16, 16)]
    assert all(o.min() >= -1 and o.max() <= 1 for o in outs)
    again = sample_cascade(cascade, prompts, encode, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    other_seed = sample_cascade(cascade, prompts, encode, seed=8)
    assert not torch.allclose(outs[-1], other_seed[-1])
    alone = sample_cascade(cascade, prompts[:1], encode, seed=7)
    torch.testing.assert_close(alone[-1][0], outs[-1][0], atol=1e-5, rtol=0)


def test_super_resolution_input_is_noise_augmented_at_the_sample_level(cascade):
    from pipeline.sampling.cascade import low_res_input

    sr = cascade[1]
    images = torch.zeros(64, 3, 8, 8)
    level = torch.full((64,), 0.3)
    noised = low_res_input(images, sr, level)
    abar = float(sr.schedule.alpha_bar(torch.tensor([0.3 * (sr.schedule.num_timesteps - 1)]))[0])
    assert noised.shape == (64, 3, 16, 16)
    assert abs(float(noised.std()) - (1 - abar) ** 0.5) < 0.02  # zero image: only the augmentation noise is left


def test_broken_cascades_and_bad_settings_fail_with_one_line(cascade):
    with pytest.raises(UsageError, match="starts with a base stage"):
        check_chain([cascade[1]])
    with pytest.raises(UsageError, match="do not chain: 'base' makes 8 px images but 'sr32' upsamples 16 px"):
        check_chain([cascade[0], level("sr32", 32, low_res=16)])
    with pytest.raises(UsageError, match="at least a base level"):
        check_chain([])
    with pytest.raises(ConfigError, match="sampling.guidance must be >= 1"):
        with_overrides(cascade[0].defaults, guidance=0.5)
    with pytest.raises(ConfigError, match="steps"):
        with_overrides(cascade[0].defaults, steps=-3)


def test_per_image_seeds_never_collide_across_stages_and_seeds():
    """Image i of cascade level l of seed k gets a generator of its own: no two of these triples share a first draw
    (a linear mix seed * 1_000_003 + level * 10_007 + i gave level 0 image 10007 the seed of level 1 image 0)."""
    from pipeline.sampling.cascade import generators, image_seed

    seeds = {image_seed(k, s, i) for k in range(3) for s in range(3) for i in range(12_000)}
    assert len(seeds) == 3 * 3 * 12_000 and all(0 <= v < 2**63 for v in seeds)
    first = generators(0, 0, 10_008, torch.device("cpu"))[10_007]
    other = generators(0, 1, 1, torch.device("cpu"))[0]
    assert not torch.equal(torch.randn(4, generator=first), torch.randn(4, generator=other))
