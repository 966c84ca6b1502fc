"""The DALL-E 2 diffusion prior: diffusers' ``PriorTransformer`` built from a typed config, and the one convention
by which training, sampling (pipeline/sampling/prior.py) and anyone loading an exported prior feed it.

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

from dataclasses import dataclass

import torch
from diffusers import PriorTransformer
from torch import nn

from pipeline.config_schema import check, doc
from pipeline.models.frozen_clip import FrozenClip, TextEncoding

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
