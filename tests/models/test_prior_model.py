"""pipeline.models.prior: typed config -> diffusers PriorTransformer, padding honoured, attention backends agree,
sampling deterministic per seed and per prompt, K-candidate selection; config errors; the ViT-L/14 size."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.models.diffusers_attention import install_attention
from pipeline.models.frozen_clip import FrozenClip
from pipeline.models.prior import PriorConfig, build_prior, condition, prior_forward, set_stats
from pipeline.diffusion.samplers import SamplerConfig
from pipeline.diffusion.schedules import DiffusionConfig, build_schedule
from pipeline.sampling.prior import PriorSampler, PriorSamplingConfig, select_candidates, with_overrides
from pipeline.train.stage import StageContext
from prior_helpers import TINY_PRIOR, export_tiny_clip

REPO = Path(__file__).resolve().parents[2]
CPU = StageContext(rank=0, world_size=1, device=torch.device("cpu"), compute_dtype=torch.float32)
PROMPTS = ["a small red circle", "a large blue square on the left", "a tiny green triangle at the top"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> FrozenClip:
    return FrozenClip.load(export_tiny_clip(tmp_path_factory.mktemp("prior_clip") / "clip", seed=2))


def _prior(seed: int = 0, backend: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(seed)
    prior = build_prior(PriorConfig(**TINY_PRIOR), embed_dim=16, num_tokens=16)
    with torch.no_grad():  # diffusers zero-inits the positional and prd embeddings: move every weight off init
        for p in prior.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    set_stats(prior, torch.linspace(-0.1, 0.1, 16), torch.linspace(0.1, 0.3, 16))
    install_attention(prior, backend)
    return prior.eval()


def _inputs(clip: FrozenClip, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    cond = condition(clip, clip.encode_prompts(PROMPTS[:batch]), "projected")
    return torch.randn(batch, 16, generator=g), torch.tensor([3, 500, 999][:batch]), cond


def test_built_prior_sizes_and_frozen_statistics():
    prior = build_prior(PriorConfig(**TINY_PRIOR), embed_dim=16, num_tokens=16)
    assert prior.positional_embedding.shape == (1, 16 + 4, 32)  # L text tokens + 4 additional tokens
    assert not prior.clip_mean.requires_grad and not prior.clip_std.requires_grad
    assert {"clip_mean", "clip_std"} <= set(prior.state_dict())
    assert float(prior.clip_std.abs().sum()) == 0.0  # unset until the stage computes them from data


def test_padded_token_encodings_change_nothing(clip):
    prior = _prior()
    x_t, t, cond = _inputs(clip)
    assert not cond["mask"].all()  # the short prompts are padded
    with torch.no_grad():
        ref = prior_forward(prior, x_t, t, cond)
        garbage = 100 * torch.randn_like(cond["tokens"])
        noisy = {**cond, "tokens": torch.where(cond["mask"][..., None], cond["tokens"], garbage)}
        torch.testing.assert_close(prior_forward(prior, x_t, t, noisy), ref, atol=1e-5, rtol=1e-5)
        real = {**cond, "tokens": cond["tokens"].clone()}
        real["tokens"][:, 1] += 1.0  # a real token does change the output: the check above can fail
        assert (prior_forward(prior, x_t, t, real) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("padded", [True, False], ids=["padding+causal", "causal"])
def test_sdpa_and_triton_backends_agree(clip, padded):
    x_t, t, cond = _inputs(clip)
    if not padded:
        cond = {**cond, "mask": torch.ones_like(cond["mask"])}
    with torch.no_grad():
        sdpa = prior_forward(_prior(backend="sdpa"), x_t, t, cond)
        triton = prior_forward(_prior(backend="triton"), x_t, t, cond)
    torch.testing.assert_close(triton, sdpa, atol=3e-5, rtol=1e-4)


def _sampler(clip: FrozenClip, **settings) -> PriorSampler:
    diffusion = DiffusionConfig(target="x0", loss_weighting="uniform")
    settings = PriorSamplingConfig(**{"sampler": SamplerConfig(name="ddim", steps=5), "guidance": 3.0, **settings})
    return PriorSampler(_prior(), clip, build_schedule(diffusion, 64), "x0", settings)


def test_sampling_is_deterministic_per_seed_and_per_prompt(clip):
    sampler = _sampler(clip, candidates=2)
    a = sampler.embed(PROMPTS, seed=7)
    assert a.shape == (3, 16) and torch.allclose(a.norm(dim=-1), torch.ones(3))
    assert torch.equal(sampler.embed(PROMPTS, seed=7), a)
    assert (sampler.embed(PROMPTS, seed=8) - a).abs().max() > 1e-3
    # prompt i's sample depends on (seed, i) only, not on the rest of the batch (up to batched-matmul rounding)
    torch.testing.assert_close(sampler.embed(PROMPTS[:2], seed=7), a[:2], atol=1e-5, rtol=0)


def test_candidate_selection_keeps_the_highest_cosine(clip):
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    cands = torch.nn.functional.normalize(torch.tensor([[[0.0, 1.0], [0.9, 0.1], [0.5, 0.5]],
                                                        [[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]]), dim=-1)
    best, index = select_candidates(cands, text)
    assert index.tolist() == [1, 2] and torch.equal(best, cands[torch.arange(2), index])

    sampler = _sampler(clip, candidates=3)
    text_enc = clip.encode_prompts(PROMPTS)
    best, all_cands = sampler.sample(text_enc, seed=3, return_candidates=True)
    cos = torch.einsum("bke,be->bk", all_cands, text_enc.pooled)
    assert all_cands.shape == (3, 3, 16) and len({round(float(c), 6) for c in cos.flatten()}) > 3
    assert torch.equal(best, all_cands[torch.arange(3), cos.argmax(dim=1)])
    # candidate 0 of each prompt is what a one-candidate draw with the same seed gives
    single = sampler.sample(text_enc, seed=3, settings=with_overrides(sampler.settings, candidates=1))
    torch.testing.assert_close(single, all_cands[:, 0], atol=1e-5, rtol=0)


def _stage(clip_dir: Path, tmp_path: Path, train: dict | None = None, resolution: int = 16, zero_stage: int = 0,
           **model):
    from pipeline.stages.prior import PriorStage

    raw = {"stage": "prior", "model": {"clip": str(clip_dir), **model}, "train": train or {},
           "data": {"urls": str(tmp_path), "resolution": resolution}, "dist": {"zero_stage": zero_stage}}
    return PriorStage(load_config(None, base=raw), CPU)


def test_config_errors_are_one_clear_line(clip, tmp_path):
    folder = Path(clip.info.path)
    with pytest.raises(ConfigError, match="model.prior.heads must be > 0"):
        PriorConfig(heads=0)
    with pytest.raises(ConfigError, match="model.clip is required"):
        load_config(None, base={"stage": "prior", "model": {}})
    with pytest.raises(ConfigError, match="model.diffusion.schedule 'shifted_cosine'"):
        _stage(folder, tmp_path, diffusion={"schedule": "shifted_cosine"})
    with pytest.raises(ConfigError, match=r"model.sampling.sampler.steps \(7\) must divide"):
        _stage(folder, tmp_path, sampling={"sampler": {"name": "ddim", "steps": 7}})
    with pytest.raises(ConfigError, match="model.sampling.candidates must be >= 1"):
        _stage(folder, tmp_path, sampling={"candidates": 0})
    with pytest.raises(ConfigError, match="PriorTransformer does not support gradient checkpointing"):
        _stage(folder, tmp_path, train={"activation_checkpointing": True})
    with pytest.raises(ConfigError, match=r"'raw' needs the CLIP text width \(32\) to equal its embedding width"):
        _stage(folder, tmp_path, text_tokens="raw").sample_spec()
    with pytest.raises(ConfigError, match=r"data.resolution \(32\) must equal the image size of the CLIP .* \(16\)"):
        _stage(folder, tmp_path, resolution=32).sample_spec()


def test_vit_l14_config_builds_on_meta_device(capsys):
    cfg = load_config(REPO / "configs/prior/vit_l14.yaml")
    with torch.device("meta"):
        prior = build_prior(cfg.model.prior, embed_dim=768, num_tokens=77)
    count = sum(p.numel() for p in prior.parameters())
    with capsys.disabled():
        width = cfg.model.prior.heads * cfg.model.prior.head_dim
        print(f"\nViT-L/14 prior: {count / 1e6:.1f} M parameters, width {width}, {cfg.model.prior.layers} layers")
    assert prior.positional_embedding.shape == (1, 77 + 4, cfg.model.prior.heads * cfg.model.prior.head_dim)
    assert prior.proj_to_clip_embeddings.out_features == 768 and 0.5e9 < count < 1.5e9
    assert cfg.model.text_tokens == "raw"  # ViT-L/14's text width equals its embedding width (768)
