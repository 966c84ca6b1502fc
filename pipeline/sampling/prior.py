"""Sampling the DALL-E 2 prior: prompts -> CLIP image embeddings (B, E), with classifier-free guidance and K
candidates per prompt of which the one closest to the CLIP text embedding is kept; also an exported prior folder
loaded for sampling (``PriorSampler.from_pretrained``). The network and its input convention are
pipeline/models/prior.py's.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import PriorTransformer
from torch import nn

from pipeline.bundle import PRIOR_META
from pipeline.config_schema import check, doc, from_dict
from pipeline.diffusion.guidance import classifier_free
from pipeline.diffusion.samplers import SamplerConfig, sample_loop
from pipeline.diffusion.schedules import DiffusionConfig, NoiseSchedule, build_schedule
from pipeline.errors import ConfigError
from pipeline.models.diffusers_attention import install_attention
from pipeline.models.frozen_clip import FrozenClip, TextEncoding
from pipeline.models.loading import load_diffusers_strict
from pipeline.models.prior import Condition, condition, null_condition, prior_forward


@dataclass(frozen=True)
class PriorSamplingConfig:
    """How the prior samples by default (saved with the weights; overridable per call)."""

    sampler: SamplerConfig = doc(SamplerConfig(name="ddim", steps=25), "Sampler and number of steps.")
    guidance: float = doc(4.0, "Classifier-free guidance scale (>= 1; 1 = no guidance, one network pass per step).")
    candidates: int = doc(1, "Embeddings drawn per prompt; the one with the highest cosine to the CLIP text "
                             "embedding is kept (DALL-E 2 used 2).")

    def __post_init__(self) -> None:
        check(self.guidance >= 1.0, "model.sampling.guidance", f"must be >= 1 (1 = off), got {self.guidance}")
        check(self.candidates >= 1, "model.sampling.candidates", f"must be >= 1, got {self.candidates}")



def candidate_generators(seed: int, batch: int, candidates: int, device: torch.device) -> list[torch.Generator]:
    """One generator per (prompt i, candidate k), in that order, seeded from (seed, i, k) only: a prompt's samples
    do not depend on what else is in the batch, and never share a stream with the cascade's U-Net generators."""
    gens = []
    for i in range(batch):
        for k in range(candidates):
            digest = hashlib.sha256(f"prior:{seed}:{i}:{k}".encode()).digest()
            gen = torch.Generator(device=device)
            gen.manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
            gens.append(gen)
    return gens


def select_candidates(candidates: torch.Tensor, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """candidates (B, K, E) unit vectors, text_emb (B, E) -> (the highest-cosine candidate (B, E), its index (B,))."""
    scores = torch.einsum("bke,be->bk", candidates.float(), F.normalize(text_emb.float(), dim=-1))
    best = scores.argmax(dim=1)
    return candidates[torch.arange(candidates.shape[0], device=best.device), best], best


class PriorSampler:
    """prompts -> normalised CLIP image embeddings (B, E), with classifier-free guidance and K candidates.

    prior: the PriorTransformer (eval mode); clip: the frozen CLIP it was trained against; stats: (clip_mean,
    clip_std) when the prior's own parameters cannot be read (ZeRO-3 partitions), else None.
    """

    def __init__(self, prior: nn.Module, clip: FrozenClip, schedule: NoiseSchedule, target: str,
                 settings: PriorSamplingConfig, text_tokens: str = "projected",
                 stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.prior, self.clip, self.schedule, self.target = prior, clip, schedule, target
        self.settings, self.text_tokens, self.stats = settings, text_tokens, stats

    @classmethod
    def from_pretrained(cls, folder: str | Path, clip: str | Path | FrozenClip | None = None,
                        device: torch.device | str = "cpu") -> PriorSampler:
        """Load an exported prior folder; `clip`: the CLIP folder (default: the one recorded at export)."""
        meta = json.loads((Path(folder) / PRIOR_META).read_text(encoding="utf-8"))
        source = f"{Path(folder) / PRIOR_META}"
        frozen = clip if isinstance(clip, FrozenClip) else FrozenClip.load(clip or meta["clip"]["path"], "clip")
        for key in ("embed_dim", "context_length", "token_width"):
            if getattr(frozen.info, key) != meta["clip"][key]:
                raise ConfigError(f"{source}: the prior was trained against a CLIP with {key} {meta['clip'][key]}, "
                                  f"{frozen.info.path} has {getattr(frozen.info, key)}")
        prior = load_diffusers_strict(PriorTransformer, Path(folder))  # a config/weights mismatch fails here
        install_attention(prior, meta.get("attention", "sdpa"))
        diffusion = from_dict(DiffusionConfig, meta["diffusion"], source=source)
        settings = from_dict(PriorSamplingConfig, meta["sampling"], source=source)
        schedule = build_schedule(diffusion, diffusion.shift_base_resolution)
        return cls(prior.to(device), frozen.to(device).eval(), schedule, diffusion.target, settings,
                   meta["text_tokens"])

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stats is not None:
            return self.stats
        return self.prior.clip_mean.detach(), self.prior.clip_std.detach()

    @torch.no_grad()
    def embed(self, prompts: list[str], seed: int = 0, settings: PriorSamplingConfig | None = None) -> torch.Tensor:
        """(B, E) float32 L2-normalised image embeddings for `prompts`; the same per prompt for the same seed."""
        return self.sample(self.clip.encode_prompts(prompts), seed, settings)

    @torch.no_grad()
    def sample(self, text: TextEncoding, seed: int = 0, settings: PriorSamplingConfig | None = None,
               return_candidates: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, E) for a CLIP text encoding (and all candidates (B, K, E) when asked)."""
        settings = settings or self.settings
        batch, k = text.pooled.shape[0], settings.candidates
        dtype = next(self.prior.parameters()).dtype
        cond = {name: v.repeat_interleave(k, dim=0) for name, v in condition(self.clip, text, self.text_tokens).items()}
        cond = {name: (v.to(dtype) if v.is_floating_point() else v) for name, v in cond.items()}
        uncond = null_condition(cond, torch.ones(batch * k, dtype=torch.bool, device=cond["mask"].device))
        device = cond["mask"].device
        gens = candidate_generators(seed, batch, k, device)
        embed_dim = text.pooled.shape[1]
        noise = torch.stack([torch.randn(embed_dim, generator=g, device=device) for g in gens])

        def model_fn(x: torch.Tensor, t: torch.Tensor, c: Condition) -> torch.Tensor:
            return prior_forward(self.prior, x.to(dtype), t, c).float()

        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return classifier_free(model_fn, x_t, t, cond, uncond, settings.guidance)

        z0 = sample_loop(predict, noise, self.schedule, self.target, settings.sampler, generators=gens)
        mean, std = self._stats()
        # diffusers' post_process_latents, in fp32 on the sample's device; then back onto the unit sphere
        emb = F.normalize(z0 * std.float().to(device) + mean.float().to(device), dim=-1).view(batch, k, -1)
        best, _ = select_candidates(emb, text.pooled)
        return (best, emb) if return_candidates else best


def with_overrides(settings: PriorSamplingConfig, *, guidance: float | None = None, steps: int | None = None,
                   candidates: int | None = None) -> PriorSamplingConfig:
    """`settings` with the given values replaced (validated by the dataclasses)."""
    sampler = settings.sampler if steps is None else replace(settings.sampler, steps=steps)
    return replace(settings, sampler=sampler, guidance=settings.guidance if guidance is None else guidance,
                   candidates=settings.candidates if candidates is None else candidates)

