"""The DALL-E 2 diffusion prior: diffusers' ``PriorTransformer`` built from a typed config, the one convention by
which training, sampling and anyone loading an exported prior feed it, and the sampler the cascade calls.

Convention (text -> CLIP image embedding; E = CLIP embedding width, L = CLIP context length):

- ``hidden_states``: the noised image embedding x_t (B, E) in the prior's *normalised* space
  z = (e - clip_mean) / clip_std, where e is the L2-normalised open_clip image embedding. clip_mean/clip_std
  (1, E) are the model's own (frozen) parameters, so diffusers' ``post_process_latents(z) = z * clip_std +
  clip_mean`` maps a sample back, as in diffusers' unCLIP pipelines.
- ``proj_embedding``: the L2-normalised CLIP text embedding (B, E) (open_clip ``encode_text(normalize=True)``).
- ``encoder_hidden_states``: the CLIP per-token text encodings (B, L, E): the text tower's output after ln_final,
  through the CLIP text projection ('projected', any CLIP) or as they are ('raw', only when the tower width W = E:
  diffusers' ``encoder_hidden_states_proj`` is ``Linear(embedding_dim, inner_dim)``, so tokens must be E wide).
- ``attention_mask``: (B, L) bool, True up to and including the EOT token (open_clip's padding structure). Always
  passed: diffusers' PriorTransformer only applies its causal mask when a mask is given.
- ``timestep``: (B,) integer or fractional timesteps of the noise schedule.

Null condition (classifier-free guidance): tokens and text embedding zero, mask all False - the prior's final token
then attends only to the (learned) projection biases, the timestep and x_t.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config_schema import check, doc, from_dict
from pipeline.diffusion.guidance import classifier_free
from pipeline.diffusion.samplers import SamplerConfig, sample_loop
from pipeline.diffusion.schedules import DiffusionConfig, NoiseSchedule, build_schedule
from pipeline.errors import ConfigError
from pipeline.models.frozen_clip import FrozenClip, TextEncoding

PRIOR_JSON = "t2i_prior.json"
ADDITIONAL_EMBEDDINGS = 4  # text embedding, timestep, x_t and the final "prd" query token
Condition = dict[str, torch.Tensor]  # {"tokens": (B, L, E), "mask": (B, L) bool, "text_emb": (B, E)}


@dataclass(frozen=True)
class PriorConfig:
    """Architecture of the prior transformer (its E and L come from the CLIP it is trained against)."""

    heads: int = doc(4, "Attention heads.")
    head_dim: int = doc(32, "Channels per head; the transformer width is heads * head_dim.")
    layers: int = doc(4, "Transformer blocks.")
    dropout: float = doc(0.0, "Dropout probability in attention and feed-forward layers.")
    time_embed_dim: int = doc(0, "Hidden width of the timestep MLP; 0 = the transformer width.")
    norm_in: bool = doc(False, "LayerNorm on the token sequence before the first block.")
    embedding_proj_norm: bool = doc(False, "LayerNorm on the text embedding before its projection.")

    def __post_init__(self) -> None:
        for key in ("heads", "head_dim", "layers"):
            check(getattr(self, key) > 0, f"model.prior.{key}", f"must be > 0, got {getattr(self, key)}")
        check(0.0 <= self.dropout < 1.0, "model.prior.dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.time_embed_dim >= 0, "model.prior.time_embed_dim", f"must be >= 0, got {self.time_embed_dim}")


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


def diffusers_kwargs(cfg: PriorConfig, *, embed_dim: int, num_tokens: int) -> dict:
    """The ``PriorTransformer`` constructor arguments (also its exported config.json)."""
    width = cfg.heads * cfg.head_dim
    return {"num_attention_heads": cfg.heads, "attention_head_dim": cfg.head_dim, "num_layers": cfg.layers,
            "embedding_dim": embed_dim, "num_embeddings": num_tokens, "additional_embeddings": ADDITIONAL_EMBEDDINGS,
            "dropout": cfg.dropout, "time_embed_dim": cfg.time_embed_dim or width,
            "norm_in_type": "layer" if cfg.norm_in else None,
            "embedding_proj_norm_type": "layer" if cfg.embedding_proj_norm else None,
            "encoder_hid_proj_type": "linear", "added_emb_type": "prd"}


def freeze_stats(prior: nn.Module) -> nn.Module:
    """clip_mean/clip_std are data statistics, not weights: no gradient, no optimizer state, no EMA (the optimizer
    and the EMA only take parameters that require grad), yet still in the state dict, checkpoints and export."""
    prior.clip_mean.requires_grad_(False)
    prior.clip_std.requires_grad_(False)
    return prior


def build_prior(cfg: PriorConfig, *, embed_dim: int, num_tokens: int) -> nn.Module:
    """A freshly initialised ``diffusers.PriorTransformer`` (clip_mean/clip_std zero and frozen until set)."""
    from diffusers import PriorTransformer

    return freeze_stats(PriorTransformer(**diffusers_kwargs(cfg, embed_dim=embed_dim, num_tokens=num_tokens)))


@torch.no_grad()
def set_stats(prior: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Write the image-embedding statistics (E,) or (1, E) into the prior's frozen clip_mean/clip_std."""
    prior.clip_mean.copy_(mean.reshape(prior.clip_mean.shape))
    prior.clip_std.copy_(std.reshape(prior.clip_std.shape))


def normalize_embedding(emb: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, E) image embeddings -> the prior's space (e - mean) / std (fp32); inverse of post_process_latents."""
    return (emb.float() - mean.float()) / std.float()


def prior_forward(prior: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
    """One denoiser call under the convention above: x_t (B, E), t (B,) -> output (B, E) in the prior's dtype."""
    dtype = x_t.dtype
    return prior(x_t, t, proj_embedding=cond["text_emb"].to(dtype), encoder_hidden_states=cond["tokens"].to(dtype),
                 attention_mask=cond["mask"]).predicted_image_embedding


def null_condition(cond: Condition, drop: torch.Tensor) -> Condition:
    """`cond` with the text replaced by the null condition where `drop` (B,) bool is True."""
    keep = (~drop).to(cond["tokens"].dtype)
    return {"tokens": cond["tokens"] * keep[:, None, None], "mask": cond["mask"] & ~drop[:, None],
            "text_emb": cond["text_emb"] * keep[:, None].to(cond["text_emb"].dtype)}


def condition(clip: FrozenClip, text: TextEncoding, text_tokens: str) -> Condition:
    """The prior's condition from a CLIP text encoding ('projected' or 'raw' per-token encodings)."""
    tokens = clip.project_tokens(text.tokens) if text_tokens == "projected" else text.tokens
    return {"tokens": tokens, "mask": text.mask, "text_emb": text.pooled}


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
        from diffusers import PriorTransformer

        from pipeline.models.diffusers_attention import install_attention
        from pipeline.train.weights import load_diffusers_strict

        meta = json.loads((Path(folder) / PRIOR_JSON).read_text(encoding="utf-8"))
        source = f"{Path(folder) / PRIOR_JSON}"
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

